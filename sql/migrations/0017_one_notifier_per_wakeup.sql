-- At most one notifying commit at a time, and few of them (docs/performance.md).
--
-- With durable commits (fsync on) 0006's protocol cost 8 writers 75 % of their appends: a NOTIFY
-- holds a cluster-wide lock from before its commit until the commit is flushed, so notifying
-- commits flush one after another, and an armed listener made every append notify until the
-- notifications came faster than it could count. Now, while a listener is armed, a commit that
-- finds another one notifying at that moment stays silent, covered by the sweep the listener runs
-- on that notification before it wakes its runners. The decision is taken when the transaction
-- commits (a deferred constraint trigger), so a transaction that rolls back rarely holds the
-- right to notify, and never for long.
--
-- Advisory locks, all on key K = hashtext(channel), stripe s = pid % 64 and t = pid % 128:
--   (K, s)        the stripes of 0006 (s in 0..63), which a listener of the previous release arms on;
--   (K, 64 + t)   this protocol's armed stripes: an armed listener holds all of them in share mode;
--   (K, 192 + t)  "silent while armed": a commit that did not notify though a listener was armed;
--   (K, 320)      the token: held by the one committing transaction that notifies.
-- An appending transaction, for each row (the WHEN clause, no PL/pgSQL on this path), takes
-- (K, 64 + t) and (K, s) exclusively without waiting. Taken: no listener is armed; it keeps them
-- until it ends, and an arming waits for it. Not taken: a listener is armed or arming (or another
-- writer has the stripe), and at commit the deferred function below decides, once per transaction
-- (the WHEN clause queues only the transaction's first such row: a transaction-local setting
-- holds its id, read before it is set; a rolled-back savepoint takes both back):
--   * (K, 64 + t) taken now: no listener of this protocol is armed (any more): nothing to do;
--   * a listener of the previous release is armed (it holds (K, s) in share mode, where a writer
--     sharing the stripe holds it exclusively), or the transaction is SERIALIZABLE (it may still
--     fail after this decision): NOTIFY;
--   * else it takes (K, 192 + t), then tries the token. Taken: NOTIFY (the token is held until
--     the commit is flushed, so no other commit notifies meanwhile). Not taken: another commit is
--     notifying right now; this one stays silent. Its stripe not taken (another writer's): NOTIFY.
-- The listener (projectord/daemon/listener.py) arms by taking (K, 64 + t) in share mode for every t,
-- which waits for every transaction that decided not to notify because no listener was armed,
-- then taking and releasing (K, 192 + t) for every t. On each notification, still armed, it first
-- sweeps: takes and releases (K, 192 + t) in share mode for every t, which waits for every
-- transaction that stayed silent because that commit was notifying (each took its stripe before
-- it found the token taken, so before the notifying commit ended and woke the listener), and only
-- then wakes its runners: their read sees all of them, and they may sleep after it. One that
-- stays silent later found another commit holding the token, whose notification sweeps again.
-- What the next wake-up does not cover: a notifying transaction that fails after this decision
-- (a later deferred constraint of its own, a termination during COMMIT) while another stayed
-- silent; and, while a daemon of the previous release still runs, a writer sharing its old stripe
-- with another while that daemon arms. The next append's wake-up or the listener's poll
-- (poll_interval) finds those events. Writers never wait; isolation levels do not matter: the
-- decision reads no table.
DO $migration$
DECLARE
    channel text := 'projectord_' || current_schema();
BEGIN
    IF octet_length(channel) > 63 THEN
        channel := 'projectord_' || md5(current_schema());
    END IF;
    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION notify_events_appended() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        DECLARE
            pid integer := pg_catalog.pg_backend_pid();
        BEGIN
            IF pg_catalog.pg_try_advisory_xact_lock(%1$s, 64 + pid %% 128) THEN
                -- No listener armed (or another writer has this stripe and will hold the next
                -- arming as long as this one): nothing to do, unless a listener of the previous
                -- release is armed: it holds the old stripe in share mode, where a writer
                -- sharing that stripe holds it exclusively.
                IF pg_catalog.pg_try_advisory_xact_lock(%1$s, pid %% 64)
                   OR NOT pg_catalog.pg_try_advisory_xact_lock_shared(%1$s, pid %% 64) THEN
                    RETURN NULL;
                END IF;
            ELSIF (pg_catalog.pg_try_advisory_xact_lock(%1$s, pid %% 64)
                   OR NOT pg_catalog.pg_try_advisory_xact_lock_shared(%1$s, pid %% 64))
               AND pg_catalog.current_setting('transaction_isolation') <> 'serializable'
               AND pg_catalog.pg_try_advisory_xact_lock(%1$s, 192 + pid %% 128)
               AND NOT pg_catalog.pg_try_advisory_xact_lock(%1$s, 320) THEN
                RETURN NULL;
            END IF;
            PERFORM pg_catalog.pg_notify(%2$L, '');
            RETURN NULL;
        END;
        $body$
    $function$, hashtext(channel), channel);
    EXECUTE 'DROP TRIGGER IF EXISTS events_appended ON events';
    EXECUTE format($trigger$
        CREATE CONSTRAINT TRIGGER events_appended
            AFTER INSERT ON events
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW
            WHEN (NOT (pg_catalog.pg_try_advisory_xact_lock(%1$s, 64 + pg_catalog.pg_backend_pid() %% 128)
                       AND pg_catalog.pg_try_advisory_xact_lock(%1$s, pg_catalog.pg_backend_pid() %% 64))
                  AND pg_catalog.current_setting('projectord.wakeup_queued', true)
                      IS DISTINCT FROM pg_catalog.set_config('projectord.wakeup_queued',
                                                             pg_catalog.pg_current_xact_id()::text,
                                                             true))
            EXECUTE FUNCTION notify_events_appended()
    $trigger$, hashtext(channel));
END;
$migration$;
