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
