-- Events per item and kind are kept per block of 32 days (UTC, counted
-- from the epoch) instead of per day: one row holds the block's 32 daily
-- counts, as 32 big-endian 8-byte integers. A year of history is then at
-- most 12 rows per item and kind instead of 365, and folding an import of
-- history writes a row per item, kind and block it touches instead of one
-- per day. Only the background fold writes it (under its advisory lock):
-- it adds the pending counts in memory and writes whole rows.
CREATE TABLE item_blocks (
    item_id  TEXT NOT NULL,
    block_ms BIGINT NOT NULL,
    kind     SMALLINT NOT NULL,
    counts   BYTEA NOT NULL,
    PRIMARY KEY (item_id, block_ms, kind)
);

-- Each pending row gets an id. When every event of a batch was stored,
-- its row holds no counts: only `claimed_at`, the time it was stored, and
-- the least and greatest `seq` of the batch's events. The replica that
-- stored such a batch adds its counts up in memory and folds the row by id,
-- without reading it back; other replicas fold a claimed row only once it
-- is older than a grace period (its replica may have stopped), and then
-- count its events again from `events`: those in its range of `seq` that
-- the same transaction wrote (the same `xmin` as the row).
ALTER TABLE item_days_pending ADD COLUMN id BIGINT GENERATED ALWAYS AS IDENTITY;
ALTER TABLE item_days_pending ADD COLUMN claimed_at BIGINT;
ALTER TABLE item_days_pending ADD COLUMN seq_min BIGINT;
ALTER TABLE item_days_pending ADD COLUMN seq_max BIGINT;
ALTER TABLE item_days_pending ALTER COLUMN items DROP NOT NULL, ALTER COLUMN days DROP NOT NULL,
    ALTER COLUMN kinds DROP NOT NULL, ALTER COLUMN ns DROP NOT NULL;

-- What item_days held goes back to pending, a row per block, and is folded
-- into item_blocks by the next folds.
INSERT INTO item_days_pending (items, days, kinds, ns)
SELECT array_agg(item_id), array_agg(day_ms), array_agg(kind), array_agg(n)
FROM item_days
GROUP BY day_ms - ((day_ms % 2764800000) + 2764800000) % 2764800000;

DROP TABLE item_days;
