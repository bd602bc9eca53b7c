-- Advisory locks of one installation. Their keys are random, stored in {schema}.lock_keys, which
-- only the daemon's role can read (sql/migrations/0014_lock_keys.sql): a role that can merely
-- connect cannot know a key before a daemon holds it. Session locks: they end with the session.
-- "Daemon" below means a session of the daemon's role or of a member of it.
-- A bigint key shows in pg_locks as classid (high 32 bits), objid (low 32 bits), objsubid 1.

-- name: ensure_lock_keys
-- A random key for each of these locks that has none yet.
INSERT INTO {schema}.lock_keys (purpose, name)
SELECT %(purpose)s, n FROM pg_catalog.unnest(%(names)s::text[]) AS n
ON CONFLICT (purpose, name) DO NOTHING;

-- name: lock_keys
SELECT purpose, name, key FROM {schema}.lock_keys WHERE purpose = ANY(%(purposes)s::text[]);

-- name: lock_key
-- A lock's key as it is now, read right after taking the lock under the key read earlier: a
-- daemon (or a whole turn) may have drawn a new key in between, and a daemon holding a key that is
-- no longer the lock's must not count itself owner (two daemons would own it). FOR SHARE waits for
-- a rekey in flight (its UPDATE holds the row until it commits) and then reads the new key.
SELECT key FROM {schema}.lock_keys WHERE purpose = %(purpose)s AND name = %(name)s FOR SHARE;

-- name: try_lock
SELECT pg_try_advisory_lock(%(key)s::bigint);

-- name: try_lock_instance
SELECT pg_try_advisory_lock_shared(%(key)s::bigint);

-- name: release_projection
SELECT pg_advisory_unlock(%(key)s::bigint);

-- name: release_instance
SELECT pg_advisory_unlock_shared(%(key)s::bigint);

-- name: count_instances
-- Live daemons: the sessions holding the shared instance lock whose role is the daemon's (or a
-- member of it). A stranger who saw the key in pg_locks and took it too does not count (it would
-- shrink every daemon's share). pg_locks, pg_stat_activity's pid and usesysid are readable by every role.
SELECT pg_catalog.count(DISTINCT l.pid)
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = ((%(key)s::bigint >> 32) & 4294967295)::oid
  AND l.objid = (%(key)s::bigint & 4294967295)::oid
  AND pg_has_role(a.usesysid, current_user, 'MEMBER');

-- name: rekey_lock
-- A lock whose key is held only by strangers (sessions of roles that are not members of the
-- daemon's, which cannot read lock_keys: they saw the key in pg_locks and took it once it was free) gets a new random key, and the daemons
-- use that one from their next turn. Held by a daemon, or free: nothing changes (no row).
UPDATE {schema}.lock_keys k
SET key = ('x' || translate(gen_random_uuid()::text, '-', ''))::bit(64)::bigint
WHERE k.purpose = %(purpose)s AND k.name = %(name)s AND k.key = %(key)s::bigint
  AND NOT EXISTS (
      SELECT 1
      FROM pg_locks l
      JOIN pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND l.classid = ((k.key >> 32) & 4294967295)::oid
        AND l.objid = (k.key & 4294967295)::oid
        AND pg_has_role(a.usesysid, current_user, 'MEMBER'))
  AND EXISTS (
      SELECT 1 FROM pg_locks l
      WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND l.classid = ((k.key >> 32) & 4294967295)::oid
        AND l.objid = (k.key & 4294967295)::oid)
RETURNING k.key;

-- name: rekey_instance_lock
-- The shared instance lock gets a new key when a stranger holds it exclusively, or merely WAITS
-- for it exclusively: PostgreSQL queues a new request behind a waiting conflicting one, so a
-- stranger's queued pg_advisory_lock() makes every new daemon's pg_try_advisory_lock_shared()
-- fail while the daemons already running hold it. Daemons only ever take this key in share mode,
-- so any exclusive request on it from a stranger is hostile.
UPDATE {schema}.lock_keys k
SET key = ('x' || translate(gen_random_uuid()::text, '-', ''))::bit(64)::bigint
WHERE k.purpose = %(purpose)s AND k.name = %(name)s AND k.key = %(key)s::bigint
  AND EXISTS (
      SELECT 1
      FROM pg_locks l
      JOIN pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'advisory' AND l.mode = 'ExclusiveLock' AND l.objsubid = 1
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND l.classid = ((k.key >> 32) & 4294967295)::oid
        AND l.objid = (k.key & 4294967295)::oid
        AND NOT pg_has_role(a.usesysid, current_user, 'MEMBER'))
RETURNING k.key;

-- name: locks_held
-- Which of these locks some session holds now: a projection that stays free while every daemon
-- that could take it is at its share (daemons of another version cannot:
-- projectord/daemon/versions.py) is taken beyond the share rather than left unapplied.
SELECT k FROM pg_catalog.unnest(%(keys)s::bigint[]) AS k
WHERE EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = ((k >> 32) & 4294967295)::oid
      AND l.objid = (k & 4294967295)::oid);
