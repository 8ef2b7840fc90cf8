-- pgbench script: the same 500 events inserted the way recd inserts a batch stored whole
-- today (src/store/events.rs, insert_events_sql!): the insert as a CTE returning the
-- stored rows, the per-minute pending row and the claimed per-item row.
-- See docs/benchmarks.md, "What keeping the counts costs ingest".
WITH stored AS (
    INSERT INTO events (event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at)
    SELECT 'pgb-' || :client_id || '-' || g || '-' || md5(random()::text), 'u' || (random() * 20000)::int, 'item-' || (random() * 5000)::int,
       (random() * 3)::int::int2, NULL::float8, 1795000000000 + (random() * 1500000000)::bigint, 's', NULL::text, 0
    FROM generate_series(1, 500) AS g
    ON CONFLICT (user_id, event_id, ts) DO NOTHING
    RETURNING seq, item_id, kind, ts, recommendation_id
), minutes AS (
    INSERT INTO event_minutes_pending (minutes, kinds, ns)
    SELECT array_agg(minute_ms), array_agg(kind), array_agg(n)
    FROM (SELECT ts - ts % 60000 AS minute_ms, kind, COUNT(*) AS n FROM stored WHERE ts >= 1796000000000 GROUP BY 1, 2) AS per_minute
    HAVING COUNT(*) > 0
), days AS (
    INSERT INTO item_days_pending (items, days, kinds, ns)
    SELECT array_agg(item_id), array_agg(day_ms), array_agg(kind), array_agg(n)
    FROM (SELECT item_id, ts - ts % 86400000 AS day_ms, kind, COUNT(*) AS n FROM stored
          WHERE ts >= 1700000000000 AND (SELECT COUNT(*) FROM stored) <> 500
          GROUP BY 1, 2, 3) AS per_item
    HAVING COUNT(*) > 0
), claimed AS (
    INSERT INTO item_days_pending (claimed_at, seq_min, seq_max)
    SELECT 0, MIN(seq), MAX(seq) FROM stored HAVING COUNT(*) = 500
    RETURNING id
)
SELECT (SELECT COUNT(*) FROM stored), (SELECT id FROM claimed);
