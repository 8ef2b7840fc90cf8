-- pgbench script: 500 generated events inserted as recd did before the dashboard's counts.
-- See docs/benchmarks.md, "What keeping the counts costs ingest".
INSERT INTO events (event_id, user_id, item_id, kind, value, ts, session_id, recommendation_id, received_at)
SELECT 'pgb-' || :client_id || '-' || g || '-' || md5(random()::text), 'u' || (random() * 20000)::int, 'item-' || (random() * 5000)::int,
       (random() * 3)::int::int2, NULL::float8, 1795000000000 + (random() * 1500000000)::bigint, 's', NULL::text, 0
FROM generate_series(1, 500) AS g ON CONFLICT (user_id, event_id, ts) DO NOTHING;
