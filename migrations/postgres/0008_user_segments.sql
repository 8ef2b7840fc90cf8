-- Every shopper's segment as the background job last computed it
-- (GET /v1/segments and its member lists). `user_id` is stored as the
-- events store it (encrypted with id_key when set); erasure deletes the row
-- with the user's events. Times are ms since the epoch.
CREATE TABLE user_segments (
    user_id TEXT PRIMARY KEY,
    segment TEXT NOT NULL,
    churn_risk DOUBLE PRECISION NOT NULL,
    last_seen BIGINT NOT NULL,
    recency SMALLINT NOT NULL,
    frequency SMALLINT NOT NULL,
    monetary SMALLINT NOT NULL,
    computed_at BIGINT NOT NULL
);
-- A segment's members in user_id order (the lists' cursor), and sizes.
CREATE INDEX user_segments_segment ON user_segments (segment, user_id);
