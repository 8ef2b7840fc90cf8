-- Trained models: safetensors bytes with the item id map and metrics in
-- their metadata. No user data. The newest few are kept.
CREATE TABLE snapshots (
    version    TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    meta       TEXT NOT NULL,
    bytes      BLOB NOT NULL
);
CREATE INDEX snapshots_created ON snapshots (created_at);
