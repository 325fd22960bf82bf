-- Fleet mode: the PostgreSQL store that every member of a fleet ships its usage into and that the
-- one leader seals, freezes and sends from. Applied by `sidecar.store.pg.migrate` under an advisory
-- transaction lock, each file once, recorded in fleet_migrations. Expand-then-contract: a migration
-- only adds (tables, columns, indexes); a release that stops using something drops it one release
-- later, so two releases side by side during a rolling deployment both work.

CREATE TABLE IF NOT EXISTS members (
    member_id       TEXT PRIMARY KEY,
    started_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    backlog         BIGINT NOT NULL DEFAULT 0,        -- outbox deltas not yet shipped
    backlog_since   DOUBLE PRECISION,                 -- epoch s of the oldest unshipped delta
    stopped_at      TIMESTAMPTZ
);

-- Shipping is idempotent per member file: a member ships its outbox in seq order and marks it
-- shipped only after this commit, so the highest seq applied per origin (the file's random id; a new
-- file after lost storage gets a new one) is enough to apply every delta once.
CREATE TABLE IF NOT EXISTS origins (
    origin          TEXT PRIMARY KEY,
    member_id       TEXT NOT NULL,
    shipped_through BIGINT NOT NULL DEFAULT 0,
    shipped_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS customers (
    customer            TEXT PRIMARY KEY,             -- identifier:ID, account:ACCOUNT/ARN or tenant:NAME
    aws_account_id      TEXT,
    license_arn         TEXT,
    customer_identifier TEXT,
    tenant              TEXT
);

CREATE TABLE IF NOT EXISTS tenants (
    tenant      TEXT PRIMARY KEY,
    customer    TEXT NOT NULL REFERENCES customers (customer),
    source      TEXT NOT NULL,                        -- config or api
    mapped_at   BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS buckets (
    customer        TEXT NOT NULL,
    dimension       TEXT NOT NULL,
    hour            BIGINT NOT NULL,                  -- epoch s of the UTC hour start
    unit            BIGINT NOT NULL,                  -- raw units per billed unit
    state           TEXT NOT NULL,                    -- open, unmapped, sealed, then the record's state
    raw             BIGINT NOT NULL DEFAULT 0,
    events          BIGINT NOT NULL DEFAULT 0,
    carried_in      BIGINT NOT NULL DEFAULT 0,
    first_event_at  BIGINT NOT NULL,
    remainder_in    BIGINT,
    quantity        BIGINT,
    remainder       BIGINT,
    sealed_at       BIGINT,
    PRIMARY KEY (customer, dimension, hour)
);
CREATE INDEX IF NOT EXISTS buckets_state_hour ON buckets (state, hour);

CREATE TABLE IF NOT EXISTS carries (
    customer    TEXT NOT NULL,
    dimension   TEXT NOT NULL,
    raw         BIGINT NOT NULL,
    PRIMARY KEY (customer, dimension)
);

CREATE TABLE IF NOT EXISTS records (
    id                  BIGSERIAL PRIMARY KEY,
    customer            TEXT NOT NULL,
    dimension           TEXT NOT NULL,
    hour                BIGINT NOT NULL,
    timestamp           BIGINT NOT NULL,
    quantity            BIGINT NOT NULL,
    customer_identifier TEXT,
    product_code        TEXT,
    payload             TEXT NOT NULL,                -- frozen once; resent byte for byte
    state               TEXT NOT NULL,
    in_flight           BOOLEAN NOT NULL DEFAULT false,
    maybe_received      BOOLEAN NOT NULL DEFAULT false,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     DOUBLE PRECISION NOT NULL DEFAULT 0,
    aws_status          TEXT,
    metering_record_id  TEXT,
    last_error          TEXT,
    created_at          BIGINT NOT NULL,
    sent_at             BIGINT,
    claimed_by          TEXT,                         -- the leader (member id) that last claimed it
    claim_epoch         BIGINT,                       -- and its lease epoch
    UNIQUE (customer, dimension, hour)
);
CREATE INDEX IF NOT EXISTS records_state_due ON records (state, next_attempt_at, timestamp);

-- The sender's lease: one holder at a time, a new holder increments the epoch (the fencing token).
CREATE TABLE IF NOT EXISTS lease (
    name        TEXT PRIMARY KEY,
    holder      TEXT,
    epoch       BIGINT NOT NULL DEFAULT 0,
    expires_at  TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);
INSERT INTO lease (name) VALUES ('sender') ON CONFLICT (name) DO NOTHING;

-- Fleet-wide values: sealed_before (the sealing watermark; its row is the sealing lock).
CREATE TABLE IF NOT EXISTS meta (
    key     TEXT PRIMARY KEY,
    value   BIGINT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('sealed_before', 0) ON CONFLICT (key) DO NOTHING;
