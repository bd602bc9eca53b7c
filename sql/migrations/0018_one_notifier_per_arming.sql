-- One notifying transaction per arming, not one per append (issue 13).
--
-- A NOTIFY takes a cluster-wide lock before its commit and holds it through the commit's flush, so
-- notifying commits flush one at a time. Under 0006's protocol every append notified while a
-- listener was armed, and an idle-looking daemon (caught up, armed) cost busy writers on a durable
-- server three quarters of their throughput. Now, while a listener is armed, only the first
-- append notifies; later ones are waited for by the listener instead. The protocol, per channel,
-- with three advisory-lock keys computed here:
--
--   ARMED   (64 stripes) held in share mode by an armed listener, from its arming until it hears
--           a notification.
--   SILENT  (64 stripes) held exclusively by an append that found a listener armed but the wake-up
--           already sent, until it ends.
--   LEGACY  0006's stripes: a listener of an earlier release arms on them and expects a NOTIFY
--           from every append, which it still gets, so a rolling upgrade loses no wake-up.
-- and the one-row table `wakeups`: `armed` is true from a listener's arming until the first
-- append after it takes the wake-up (transactionally: if that append rolls back, it is true
-- again).
--
-- An append (this trigger, once per statement):
--   1. takes an ARMED stripe exclusively, without waiting (its own, pid % 64, or if another append
--      holds that one, a second one), then the LEGACY stripe of the same number: both taken, no
--      listener is armed, it does not notify, and it keeps them until it ends (arming waits for
--      it). LEGACY not taken: an old listener is armed: notify, as 0006 did. (Appends take a
--      LEGACY stripe only with the ARMED one of its number, so no other append holds it.)
--   2. ARMED not taken (a listener is armed) in a REPEATABLE READ or SERIALIZABLE transaction: its
--      snapshot may predate the arming, so it cannot trust `wakeups`: it notifies.
--   3. otherwise it takes a SILENT stripe exclusively, without waiting (its own or a second one;
--      other appends hold both: notify), and keeps it until it ends: the listener's next arming waits for it. Only
--      then it reads `wakeups` (read first, an arming could pass the stripe between the read and
--      the take, and miss it). Not armed: a committed append took this arming's wake-up, and its
--      notification makes the listener arm again: this append does not notify.
--   4. armed: it takes the wake-up, `UPDATE wakeups SET armed = false WHERE armed`, and notifies.
--      That UPDATE waits if another append took the wake-up and has not ended (its commit is a
--      flush away): when that one commits, this one does not notify (as in 3); when it rolls
--      back, this one takes the wake-up. The wait is bounded at 5 ms (a notifier that stays open, for instance doing
--      other work after its append): then it notifies itself.
-- A listener arms (sql/queries/listener.sql): sets `armed`, then takes every ARMED stripe in share
-- mode (waiting for the appends of step 1), then every SILENT stripe in share mode and releases
-- them (waiting for the appends of step 3), then lets its runners read once more before sleeping.
-- On any notification it releases the ARMED stripes, and arms again before its runners sleep.
-- Every append therefore either notifies or has ended before a read that precedes the next sleep.
--
-- SECURITY DEFINER: a writer that may only INSERT into `events` reads and updates `wakeups`
-- through this function alone, and no other role can lock its row (which would hold every append
-- for 5 ms) or clear it (which would silence the wake-ups). Every name below is schema-qualified,
-- operators included, so the writer's search_path cannot stand in for anything.
CREATE TABLE IF NOT EXISTS wakeups (
    one   boolean PRIMARY KEY DEFAULT true CHECK (one),
    armed boolean NOT NULL
);
INSERT INTO wakeups (armed) VALUES (false) ON CONFLICT DO NOTHING;
REVOKE ALL ON wakeups FROM PUBLIC;

DO $migration$
DECLARE
    channel text := 'projectord_' || current_schema();
BEGIN
    IF octet_length(channel) > 63 THEN
        channel := 'projectord_' || md5(current_schema());
    END IF;
    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION notify_events_appended() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER AS $body$
        DECLARE
            pid integer := pg_catalog.pg_backend_pid();
            stripe integer := pid OPERATOR(pg_catalog.%%) 64;
            -- A second stripe, never the first: 1 to 63 stripes on from it. (OPERATOR() has one
            -- precedence for all, left to right: hence the parentheses.)
            other integer := (stripe OPERATOR(pg_catalog.+) (1 OPERATOR(pg_catalog.+)
                ((pid OPERATOR(pg_catalog./) 64) OPERATOR(pg_catalog.%%) 63)))
                OPERATOR(pg_catalog.%%) 64;
            is_armed boolean;
            took integer;
            outer_timeout text;
        BEGIN
            IF NOT pg_catalog.pg_try_advisory_xact_lock(%2$s, stripe) THEN
                stripe := other;  -- another append may hold the first: try a second one
            END IF;
            IF stripe OPERATOR(pg_catalog.=) other
                    AND NOT pg_catalog.pg_try_advisory_xact_lock(%2$s, stripe) THEN
                stripe := NULL;  -- a listener holds them: armed
            END IF;
            IF stripe IS NOT NULL THEN
                IF pg_catalog.pg_try_advisory_xact_lock(%4$s, stripe) THEN
                    RETURN NULL;  -- 1: no listener armed
                END IF;
                PERFORM pg_catalog.pg_notify(%5$L, '');  -- 1: a listener of an earlier release
                RETURN NULL;
            END IF;
            IF pg_catalog.current_setting('transaction_isolation')
                    OPERATOR(pg_catalog.<>) 'read committed' THEN
                PERFORM pg_catalog.pg_notify(%5$L, '');  -- 2
                RETURN NULL;
            END IF;
            IF NOT pg_catalog.pg_try_advisory_xact_lock(%3$s, pid OPERATOR(pg_catalog.%%) 64)
                    AND NOT pg_catalog.pg_try_advisory_xact_lock(%3$s, other) THEN
                PERFORM pg_catalog.pg_notify(%5$L, '');  -- 3: both stripes are others'
                RETURN NULL;
            END IF;
            SELECT w.armed INTO is_armed FROM %1$I.wakeups w;
            IF is_armed THEN
                outer_timeout := pg_catalog.current_setting('lock_timeout');
                BEGIN
                    PERFORM pg_catalog.set_config('lock_timeout', '5ms', true);
                    UPDATE %1$I.wakeups SET armed = false WHERE armed;
                    GET DIAGNOSTICS took = ROW_COUNT;
                    PERFORM pg_catalog.set_config('lock_timeout', outer_timeout, true);
                EXCEPTION WHEN lock_not_available THEN
                    took := 1;  -- a notifier still open: notify too
                END;
                IF took OPERATOR(pg_catalog.>) 0 THEN
                    PERFORM pg_catalog.pg_notify(%5$L, '');  -- 4
                END IF;
            END IF;
            RETURN NULL;  -- 3
        END;
        $body$
    $function$,
        current_schema(),
        hashtext(channel || '/armed'),
        hashtext(channel || '/silent'),
        hashtext(channel),
        channel);
END;
$migration$;
