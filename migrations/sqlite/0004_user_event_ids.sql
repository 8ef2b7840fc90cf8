-- Idempotency per user: the same `event_id` from the same user is the same
-- event (at any age, with or without a timestamp); from another user it is
-- another event. SQLite cannot change a column's UNIQUE in place, so the
-- table is made anew and the rows copied, arrival numbers kept.
CREATE TABLE events_per_user_ids (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id          TEXT,
    user_id           TEXT NOT NULL,
    item_id           TEXT NOT NULL,
    kind              INTEGER NOT NULL,
    value             REAL,
    ts                BIGINT NOT NULL,
    session_id        TEXT,
    recommendation_id TEXT,
    received_at       BIGINT NOT NULL,
    UNIQUE (user_id, event_id)
);
INSERT INTO events_per_user_ids (seq, event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at)
SELECT seq, event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at FROM events;
DROP TABLE events;
ALTER TABLE events_per_user_ids RENAME TO events;
CREATE INDEX events_user_ts ON events (user_id, ts, seq);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_recommendation ON events (recommendation_id) WHERE recommendation_id IS NOT NULL;
