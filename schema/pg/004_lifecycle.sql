-- Customer lifecycle, fleet-wide: subscription states (from the SQS queue the leader consumes) and
-- customers sealed ahead of the fleet's watermark because their agreement is ending. See the
-- single-file schema/007_lifecycle.sql for the meaning of each column.
CREATE TABLE IF NOT EXISTS subscriptions (
    subscriber      TEXT PRIMARY KEY,
    state           TEXT NOT NULL,
    state_at        BIGINT NOT NULL,
    subscribed_at   BIGINT,
    end_began_at    BIGINT,
    ended_at        BIGINT,
    failed_at       BIGINT,
    product_code    TEXT,
    last_kind       TEXT,
    updated_at      BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS customer_floors (
    customer        TEXT PRIMARY KEY,
    sealed_before   BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS customer_accounts (
    customer        TEXT PRIMARY KEY,
    aws_account_id  TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS customer_accounts_account ON customer_accounts (aws_account_id);
