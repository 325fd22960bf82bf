-- Usage a member shipped with another unit than its bucket already has (a rolling deployment that
-- changed a dimension's unit): kept here, visible, never sent, never mixed into the bucket.
CREATE TABLE IF NOT EXISTS parked (
    id              BIGSERIAL PRIMARY KEY,
    customer        TEXT NOT NULL,
    dimension       TEXT NOT NULL,
    hour            BIGINT NOT NULL,
    unit            BIGINT NOT NULL,
    raw             BIGINT NOT NULL,
    events          BIGINT NOT NULL,
    first_event_at  BIGINT NOT NULL,
    reason          TEXT NOT NULL,
    parked_at       BIGINT NOT NULL,
    state           TEXT NOT NULL                     -- unconfigured
);
