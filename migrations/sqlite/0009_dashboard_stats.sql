-- The dashboard's figures, kept as events and answers are recorded so that
-- no request scans the events (GET /v1/stats/*, /v1/items/{id}/activity,
-- /v1/replicas). None holds a user id: erasing a shopper leaves them as
-- they are. Times are ms since the epoch, UTC.

-- Events per minute of their own timestamp and kind, added to by every
-- ingest batch (in the statement that stores it). Minutes older than
-- `minute_stats_retention` (8 days) are deleted in the background.
CREATE TABLE event_minutes (
    minute_ms BIGINT NOT NULL,
    kind      INTEGER NOT NULL,
    n         BIGINT NOT NULL,
    PRIMARY KEY (minute_ms, kind)
);

-- Events per item, day (UTC) and kind; kept `item_activity_retention`
-- (400 days). Ingest does not add to it row by row (a batch names hundreds
-- of items): each batch's counts go into item_days_pending as one row, in
-- the statement that stores the batch, and a background task folds them in
-- every `item_activity_fold`, deleting what it folded in the same
-- transaction.
CREATE TABLE item_days (
    item_id TEXT NOT NULL,
    day_ms  BIGINT NOT NULL,
    kind    INTEGER NOT NULL,
    n       BIGINT NOT NULL,
    PRIMARY KEY (item_id, day_ms, kind)
);

-- One row per ingest batch: its counts per (item, day, kind) as a JSON
-- array of [item_id, day_ms, kind, n].
CREATE TABLE item_days_pending (
    counts TEXT NOT NULL
);

-- Recommendation answers (impressions) per minute of their creation and
-- clicks on them per minute of the click, per model version ('' before any
-- model); kept as event_minutes.
CREATE TABLE recommendation_minutes (
    minute_ms   BIGINT NOT NULL,
    version     TEXT NOT NULL,
    impressions BIGINT NOT NULL DEFAULT 0,
    clicks      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (minute_ms, version)
);

-- The same counts per hour (the first ms of the hour), for the week's
-- series: 168 buckets read from a few hundred rows instead of summing the
-- week's 10,080 minutes per request. Kept by triggers on the minute tables,
-- so that every writer of a minute count adds to its hour in the same
-- statement; pruned with the minutes.
CREATE TABLE event_hours (
    hour_ms BIGINT NOT NULL,
    kind    INTEGER NOT NULL,
    n       BIGINT NOT NULL,
    PRIMARY KEY (hour_ms, kind)
);
CREATE TABLE recommendation_hours (
    hour_ms     BIGINT NOT NULL,
    version     TEXT NOT NULL,
    impressions BIGINT NOT NULL DEFAULT 0,
    clicks      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (hour_ms, version)
);

CREATE TRIGGER event_minutes_hours_insert AFTER INSERT ON event_minutes BEGIN
    INSERT INTO event_hours (hour_ms, kind, n) VALUES (NEW.minute_ms - ((NEW.minute_ms % 3600000) + 3600000) % 3600000, NEW.kind, NEW.n)
    ON CONFLICT (hour_ms, kind) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER event_minutes_hours_update AFTER UPDATE ON event_minutes BEGIN
    INSERT INTO event_hours (hour_ms, kind, n) VALUES (NEW.minute_ms - ((NEW.minute_ms % 3600000) + 3600000) % 3600000, NEW.kind, NEW.n - OLD.n)
    ON CONFLICT (hour_ms, kind) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER recommendation_minutes_hours_insert AFTER INSERT ON recommendation_minutes BEGIN
    INSERT INTO recommendation_hours (hour_ms, version, impressions, clicks)
    VALUES (NEW.minute_ms - ((NEW.minute_ms % 3600000) + 3600000) % 3600000, NEW.version, NEW.impressions, NEW.clicks)
    ON CONFLICT (hour_ms, version) DO UPDATE SET impressions = impressions + excluded.impressions,
        clicks = clicks + excluded.clicks;
END;
CREATE TRIGGER recommendation_minutes_hours_update AFTER UPDATE ON recommendation_minutes BEGIN
    INSERT INTO recommendation_hours (hour_ms, version, impressions, clicks)
    VALUES (NEW.minute_ms - ((NEW.minute_ms % 3600000) + 3600000) % 3600000, NEW.version, NEW.impressions - OLD.impressions, NEW.clicks - OLD.clicks)
    ON CONFLICT (hour_ms, version) DO UPDATE SET impressions = impressions + excluded.impressions,
        clicks = clicks + excluded.clicks;
END;

-- Every replica's heartbeat, written every `heartbeat_interval`; rows a
-- day old are removed.
CREATE TABLE replicas (
    id           TEXT PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    version      TEXT,
    trainer      INTEGER NOT NULL,
    training     INTEGER NOT NULL
);

-- What the store already holds, counted once.
INSERT INTO event_minutes (minute_ms, kind, n)
SELECT ts - ts % 60000, kind, COUNT(*) FROM events
WHERE ts >= CAST(strftime('%s', 'now') AS INTEGER) * 1000 - 8 * 86400000
GROUP BY 1, 2;

INSERT INTO item_days (item_id, day_ms, kind, n)
SELECT item_id, ts - ts % 86400000, kind, COUNT(*) FROM events
WHERE ts >= CAST(strftime('%s', 'now') AS INTEGER) * 1000 - 400 * 86400000
GROUP BY 1, 2, 3;
