-- name: offer_wakeup
-- The first step of an arming (sql/migrations/0018_one_notifier_per_arming.sql): the next append
-- that finds a listener armed takes this wake-up and notifies. Waits (lock_timeout) while an append
-- that took the previous one has not ended.
UPDATE {schema}.wakeups SET armed = true;

-- name: arm_wakeups
-- From now on, appends notify, the first one only: take every ARMED stripe in share mode, in
-- order. Returns once every append that decided not to notify because no listener was armed has
-- ended; the connection's lock_timeout bounds the wait.
SELECT pg_catalog.count(pg_advisory_lock_shared(hashtext(%(channel)s || '/armed'), stripe)::text)
FROM generate_series(0, 63) AS stripe;

-- name: wait_for_silent_appends
-- The last step of an arming: wait for every append that found a listener armed but the wake-up
-- already taken (it holds a SILENT stripe until it ends): take each stripe in share mode, which
-- waits for its holder, and let go of it at once (the subquery hands each stripe over as soon as
-- it is taken). The connection's lock_timeout bounds each wait.
SELECT pg_catalog.count(pg_advisory_unlock_shared(hashtext(%(channel)s || '/silent'), stripe))
FROM (SELECT stripe FROM generate_series(0, 63) AS stripe
      WHERE pg_advisory_lock_shared(hashtext(%(channel)s || '/silent'), stripe)::text IS NOT NULL
      OFFSET 0) AS taken;

-- name: disarm_wakeups
-- Appends stop notifying: release the stripes (the listener's connection holds no other advisory
-- lock). Closing the connection releases them too.
SELECT pg_advisory_unlock_all();

-- name: poll_events
-- The daemon's poll, for every projection at once: has any event committed since the snapshot
-- whose xmin was `since`? A transaction that commits after a snapshot has an xid at or above the
-- snapshot's xmin, so this probes the end of the commit-order index once (the newest id, not an
-- EXISTS, which a cached generic plan may turn into a scan of the whole table).
SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon,
       coalesce((SELECT e.transaction_id FROM {schema}.events e
                 ORDER BY e.transaction_id DESC LIMIT 1) >= %(since)s::xid8, false) AS new;

-- name: armed_listeners
-- How many listeners are armed: the sessions holding ARMED stripe 0 in share mode.
SELECT count(*)
FROM pg_locks
WHERE locktype = 'advisory' AND granted AND mode = 'ShareLock' AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = hashtext(%(channel)s || '/armed')::oid
  AND objid = 0::oid;

-- name: wakeup_strangers
-- Sessions of other roles than the daemon's holding the channel's wake-up stripes with no xid of
-- their own: not appends deciding whether to notify (they hold a stripe only inside a transaction
-- that has written, so with an xid), but someone holding them on purpose. Held exclusively, they
-- make arming time out (the runners poll); in share mode, every append notifies. An xid-holding
-- session is reported as `horizon_held` instead. pg_locks and these columns of pg_stat_activity
-- are readable by every role (docs/security-locks.md).
SELECT l.pid, a.usename::text, a.datname::text, a.application_name,
       count(*) FILTER (WHERE l.mode = 'ExclusiveLock') AS exclusive,
       count(*) FILTER (WHERE l.mode = 'ShareLock') AS shared
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid IN (hashtext(%(channel)s)::oid, hashtext(%(channel)s || '/armed')::oid,
                    hashtext(%(channel)s || '/silent')::oid)
  AND NOT pg_has_role(a.usesysid, current_user, 'MEMBER')
  AND NOT EXISTS (SELECT 1 FROM pg_locks x
                  WHERE x.pid = l.pid AND x.locktype = 'transactionid' AND x.granted)
GROUP BY l.pid, a.usename, a.datname, a.application_name
ORDER BY l.pid;
