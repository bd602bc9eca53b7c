-- The positions table, projection_positions: one row per projection, its checkpoint and state.
-- Every statement on it is here, and only projectord/runner/checkpoint_store.py runs them.

-- name: ensure_position
-- A new row is at the start, for the version of the code that creates it (a projection declared
-- at version 3 on a fresh database has nothing to build blue/green: its tables are version 3's).
INSERT INTO {schema}.projection_positions (name, version) VALUES (%(name)s, %(version)s)
ON CONFLICT (name) DO NOTHING;

-- name: read_position
SELECT name, transaction_id::text, global_position, state, applied_total, last_error, updated_at,
       owner, version
FROM {schema}.projection_positions WHERE name = %(name)s;

-- name: read_positions
SELECT name, transaction_id::text, global_position, state, applied_total, last_error, updated_at,
       owner, version
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
             AND owner IS NOT DISTINCT FROM %(owner)s
             AND version = %(version)s)
       THEN true
       ELSE {schema}.checkpoint_moved(%(name)s) END;

-- name: advance_checkpoint
-- Compare-and-set: moves the checkpoint only from the value this runner last read, so a second
-- writer of the same projection (or a reset by an operator) makes the batch roll back.
-- A committed pause (or a `failed` state) also makes it roll back: no batch commits after `pause`
-- has answered (an operator's `skip` passes even_if_paused). So does a change of owner: a runner
-- whose daemon lost the projection to another instance cannot commit after the new owner took
-- over (projectord/daemon/ownership.py records the owner; NULL when no daemon ever owned the row).
-- So does another version: the code of version N commits only into the tables of version N (the
-- row's `version`, sql/migrations/0019_projection_versions.sql), even right after a swap that left
-- the checkpoint equal to the one this runner read.
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
      AND version = %(version)s
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

-- name: delete_position
DELETE FROM {schema}.projection_positions WHERE name = %(name)s;

-- name: take_over_position
-- The swap: the live projection continues from where its shadow stopped, with the shadow's count.
UPDATE {schema}.projection_positions AS live
SET transaction_id = shadow.transaction_id,
    global_position = shadow.global_position,
    applied_total = shadow.applied_total,
    last_error = NULL,
    updated_at = now()
FROM {schema}.projection_positions AS shadow
WHERE live.name = %(name)s AND shadow.name = %(shadow)s
RETURNING live.transaction_id::text, live.global_position, live.applied_total;

-- name: lock_position
-- Holds the projection's checkpoint still while a dead letter is re-applied: no batch, rebuild or
-- skip of it commits in between, so "caught up past the event" stays true until the commit.
SELECT transaction_id::text::bigint, global_position
FROM {schema}.projection_positions
WHERE name = %(name)s
FOR UPDATE;

-- name: set_projection_state
-- Pause or resume. The runner's compare-and-set checks the state, so once a pause has committed
-- no batch of this projection commits. Returns nothing for an unknown projection.
UPDATE {schema}.projection_positions
SET state = %(state)s, updated_at = now()
WHERE name = %(name)s
RETURNING state;

-- name: reset_position
-- The checkpoint part of a rebuild (the caller empties the tables in the same transaction).
UPDATE {schema}.projection_positions
SET transaction_id = '0', global_position = 0, applied_total = 0, last_error = NULL,
    state = 'running', updated_at = now()
WHERE name = %(name)s;

-- name: owners
-- Whom the positions rows name, so a daemon that holds a projection's lock can take the row back
-- when it names someone else (a race with a rekey, or an old daemon) and its runner stands by.
SELECT name, owner FROM {schema}.projection_positions WHERE name = ANY(%(names)s::text[]);

-- name: record_owner
-- A missing row is created for the version of the daemon's code that takes it; a row of another
-- version is left alone (a swap committed since the daemon last looked: its code may not run it,
-- and it gives the projection up on its next turn). Returns a row when the owner was recorded.
INSERT INTO {schema}.projection_positions AS p (name, owner, version)
VALUES (%(name)s, %(owner)s, %(version)s)
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner WHERE p.version = excluded.version
RETURNING 1;

-- name: projection_has_applied_events
-- Whether the projection's checkpoint is past any event of its types: then its tables hold state
-- computed from events, and a table recreated empty would be wrong.
SELECT EXISTS (
    SELECT 1
    FROM {schema}.projection_positions p
    JOIN {schema}.events e
      ON (e.transaction_id, e.global_position) <= (p.transaction_id, p.global_position)
    WHERE p.name = %(name)s AND e.type = ANY(%(types)s::text[])
);

-- name: count_retried
-- A dead letter re-applied (projectord/runner/dead_letters.py): one event more applied, in the
-- retry's transaction, which holds the row (lock_position).
UPDATE {schema}.projection_positions
SET applied_total = applied_total + 1, updated_at = now()
WHERE name = %(name)s;

-- name: clear_failure
-- Part of `skip` (and of `on_error = "skip"`), with insert_dead_letter: clear the projection's
-- error (a `failed` projection runs again), in the transaction that also moves its checkpoint
-- past the event.
UPDATE {schema}.projection_positions
SET last_error = NULL, updated_at = now(),
    state = CASE WHEN state = 'failed' THEN 'running' ELSE state END
WHERE name = %(name)s;

-- name: newest_checkpoint_transaction
-- The highest transaction id of any checkpoint (projectord/daemon/foreign_ids.py): read before
-- the server's next id, so a checkpoint that moves in between is still below that id.
SELECT p.transaction_id::text::bigint FROM {schema}.projection_positions p
ORDER BY p.transaction_id DESC LIMIT 1;

-- name: serving_versions
-- The version each projection's live tables are (its row's); a projection without a row has none.
SELECT name, version FROM {schema}.projection_positions WHERE name = ANY(%(names)s::text[]);

-- name: keep_position
-- A versioned swap: the checkpoint of the tables leaving service is kept, under `NAME#vN`, for a
-- rollback; they were locked, so it is theirs exactly.
INSERT INTO {schema}.projection_positions AS k
    (name, transaction_id, global_position, state, applied_total, version)
SELECT %(kept)s, transaction_id, global_position, 'running', applied_total, version
FROM {schema}.projection_positions WHERE name = %(name)s
ON CONFLICT (name) DO UPDATE
SET transaction_id = excluded.transaction_id, global_position = excluded.global_position,
    state = 'running', applied_total = excluded.applied_total, version = excluded.version,
    last_error = NULL, owner = NULL, updated_at = now();

-- name: exchange_positions
-- A swap of a rebuild of the serving version (a versioned drift repair, or a rollback to the
-- tables it replaced): the live row continues from the build's checkpoint, and the build's row
-- `NAME#vN` keeps the live one's, for the tables that leave service. One statement, so each row
-- reads the other as it was. Each row keeps its owner: the same code runs the live one on (its
-- runner's next compare-and-set finds the checkpoint moved and reloads it), and whoever takes the
-- build's unit again (a rollback) records itself.
UPDATE {schema}.projection_positions AS p
SET transaction_id = o.transaction_id,
    global_position = o.global_position,
    applied_total = o.applied_total,
    state = CASE WHEN p.name = %(name)s AND p.state <> 'failed' THEN p.state ELSE 'running' END,
    last_error = NULL,
    updated_at = now()
FROM {schema}.projection_positions AS o
WHERE (p.name = %(name)s AND o.name = %(built)s) OR (p.name = %(built)s AND o.name = %(name)s)
RETURNING p.name, p.transaction_id::text, p.global_position, p.applied_total, p.version;

-- name: take_over_version
-- A versioned swap: the live row continues from where the new version's build stopped, as that
-- version. No owner: the daemons whose code is that version take it on their next turn, and the
-- runner of the previous owner finds its compare-and-set refused (owner and version differ).
UPDATE {schema}.projection_positions AS live
SET transaction_id = built.transaction_id,
    global_position = built.global_position,
    applied_total = built.applied_total,
    version = built.version,
    state = CASE WHEN live.state = 'failed' THEN 'running' ELSE live.state END,
    owner = NULL,
    last_error = NULL,
    updated_at = now()
FROM {schema}.projection_positions AS built
WHERE live.name = %(name)s AND built.name = %(built)s
RETURNING live.transaction_id::text, live.global_position, live.applied_total, live.version;
