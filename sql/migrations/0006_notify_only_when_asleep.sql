-- Appends notify only while a listener sleeps.
-- Every NOTIFY takes a cluster-wide lock at commit and holds it through the commit's flush: with
-- one in every appending transaction, concurrent writers lose about half their throughput. A
-- daemon that is busy catching up needs no wake-up, so writers notify only while a listener is
-- "armed" (about to sleep), and never lose a wake-up. The protocol, with K = hashtext(channel):
--   * An armed listener holds the advisory lock (K, s) in share mode for every stripe s in 0..63
--     (sql/queries/listener.sql, projectord/listener.py).
--   * A writer's transaction tries to take (K, its stripe) exclusively, without waiting. Taken:
--     no listener is armed, so it does not notify, and it keeps the stripe until it ends.
--     Not taken: a listener is armed (or arming), or another writer has the stripe: it notifies.
--   * To sleep, a runner has the listener arm, then reads its events once more, then waits. Arming
--     waits for every writer holding a stripe, i.e. every writer that decided not to notify, to
--     end: their events are committed before that last read, so it sees them.
-- A writer never waits for anything; a writer holding its stripe for long only delays arming
-- (with a lock timeout: the runner polls meanwhile), and such a transaction holds the runners back
-- anyway (the xmin horizon). Isolation levels do not matter: the decision reads no table.

CREATE OR REPLACE FUNCTION notify_events_appended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('projectord_' || TG_TABLE_SCHEMA),
                                     pg_backend_pid() % 64) THEN
        PERFORM pg_notify('projectord_' || TG_TABLE_SCHEMA, '');
    END IF;
    RETURN NULL;
END;
$$;
