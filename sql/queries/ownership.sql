-- Advisory locks of one installation: the first key is the schema's, the second the projection's
-- (or the shared "instance" key every live daemon holds). Session locks: they end with the session.

-- name: try_lock_projection
SELECT pg_try_advisory_lock(hashtext('projectord:' || %(schema)s), hashtext(%(key)s));

-- name: try_lock_instance
SELECT pg_try_advisory_lock_shared(hashtext('projectord:' || %(schema)s), hashtext(%(key)s));

-- name: release_projection
SELECT pg_advisory_unlock(hashtext('projectord:' || %(schema)s), hashtext(%(key)s));

-- name: count_instances
-- Live daemons: the sessions holding the shared instance lock. pg_locks is readable by every role.
SELECT count(DISTINCT pid)
FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid = hashtext('projectord:' || %(schema)s)::oid
  AND objid = hashtext(%(key)s)::oid;

-- name: record_owner
INSERT INTO {schema}.projection_positions AS p (name, owner) VALUES (%(name)s, %(owner)s)
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner;
