-- name: session_setup
-- Run once on every connection the daemon opens: session settings (the server-side TCP
-- keepalives and user timeout of projectord/database.py, the pool's search_path) in one round
-- trip, and this session's identity (pid and start time), so that a connection given up as dead
-- can have its backend terminated later without hitting a new session that reuses the pid.
SELECT (SELECT pg_catalog.count(set_config(s.name, s.value, false))
        FROM ROWS FROM (pg_catalog.unnest(%(names)s::text[]), pg_catalog.unnest(%(values)s::text[]))
             AS s(name, value)) AS settings,
       pg_backend_pid() AS pid,
       (SELECT a.backend_start FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()) AS started;

-- name: terminate_sessions
-- End the server sessions of connections the daemon gave up as dead (a silent partition leaves
-- them alive on the server, holding their locks, their transaction's xid and, for a listener, the
-- notification queue). Matched on pid and start time: a pid reused by a new session is spared.
SELECT pg_catalog.count(pg_terminate_backend(a.pid))
FROM pg_stat_activity a
JOIN ROWS FROM (pg_catalog.unnest(%(pids)s::int[]), pg_catalog.unnest(%(starts)s::timestamptz[]))
     AS z(pid, started)
  ON a.pid = z.pid AND a.backend_start = z.started
WHERE a.pid <> pg_backend_pid();

-- name: notification_queue_usage
-- The fraction of the server's notification queue in use (health: a listener that never reads,
-- such as a dead client's LISTEN session, pins it until NOTIFY fails).
SELECT pg_notification_queue_usage();

-- name: session_working
-- Whether a session (pid and start time) is running a statement, not waiting for its client: a
-- pipelined batch's answer is awaited for as long as this holds (projectord/runner/commit_watch.py).
-- `ClientRead`/`ClientWrite` waits mean the server waits for a client that is gone or silent.
SELECT EXISTS (
    SELECT FROM pg_catalog.pg_stat_activity a
    WHERE a.pid = %(pid)s
      AND a.backend_start = %(started)s
      AND a.state = 'active'
      AND a.wait_event_type IS DISTINCT FROM 'Client');
