-- name: ensure_position
INSERT INTO {schema}.projection_positions (name) VALUES (%(name)s) ON CONFLICT (name) DO NOTHING;

-- name: read_position
SELECT transaction_id::text, global_position, state, applied_total, last_error, owner
FROM {schema}.projection_positions WHERE name = %(name)s;

-- name: read_positions
SELECT name, transaction_id::text, global_position, state, applied_total, last_error, updated_at,
       owner
FROM {schema}.projection_positions ORDER BY name;

-- name: check_checkpoint
-- The compare-and-set's condition, read without a lock, at the start of a batch's transaction:
-- a runner whose last COMMIT landed although its answer was lost retries that batch from the
-- checkpoint before it, and must stop before its handler meets its own rows (a duplicate key
-- would be taken for a poison event). Raises PJ001 like advance_checkpoint. Taking no lock, it
-- lets a pause answer at once; advance_checkpoint, at the end, still decides.
SELECT CASE WHEN EXISTS (
           SELECT FROM {schema}.projection_positions
           WHERE name = %(name)s
             AND transaction_id = %(old_txid)s::xid8
             AND global_position = %(old_position)s
             AND (state = 'running' OR %(even_if_paused)s)
             AND owner IS NOT DISTINCT FROM %(owner)s)
       THEN true
       ELSE {schema}.checkpoint_moved(%(name)s) END;

-- name: advance_checkpoint
-- Compare-and-set: moves the checkpoint only from the value this runner last read, so a second
-- writer of the same projection (or a reset by an operator) makes the batch roll back.
-- A committed pause (or a `failed` state) also makes it roll back: no batch commits after `pause`
-- has answered (an operator's `skip` passes even_if_paused). So does a change of owner: a runner
-- whose daemon lost the projection to another instance cannot commit after the new owner took
-- over (projectord/ownership.py records the owner; NULL when no daemon ever owned the row).
-- A row that does not match raises SQLSTATE PJ001 (sql/migrations/0008_checkpoint_moved_error.sql):
-- the error, not a row count, is what stops the batch, so COMMIT may be sent along with it.
WITH moved AS (
    UPDATE {schema}.projection_positions
    SET transaction_id = %(new_txid)s::xid8,
        global_position = %(new_position)s,
        applied_total = applied_total + %(applied)s,
        last_error = CASE WHEN %(applied)s > 0 THEN NULL ELSE last_error END,
        updated_at = now()
    WHERE name = %(name)s
      AND transaction_id = %(old_txid)s::xid8
      AND global_position = %(old_position)s
      AND (state = 'running' OR %(even_if_paused)s)
      AND owner IS NOT DISTINCT FROM %(owner)s
    RETURNING 1
)
SELECT CASE WHEN EXISTS (SELECT FROM moved) THEN true
            ELSE {schema}.checkpoint_moved(%(name)s) END;

-- name: record_error
UPDATE {schema}.projection_positions
SET last_error = %(error)s, updated_at = now()
WHERE name = %(name)s;

-- name: mark_failed
-- `on_error = "pause"`: the projection stops on its poison event until `resume` or `skip`. The
-- state survives a restart and a change of owner, so no instance retries it on its own.
UPDATE {schema}.projection_positions
SET state = CASE WHEN state = 'running' THEN 'failed' ELSE state END,
    last_error = %(error)s, updated_at = now()
WHERE name = %(name)s AND owner IS NOT DISTINCT FROM %(owner)s
RETURNING state;
