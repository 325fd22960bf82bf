-- Billing guardrails: what each dimension's raw usage means, usage parked for want of a configured
-- dimension, records held by a guardrail, rebuilt records' history, and remainders settled at a
-- final seal. New tables only, so every statement stays idempotent.

-- Every dimension definition a release that opened this file had (the latest wins per name), so
-- usage recorded under a dimension a later release dropped still says what its raw units are.
CREATE TABLE IF NOT EXISTS dimensions (
    name        TEXT PRIMARY KEY,
    source      TEXT NOT NULL,               -- count, total_tokens, gpu_seconds, ...
    unit        INTEGER NOT NULL,            -- source units per billed unit, as configured
    raw_unit    INTEGER NOT NULL,            -- stored raw units per billed unit
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID;

-- Usage that the running configuration cannot bill: its dimension is not configured, or is
-- configured with another unit. Never sent; released by an operator into a configured dimension.
CREATE TABLE IF NOT EXISTS parked (
    id              INTEGER PRIMARY KEY,
    customer        TEXT NOT NULL,
    dimension       TEXT NOT NULL,           -- the dimension the usage was recorded under
    unit            INTEGER NOT NULL,        -- its raw units per billed unit, as recorded
    raw             INTEGER NOT NULL,
    events          INTEGER NOT NULL,
    first_event_at  INTEGER NOT NULL,
    hour            INTEGER NOT NULL,        -- the hour it was on its way to
    reason          TEXT NOT NULL,
    parked_at       INTEGER NOT NULL,
    state           TEXT NOT NULL,           -- unconfigured, then released
    released_to     TEXT,                    -- the dimension an operator released it into
    released_at     INTEGER
);

CREATE INDEX IF NOT EXISTS parked_state ON parked (state, dimension);

-- Why a record is (or was) held by a guardrail instead of being sent.
CREATE TABLE IF NOT EXISTS holds (
    record_id    INTEGER PRIMARY KEY,
    rule         TEXT NOT NULL,              -- the rule and its numbers
    held_at      INTEGER NOT NULL,
    released_at  INTEGER,
    outcome      TEXT                        -- released (sent) or discarded
);

-- A record AWS certainly refused and an operator rebuilt under the current configuration:
-- what it was before (the records row itself holds the rebuilt record).
CREATE TABLE IF NOT EXISTS record_rebuilds (
    id              INTEGER PRIMARY KEY,
    record_id       INTEGER NOT NULL,
    at              INTEGER NOT NULL,
    old_state       TEXT NOT NULL,
    old_dimension   TEXT NOT NULL,
    old_quantity    INTEGER NOT NULL,
    old_product_code TEXT,
    old_payload     TEXT NOT NULL,
    old_aws_status  TEXT,
    reason          TEXT NOT NULL
);

-- Remainders below one unit settled at a final seal (SIGTERM, `flush --once --final`) by policy:
-- billed as one unit (rounded up) or given up. Conservation: raw ingested = billed units x unit
-- + carried remainders + parked - rounded_up_raw + given_up_raw.
CREATE TABLE IF NOT EXISTS settlements (
    id          INTEGER PRIMARY KEY,
    customer    TEXT NOT NULL,
    dimension   TEXT NOT NULL,
    hour        INTEGER,                     -- the bucket that took the extra unit (NULL when none did)
    raw         INTEGER NOT NULL,            -- the remainder settled, raw units
    unit        INTEGER NOT NULL,
    units_added INTEGER NOT NULL,            -- 1: billed as a whole unit; 0: given up
    policy      TEXT NOT NULL,
    at          INTEGER NOT NULL
);
