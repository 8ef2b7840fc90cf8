-- Events: the shop's log of what shoppers did. `seq` is the arrival order,
-- which breaks ties between equal timestamps.
CREATE TABLE events (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The shop's id for the event; a retry with the same id stores nothing.
    -- NULL when the collector sent none (no idempotency asked for).
    event_id          TEXT UNIQUE,
    user_id           TEXT NOT NULL,
    item_id           TEXT NOT NULL,
    -- 0 view, 1 click, 2 like, 3 add_to_cart, 4 remove_from_cart, 5 purchase, 6 rating
    kind              INTEGER NOT NULL,
    value             REAL,
    -- Milliseconds since the Unix epoch, UTC.
    ts                BIGINT NOT NULL,
    session_id        TEXT,
    recommendation_id TEXT,
    received_at       BIGINT NOT NULL
);
CREATE INDEX events_user_ts ON events (user_id, ts, seq);
CREATE INDEX events_ts ON events (ts);

-- The catalogue. Items named by events exist here with no attributes.
CREATE TABLE items (
    item_id    TEXT PRIMARY KEY,
    title      TEXT,
    -- JSON array of strings.
    categories TEXT NOT NULL DEFAULT '[]',
    price      REAL,
    available  INTEGER NOT NULL DEFAULT 1,
    -- JSON object.
    attributes TEXT NOT NULL DEFAULT '{}',
    -- A deleted item reads as 404 and is never recommended, even when events
    -- name it later, until it is PUT again.
    deleted    INTEGER NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL DEFAULT 0
);
