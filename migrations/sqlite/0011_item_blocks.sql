-- Events per item and kind are kept per block of 32 days (UTC, counted
-- from the epoch) instead of per day: one row holds the block's 32 daily
-- counts, as 32 big-endian 8-byte integers. A year of history is then at
-- most 12 rows per item and kind instead of 365, and folding an import of
-- history writes a row per item, kind and block it touches instead of one
-- per day. Only the background fold writes it: it adds the pending counts
-- in memory and writes whole rows.
CREATE TABLE item_blocks (
    item_id  TEXT NOT NULL,
    block_ms BIGINT NOT NULL,
    kind     INTEGER NOT NULL,
    counts   BLOB NOT NULL,
    PRIMARY KEY (item_id, block_ms, kind)
);

-- What item_days held goes back to pending, a row per block, and is folded
-- into item_blocks by the next folds.
INSERT INTO item_days_pending (counts)
SELECT json_group_array(json_array(item_id, day_ms, kind, n))
FROM item_days
GROUP BY day_ms - ((day_ms % 2764800000) + 2764800000) % 2764800000;

DROP TABLE item_days;
