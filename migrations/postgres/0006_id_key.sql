-- De-identified storage: with the `id_key` setting, shoppers' user ids and
-- session ids are stored encrypted (deterministic AES-SIV). This one row
-- holds the fingerprint of the key they are encrypted with (derived from
-- it, revealing nothing of it); recd refuses to start with another key, or
-- without one. No row: the ids are stored as the shop sent them.
-- `recd rotate-id-key` rewrites the ids and this row together.
CREATE TABLE id_key_fingerprint (
    one         INTEGER PRIMARY KEY CHECK (one = 1),
    fingerprint TEXT NOT NULL,
    set_at      BIGINT NOT NULL
);
