-- name: arm_wakeups
-- From now on, appends notify (sql/migrations/0006_notify_only_when_asleep.sql): take every stripe
-- of the channel's advisory lock in share mode, in order. Returns once every writer that decided
-- not to notify has ended; the connection's lock_timeout bounds the wait.
SELECT count(pg_advisory_lock_shared(hashtext(%(channel)s), stripe)::text)
FROM generate_series(0, 63) AS stripe;

-- name: disarm_wakeups
-- Appends stop notifying: release the stripes (the listener's connection holds no other advisory
-- lock). Closing the connection releases them too.
SELECT pg_advisory_unlock_all();

-- name: poll_events
-- The daemon's poll, for every projection at once: has any event committed since the snapshot
-- whose xmin was `since`? A transaction that commits after a snapshot has an xid at or above the
-- snapshot's xmin, so this probes the commit-order index once. Returns this snapshot's xmin.
SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon,
       EXISTS (SELECT 1 FROM {schema}.events e WHERE e.transaction_id >= %(since)s::xid8) AS new;

-- name: armed_listeners
-- How many listeners are armed: the sessions holding stripe 0 in share mode.
SELECT count(*)
FROM pg_locks
WHERE locktype = 'advisory' AND granted AND mode = 'ShareLock' AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = hashtext(%(channel)s)::oid
  AND objid = 0;
