-- Guardrails and final settlements in fleet mode (new tables only: expand, never contract).

-- Records a guardrail held at freezing, and how an operator ended each hold.
CREATE TABLE IF NOT EXISTS holds (
    record_id   BIGINT PRIMARY KEY REFERENCES records (id),
    rule        TEXT NOT NULL,
    held_at     BIGINT NOT NULL,
    released_at BIGINT,
    outcome     TEXT                                  -- released or discarded
);

-- Remainders settled at a final seal (`flush --once --final`), by SIDECAR_SETTLE_REMAINDERS.
CREATE TABLE IF NOT EXISTS settlements (
    id          BIGSERIAL PRIMARY KEY,
    customer    TEXT NOT NULL,
    dimension   TEXT NOT NULL,
    hour        BIGINT,                               -- the bucket that took the unit (none: given up)
    raw         BIGINT NOT NULL,
    unit        BIGINT NOT NULL,
    units_added BIGINT NOT NULL,
    policy      TEXT NOT NULL,
    at          BIGINT NOT NULL
);
