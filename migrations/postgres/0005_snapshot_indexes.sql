-- The nearest-neighbour index of a snapshot with a large catalogue, built
-- once by the trainer and loaded by every replica and restart. Its meta
-- says how it was built (JSON). Deleted with its snapshot.
CREATE TABLE snapshot_indexes (
    version TEXT PRIMARY KEY,
    meta    TEXT NOT NULL,
    bytes   BYTEA NOT NULL
);
