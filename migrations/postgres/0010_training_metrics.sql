-- The held-out figures of each training (HR@10 and NDCG@10 of the model,
-- most-popular and item-kNN, as JSON), whether it was published or
-- rejected; NULL for a training that failed before it was evaluated, and
-- for trainings recorded before this column.
ALTER TABLE trainings ADD COLUMN metrics TEXT;
