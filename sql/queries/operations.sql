-- name: insert_dead_letter
-- Part of `skip` (and of `on_error = "skip"`): record the stuck event, in the transaction that
-- also clears the projection's error (clear_failure, positions.sql) and moves its checkpoint past
-- the event.
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
-- The transaction the xmin horizon waits for: the oldest one still holding an xid, in any database
-- of the cluster (an xid from any database holds every snapshot's xmin), i.e. the snapshot's xmin
-- when it is below its xmax; no row when no transaction holds an xid. Its session is found through
-- pg_locks (every transaction holds a lock on its own xid; pg_locks is readable by every role and
-- shows every database), so pid, role, database and application are known whoever runs this.
-- State, transaction start and query come from pg_stat_activity, which shows them for other
-- roles' sessions only to pg_read_all_stats (or superuser): otherwise they are NULL (the query
-- too, not '<insufficient privilege>') and `visible` is false. A prepared transaction has no
-- session; pg_prepared_xacts names it.
-- `seconds` is the transaction's age where known (NULL otherwise).
WITH snapshot AS (SELECT pg_current_snapshot() AS s)
SELECT h.kind, h.pid, h.xid, age(h.xid::xid) AS xid_age, h.state, h.xact_start, h.query_start,
       h.query, h.usename, h.application_name, h.datname, h.visible,
       extract(epoch FROM now() - h.xact_start)::float8 AS seconds
FROM snapshot
CROSS JOIN LATERAL (
    SELECT 'session' AS kind, l.pid, l.transactionid::text AS xid, a.state, a.xact_start,
           a.query_start, CASE WHEN a.state IS NOT NULL THEN left(a.query, 300) END AS query,
           a.usename::text,
           a.application_name, a.datname::text, a.state IS NOT NULL AS visible
    FROM pg_locks l
    LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted
      AND l.transactionid = xid(pg_snapshot_xmin(snapshot.s))
    UNION ALL
    SELECT 'prepared', NULL, p.transaction::text, 'prepared', p.prepared, NULL,
           'PREPARE TRANSACTION ' || quote_literal(p.gid), p.owner::text, NULL,
           p.database::text, true
    FROM pg_prepared_xacts p
    WHERE p.transaction = xid(pg_snapshot_xmin(snapshot.s))
    LIMIT 1
) h
WHERE pg_snapshot_xmin(snapshot.s) < pg_snapshot_xmax(snapshot.s);
