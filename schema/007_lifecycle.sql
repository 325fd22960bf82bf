-- Customer lifecycle: each subscriber's subscription state from AWS Marketplace's notifications
-- (SNS or EventBridge, through SQS), and the hour before which a customer's usage is sealed early
-- because their agreement is ending. New tables only, so every statement stays idempotent.

-- One row per subscriber: 'identifier:<CustomerIdentifier>' or 'account:<12-digit account>' (the
-- notifications name an account, not a licence). The state is the one of the newest notification
-- seen (at, then stage); each *_at column keeps the newest time of its kind, so duplicates and
-- out-of-order deliveries change nothing.
CREATE TABLE IF NOT EXISTS subscriptions (
    subscriber      TEXT PRIMARY KEY,
    state           TEXT NOT NULL,           -- subscribed, pending_end, ended, failed
    state_at        INTEGER NOT NULL,        -- AWS's time of the notification that set the state
    subscribed_at   INTEGER,
    end_began_at    INTEGER,                 -- unsubscribe-pending / Purchase Agreement Ended
    ended_at        INTEGER,                 -- unsubscribe-success / License Deprovisioned
    failed_at       INTEGER,
    product_code    TEXT,
    last_kind       TEXT,                    -- the action or detail-type last applied
    updated_at      INTEGER NOT NULL
) WITHOUT ROWID;

-- Customers sealed ahead of the store's watermark: their hours starting before `sealed_before` are
-- sealed (the final usage of an ending agreement), so later usage goes into a later hour's bucket.
CREATE TABLE IF NOT EXISTS customer_floors (
    customer        TEXT PRIMARY KEY,        -- customer key (identifier:… or account:…/…)
    sealed_before   INTEGER NOT NULL
) WITHOUT ROWID;

-- The AWS account of a customer metered by its CustomerIdentifier (ResolveCustomer gives both), so
-- that notifications naming only the account (EventBridge's) reach it. Never part of a record.
CREATE TABLE IF NOT EXISTS customer_accounts (
    customer        TEXT PRIMARY KEY,        -- identifier:<CustomerIdentifier>
    aws_account_id  TEXT NOT NULL
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS customer_accounts_account ON customer_accounts (aws_account_id);
