-- name: store_command
-- Store a new command as pending; an id that exists already is left as it is (idempotency key).
-- Returns a row only when this call stored it.
INSERT INTO {schema}.commands (id, tenant_id, type, payload, metadata)
VALUES (%(id)s, %(tenant_id)s, %(type)s, %(payload)s, %(metadata)s)
ON CONFLICT (id) DO NOTHING
RETURNING id;

-- name: lock_command
-- The stored command, locked until the deciding transaction ends, so two dispatchers of one id
-- take turns and the second sees the first one's outcome.
SELECT id, tenant_id, type, payload, metadata, status, aggregate_id, result, error, attempts
FROM {schema}.commands WHERE id = %(id)s
FOR UPDATE;

-- name: read_command
SELECT id, tenant_id, type, payload, metadata, status, aggregate_id, result, error, attempts
FROM {schema}.commands WHERE id = %(id)s;

-- name: finish_command
-- Record the outcome of a pending command: consumed with its result, or failed with its error.
UPDATE {schema}.commands
SET status = %(status)s, aggregate_id = %(aggregate_id)s, result = %(result)s, error = %(error)s,
    attempts = %(attempts)s, updated_at = now()
WHERE id = %(id)s AND status = 'pending';

-- name: mark_command_processed
-- A read-your-writes dispatch saw the projections it waited for apply the command's events.
UPDATE {schema}.commands
SET status = 'processed', updated_at = now()
WHERE id = %(id)s AND status = 'consumed';

-- name: read_committed
-- Each statement of the deciding transaction sees what other writers committed before it, so a
-- reload after a version conflict sees the events that won.
SET TRANSACTION ISOLATION LEVEL READ COMMITTED;

-- name: current_transaction_id
SELECT pg_current_xact_id()::text;
