-- A compare-and-set of a checkpoint that finds the row moved fails with its own SQLSTATE, PJ001,
-- instead of updating no row. A runner can then send its batch's statements, the compare-and-set
-- and COMMIT together (psycopg's pipeline mode: one round trip) and still never commit a batch
-- whose checkpoint moved: the error aborts the transaction before its COMMIT runs.
-- (sql/queries/positions.sql, advance_checkpoint; projectord/runner.py, CheckpointMoved)
CREATE OR REPLACE FUNCTION checkpoint_moved(projection text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'the checkpoint of projection % moved (another writer, a reset, a pause or a new owner)',
        projection
        USING ERRCODE = 'PJ001';
END;
$$;
