-- Core tables: events (the dedup ledger), hourly buckets, unit carries, tenant mappings, metadata.
-- Every statement is idempotent (IF NOT EXISTS) so applying the file twice is harmless.

-- One row per accepted event. Its existence is the dedup decision: an event's usage is in
-- the buckets if and only if its row is here (both written in one transaction).
CREATE TABLE IF NOT EXISTS events (
    event_id          TEXT PRIMARY KEY,
    time              INTEGER NOT NULL,      -- event time, epoch seconds (truncated)
    received_at       INTEGER NOT NULL,      -- epoch seconds
    customer          TEXT NOT NULL,         -- customer key of the bucket that holds its usage
    tenant            TEXT,                  -- the tenant named by the event, if any
    hour              INTEGER NOT NULL,      -- start of the bucket hour its usage went to
    model             TEXT,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER,
    gpu_micros        INTEGER,               -- gpu_seconds in microseconds
    finish            TEXT
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at);
CREATE INDEX IF NOT EXISTS events_customer ON events (customer);

-- Customers: one row per customer key; the AWS fields a metering record needs.
CREATE TABLE IF NOT EXISTS customers (
    customer            TEXT PRIMARY KEY,    -- 'account:<id>/<licence arn>', 'identifier:<id>' or 'tenant:<name>' (unmapped)
    aws_account_id      TEXT,
    license_arn         TEXT,
    customer_identifier TEXT,
    tenant              TEXT
);

-- Tenant → customer mappings, from the TOML file and from PUT /v1/customers/{tenant}.
CREATE TABLE IF NOT EXISTS tenants (
    tenant      TEXT PRIMARY KEY,
    customer    TEXT NOT NULL REFERENCES customers (customer),
    source      TEXT NOT NULL,               -- 'config' or 'api'
    updated_at  INTEGER NOT NULL
);

-- Hourly buckets: customer × dimension × UTC hour. Raw amounts are in the dimension's source
-- unit (tokens, requests, GPU microseconds); quantity = (raw + remainder_in) // unit at sealing.
CREATE TABLE IF NOT EXISTS buckets (
    customer        TEXT NOT NULL,
    dimension       TEXT NOT NULL,
    hour            INTEGER NOT NULL,        -- epoch seconds of the hour's start (UTC)
    state           TEXT NOT NULL,           -- open, unmapped, sealed, pending, sent, rejected, expired, unknown, conflict, carried
    raw             INTEGER NOT NULL DEFAULT 0,
    events          INTEGER NOT NULL DEFAULT 0,
    carried_in      INTEGER NOT NULL DEFAULT 0,  -- raw amount (part of raw) from late events or carried records
    first_event_at  INTEGER NOT NULL,        -- earliest event time, epoch seconds
    unit            INTEGER,                 -- dimension unit frozen at sealing
    remainder_in    INTEGER,                 -- raw taken from the customer's carry at sealing
    quantity        INTEGER,                 -- whole units, frozen at sealing
    remainder       INTEGER,                 -- raw left over at sealing, moved to the carry
    sealed_at       INTEGER,
    PRIMARY KEY (customer, dimension, hour)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS buckets_state_hour ON buckets (state, hour);

-- Sub-unit remainders waiting for the customer's next sealed hour of that dimension.
CREATE TABLE IF NOT EXISTS carries (
    customer   TEXT NOT NULL,
    dimension  TEXT NOT NULL,
    raw        INTEGER NOT NULL,
    PRIMARY KEY (customer, dimension)
) WITHOUT ROWID;

-- Small key/value facts, e.g. the sealing watermark.
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) WITHOUT ROWID;
