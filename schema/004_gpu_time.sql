-- GPU time measured by the sidecar: each request's engine interval (for `fair_share`), and per hour
-- the GPU wall time the task had beside the GPU time it billed (for /metrics).

-- One row per event that carried GPU time. `pending_from_us` marks how much of the interval is
-- accounted: time before it was shared out at a sealing (or, for a late event, billed as the time
-- nobody else covered); the rest is shared when its hour seals.
CREATE TABLE IF NOT EXISTS engine_intervals (
    event_id         TEXT PRIMARY KEY,
    customer         TEXT NOT NULL,          -- the customer key its share goes to (tenant:NAME until mapped)
    start_us         INTEGER NOT NULL,       -- epoch microseconds, the vLLM host's clock
    end_us           INTEGER NOT NULL,
    pending_from_us  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS engine_intervals_end ON engine_intervals (end_us);
CREATE INDEX IF NOT EXISTS engine_intervals_pending ON engine_intervals (pending_from_us)
    WHERE pending_from_us < end_us;

-- Per hour and GPU dimension: the GPU wall time the task had (x SIDECAR_GPUS) and what it billed.
-- For `fair_share` and `dedicated` the two agree by construction; `engine_time` shows the excess.
CREATE TABLE IF NOT EXISTS gpu_time (
    hour       INTEGER NOT NULL,
    dimension  TEXT NOT NULL,
    mode       TEXT NOT NULL,
    wall_us    INTEGER NOT NULL DEFAULT 0,
    billed_us  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, dimension)
) WITHOUT ROWID;
