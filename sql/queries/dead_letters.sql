-- name: list_dead_letters
-- Dead letters, oldest first: pending ones, or all with include_resolved.
SELECT id, projection, event_id::text, global_position, transaction_id::text, event_type,
       error_type, error_message, traceback, attempts, created_at, resolved_at, resolution
FROM {schema}.dead_letters
WHERE (resolved_at IS NULL OR %(include_resolved)s)
  AND (projection = %(projection)s OR %(projection)s::text IS NULL)
ORDER BY id;

-- name: pending_dead_letter_ids
SELECT id FROM {schema}.dead_letters
WHERE resolved_at IS NULL AND projection = ANY(%(names)s::text[])
ORDER BY id;

-- name: lock_dead_letter
-- A retry's first step: the dead letter, locked against a concurrent retry of it, with its event.
SELECT d.projection, d.resolution, e.global_position, e.event_id, e.tenant_id, e.aggregate_id,
       e.aggregate_type, e.version, e.type, e.payload, e.metadata, e.recorded_at,
       e.transaction_id::text::bigint, e.schema_version
FROM {schema}.dead_letters d
LEFT JOIN {schema}.events e ON e.event_id = d.event_id
WHERE d.id = %(id)s
FOR UPDATE OF d;

-- name: mark_retried
-- The retry's transaction also counts the event as applied (count_retried, positions.sql).
UPDATE {schema}.dead_letters SET resolved_at = now(), resolution = 'retried' WHERE id = %(id)s;

-- name: resolve_by_rebuild
-- Part of a rebuild, in its transaction: the projection starts over from the first event and
-- meets its dead-lettered events again (it applies them, or dead-letters them anew), so a retry
-- of the old dead letters would apply them twice.
UPDATE {schema}.dead_letters SET resolved_at = now(), resolution = 'rebuilt'
WHERE projection = %(projection)s AND resolved_at IS NULL;

-- name: record_retry_failure
UPDATE {schema}.dead_letters
SET error_type = %(error_type)s, error_message = %(error_message)s, traceback = %(traceback)s,
    attempts = attempts + 1
WHERE id = %(id)s;
