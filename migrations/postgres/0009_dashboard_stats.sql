-- The dashboard's figures, kept as events and answers are recorded so that
-- no request scans the events (GET /v1/stats/*, /v1/items/{id}/activity,
-- /v1/replicas). None holds a user id: erasing a shopper leaves them as
-- they are. Times are ms since the epoch, UTC.

-- Events per minute of their own timestamp and kind, added to by every
-- ingest batch (in the statement that stores it). Minutes older than
-- `minute_stats_retention` (8 days) are deleted in the background.
CREATE TABLE event_minutes (
    minute_ms BIGINT NOT NULL,
    kind      SMALLINT NOT NULL,
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
    kind    SMALLINT NOT NULL,
    n       BIGINT NOT NULL,
    PRIMARY KEY (item_id, day_ms, kind)
);

-- One row per ingest batch: its counts per (item, day, kind) as four
-- arrays of equal length.
CREATE TABLE item_days_pending (
    items TEXT[] NOT NULL,
    days  BIGINT[] NOT NULL,
    kinds SMALLINT[] NOT NULL,
    ns    BIGINT[] NOT NULL
);

-- On PostgreSQL ingest does not upsert event_minutes either: every batch
-- would wait for the one before it to commit (they share the current
-- minute's rows), losing group commit. Each batch's per-minute counts go
-- into event_minutes_pending as one row, and its clicks into
-- recommendation_minutes_pending, folded in every `minute_stats_fold`.
CREATE TABLE event_minutes_pending (
    minutes BIGINT[] NOT NULL,
    kinds   SMALLINT[] NOT NULL,
    ns      BIGINT[] NOT NULL
);
CREATE TABLE recommendation_minutes_pending (
    minute_ms BIGINT NOT NULL,
    version   TEXT NOT NULL,
    clicks    BIGINT NOT NULL
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
    kind    SMALLINT NOT NULL,
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

CREATE FUNCTION recd_event_hours() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_hours (hour_ms, kind, n)
    VALUES (NEW.minute_ms - ((NEW.minute_ms % 3600000) + 3600000) % 3600000, NEW.kind,
            NEW.n - CASE WHEN TG_OP = 'UPDATE' THEN OLD.n ELSE 0 END)
    ON CONFLICT (hour_ms, kind) DO UPDATE SET n = event_hours.n + EXCLUDED.n;
    RETURN NULL;
END $$;
CREATE TRIGGER event_minutes_hours AFTER INSERT OR UPDATE ON event_minutes
    FOR EACH ROW EXECUTE FUNCTION recd_event_hours();

CREATE FUNCTION recd_recommendation_hours() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO recommendation_hours (hour_ms, version, impressions, clicks)
    VALUES (NEW.minute_ms - ((NEW.minute_ms % 3600000) + 3600000) % 3600000, NEW.version,
            NEW.impressions - CASE WHEN TG_OP = 'UPDATE' THEN OLD.impressions ELSE 0 END,
            NEW.clicks - CASE WHEN TG_OP = 'UPDATE' THEN OLD.clicks ELSE 0 END)
    ON CONFLICT (hour_ms, version) DO UPDATE SET impressions = recommendation_hours.impressions + EXCLUDED.impressions,
        clicks = recommendation_hours.clicks + EXCLUDED.clicks;
    RETURN NULL;
END $$;
CREATE TRIGGER recommendation_minutes_hours AFTER INSERT OR UPDATE ON recommendation_minutes
    FOR EACH ROW EXECUTE FUNCTION recd_recommendation_hours();

-- Every replica's heartbeat, written every `heartbeat_interval`; rows a
-- day old are removed.
CREATE TABLE replicas (
    id           TEXT PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    version      TEXT,
    trainer      BOOLEAN NOT NULL,
    training     BOOLEAN NOT NULL
);

-- What the store already holds, counted once.
INSERT INTO event_minutes (minute_ms, kind, n)
SELECT ts - ts % 60000, kind, COUNT(*) FROM events
WHERE ts >= (extract(epoch FROM now()) * 1000)::BIGINT - 8 * 86400000
GROUP BY 1, 2;

INSERT INTO item_days (item_id, day_ms, kind, n)
SELECT item_id, ts - ts % 86400000, kind, COUNT(*) FROM events
WHERE ts >= (extract(epoch FROM now()) * 1000)::BIGINT - 400 * 86400000::BIGINT
GROUP BY 1, 2, 3;
