-- Who last claimed each record for a send, and when: in a single file the process that holds its
-- lock; in a fleet the leader's member id. Kept after the send, for an operator reading a
-- maybe-received record. A table of its own so that every statement stays idempotent.
CREATE TABLE IF NOT EXISTS claims (
    record_id   INTEGER PRIMARY KEY REFERENCES records (id),
    owner       TEXT NOT NULL,
    claimed_at  INTEGER NOT NULL
);
