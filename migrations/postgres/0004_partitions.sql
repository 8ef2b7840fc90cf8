-- Events partitioned by month of their timestamp, so that retention drops
-- whole old partitions and a window of recent events reads only its own.
-- An existing store is migrated in place: its rows move to the new table,
-- arrival numbers (`seq`) go on from the same sequence.
--
-- Unique keys include `user_id` (the distribution column, were the table
-- ever spread over Citus shards) and `ts` (the partition key, which every
-- unique key of a partitioned table must hold):
--
-- - the primary key is (user_id, ts, seq), which also serves a user's
--   newest events;
-- - idempotency is per user: the same `event_id` from the same user with
--   the same timestamp is the same event, at any age; from another user it
--   is another event. Events sent without a timestamp get the server's
--   clock, so their retries are recognised by `recent_event_ids` below.

ALTER TABLE events RENAME TO events_before_partitions;
ALTER TABLE events_before_partitions DROP CONSTRAINT IF EXISTS events_pkey;
ALTER TABLE events_before_partitions DROP CONSTRAINT IF EXISTS events_event_id_key;
DROP INDEX IF EXISTS events_user_ts;
DROP INDEX IF EXISTS events_ts;
DROP INDEX IF EXISTS events_recommendation;
ALTER SEQUENCE events_seq_seq OWNED BY NONE;

CREATE TABLE events (
    seq               BIGINT NOT NULL DEFAULT nextval('events_seq_seq'),
    event_id          TEXT,
    user_id           TEXT NOT NULL,
    item_id           TEXT NOT NULL,
    kind              SMALLINT NOT NULL,
    value             DOUBLE PRECISION,
    ts                BIGINT NOT NULL,
    session_id        TEXT,
    recommendation_id TEXT,
    received_at       BIGINT NOT NULL,
    PRIMARY KEY (user_id, ts, seq)
) PARTITION BY RANGE (ts);
ALTER SEQUENCE events_seq_seq OWNED BY events.seq;

-- NULL event ids are distinct: events sent without an id are all stored.
CREATE UNIQUE INDEX events_user_event ON events (user_id, event_id, ts);
-- Arrivals after a given number (new events, the trainer's cutoff).
CREATE INDEX events_seq ON events (seq);
CREATE INDEX events_ts ON events (ts);
-- Clicks are events that carry a recommendation id.
CREATE INDEX events_recommendation ON events (recommendation_id) WHERE recommendation_id IS NOT NULL;

-- The month partition holding `at` (ms since the epoch, UTC), made if
-- missing; named events_YYYYMM. Safe to call from several sessions at once.
CREATE FUNCTION recd_event_partition(at BIGINT) RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
    month TIMESTAMP := date_trunc('month', to_timestamp(at / 1000.0) AT TIME ZONE 'UTC');
    name  TEXT := 'events_' || to_char(month, 'YYYYMM');
    lo    BIGINT := (extract(epoch FROM month) * 1000)::BIGINT;
    hi    BIGINT := (extract(epoch FROM month + INTERVAL '1 month') * 1000)::BIGINT;
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN;
    END IF;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF events FOR VALUES FROM (%s) TO (%s)', name, lo, hi);
EXCEPTION
    -- Another session made it meanwhile.
    WHEN duplicate_table OR invalid_object_definition THEN NULL;
END;
$$;

SELECT recd_event_partition(m)
FROM (SELECT DISTINCT (extract(epoch FROM date_trunc('month', to_timestamp(ts / 1000.0) AT TIME ZONE 'UTC')) * 1000)::BIGINT AS m
      FROM events_before_partitions) AS months;

INSERT INTO events (seq, event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at)
SELECT seq, event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at
FROM events_before_partitions;

DROP TABLE events_before_partitions;

-- Ids of events sent without a timestamp in the last 24 hours, per user: a
-- retry of one within that time stores nothing. Older rows are forgotten
-- by the retention task; erasure deletes a user's.
CREATE TABLE recent_event_ids (
    user_id     TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, event_id)
);
CREATE INDEX recent_event_ids_received ON recent_event_ids (received_at);
