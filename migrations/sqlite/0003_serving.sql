-- Trainings: one row per training run on any replica, for GET /v1/model's
-- `last_training` and `history`.
CREATE TABLE trainings (
    id          TEXT PRIMARY KEY,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT,
    -- running | published | rejected | failed
    outcome     TEXT NOT NULL,
    reason      TEXT,
    -- The candidate's version (whether published or not).
    version     TEXT,
    -- The process that trained (host and pid).
    replica     TEXT
);
CREATE INDEX trainings_started ON trainings (started_at);

-- One row per recommendations response: an impression of its model version.
-- No user id: an impression holds nothing of the shopper.
CREATE TABLE impressions (
    recommendation_id TEXT PRIMARY KEY,
    -- NULL when no model was published yet (cold start only).
    model_version     TEXT,
    -- The item ids shown, each followed by the unit separator (0x1f), which
    -- no id (printable characters) contains.
    items             TEXT NOT NULL,
    created_at        BIGINT NOT NULL
);
CREATE INDEX impressions_version ON impressions (model_version);

-- Clicks are events that carry a recommendation id.
CREATE INDEX events_recommendation ON events (recommendation_id) WHERE recommendation_id IS NOT NULL;

-- Replicas read catalogue changes since their last look.
CREATE INDEX items_updated ON items (updated_at);
