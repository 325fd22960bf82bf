-- Metering records: each sealed bucket is frozen into exactly one record before its first send.
-- The record's fields never change after this row is written; every retry resends `payload`.

CREATE TABLE IF NOT EXISTS records (
    id                  INTEGER PRIMARY KEY,
    customer            TEXT NOT NULL,
    dimension           TEXT NOT NULL,
    hour                INTEGER NOT NULL,
    timestamp           INTEGER NOT NULL,     -- epoch seconds, frozen
    quantity            INTEGER NOT NULL,     -- frozen
    aws_account_id      TEXT,
    license_arn         TEXT,
    customer_identifier TEXT,
    product_code        TEXT,
    payload             TEXT NOT NULL,        -- the UsageRecord JSON, sent byte-for-byte on every try
    state               TEXT NOT NULL,        -- pending, sent, rejected, expired, unknown, conflict, carried
    attempts            INTEGER NOT NULL DEFAULT 0,
    maybe_received      INTEGER NOT NULL DEFAULT 0,  -- 1 once any send's outcome was unknown
    in_flight           INTEGER NOT NULL DEFAULT 0,  -- 1 while a send is under way (crash → unknown outcome)
    next_attempt_at     REAL NOT NULL DEFAULT 0,
    aws_status          TEXT,
    metering_record_id  TEXT,
    last_error          TEXT,
    created_at          INTEGER NOT NULL,
    sent_at             INTEGER,
    UNIQUE (customer, dimension, hour)
);

CREATE INDEX IF NOT EXISTS records_state_due ON records (state, next_attempt_at, timestamp);
