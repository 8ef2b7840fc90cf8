-- Ratings of one item, each user's newest first (GET /v1/items/{id}/stats),
-- and every rating without the rest of the events (the per-category and
-- shop-wide rating figures made in the background). Partial: only rating
-- events (kind 6), a small part of the table; `value` and `kind` are in it
-- so that those reads need not visit the table. Made on every month partition,
-- and on each new one.
CREATE INDEX events_item_ratings ON events (item_id, user_id, ts, seq, value, kind) WHERE kind = 6;
