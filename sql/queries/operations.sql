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

-- name: insert_dead_letter
-- Part of `skip` (and of `on_error = "skip"`): record the stuck event and clear the projection's
-- error (a `failed` projection runs again), in the transaction that also moves its checkpoint
-- past the event.
WITH cleared AS (
    UPDATE {schema}.projection_positions
    SET last_error = NULL, updated_at = now(),
        state = CASE WHEN state = 'failed' THEN 'running' ELSE state END
    WHERE name = %(projection)s
)
INSERT INTO {schema}.dead_letters
    (projection, event_id, global_position, transaction_id, event_type, error_type,
     error_message, traceback, attempts)
VALUES (%(projection)s, %(event_id)s, %(global_position)s, %(transaction_id)s::xid8,
        %(event_type)s, %(error_type)s, %(error_message)s, %(traceback)s, %(attempts)s)
RETURNING id;

-- name: projection_lag
-- Lag of one projection: committed events of its types beyond its checkpoint, and the age in
-- seconds of the oldest of them (NULL when there are none).
SELECT count(*),
       extract(epoch FROM clock_timestamp() - min(recorded_at))::float8
FROM {schema}.events
WHERE (transaction_id, global_position) > (%(txid)s::xid8, %(position)s::bigint)
  AND type = ANY(%(types)s::text[]);

-- name: horizon_holder
-- The open transaction that holds the xmin horizon back: the oldest one with an xid, in any
-- database of the cluster (an xid from any database holds every snapshot's xmin). Prepared
-- transactions count too. Session details need pg_read_all_stats (or superuser) for sessions of
-- other roles; without it they come back NULL.
SELECT kind, pid, xid, xid_age, state, xact_start, query_start, query, usename,
       application_name, datname
FROM (
    SELECT 'session' AS kind, a.pid, a.backend_xid::text AS xid,
           age(a.backend_xid) AS xid_age, a.state, a.xact_start, a.query_start,
           left(a.query, 300) AS query, a.usename::text, a.application_name,
           a.datname::text
    FROM pg_stat_activity a
    WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
    UNION ALL
    SELECT 'prepared', NULL, p.transaction::text, age(p.transaction), 'prepared',
           p.prepared, NULL, 'PREPARE TRANSACTION ' || quote_literal(p.gid), p.owner::text,
           NULL, p.database::text
    FROM pg_prepared_xacts p
) holders
ORDER BY xid_age DESC
LIMIT 1;
