-- Fleet mode: the usage of each ingest transaction, per (customer, dimension, event hour), waiting
-- to be shipped to the fleet's PostgreSQL. Written in the same transaction as the events, so an
-- acknowledged event's usage is either here or shipped; a row is deleted once PostgreSQL committed
-- it. `seq` is never reused (AUTOINCREMENT): with the file's origin id (meta `origin`) it makes each
-- delta's shipment idempotent.
CREATE TABLE IF NOT EXISTS outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    customer        TEXT NOT NULL,
    dimension       TEXT NOT NULL,
    hour            INTEGER NOT NULL,
    unit            INTEGER NOT NULL,
    raw             INTEGER NOT NULL,
    events          INTEGER NOT NULL,
    first_event_at  INTEGER NOT NULL,
    created_at      REAL NOT NULL
);
