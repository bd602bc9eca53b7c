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
--   2. ARMED not taken (a listener is armed), in a REPEATABLE READ or SERIALIZABLE transaction:
--      its snapshot may predate the arming, so it cannot trust `wakeups`: it notifies.
--   3. otherwise it takes a LEGACY stripe all the same (its own or a second one); none free: a
--      listener of an earlier release is armed too, and expects a NOTIFY from every append:
--      notify. Taken, it keeps it, so such a listener's arming waits for it.
--   4. otherwise it takes a SILENT stripe exclusively, without waiting (its own or a second one;
--      other appends hold both: notify), and keeps it until it ends: the listener's next arming
--      waits for it. Only then it reads `wakeups` (read first, an arming could pass the stripe
--      between the read and the take, and miss it). Not armed: a committed append took this
--      arming's wake-up, and its notification makes the listener arm again: this append does
--      not notify.
--   5. armed and its row not locked: it takes the wake-up (locks the row, SKIP LOCKED, and sets
--      `armed` to false) and notifies. Armed but locked: another append took the wake-up and has
--      not ended (its commit is a flush away): it looks again every millisecond; once that one
--      committed it does not notify (as in 4), if it rolled back this one takes the wake-up.
--      After 5 ms (a notifier that stays open, doing other work after its append) it notifies
--      itself. No lock wait, so no lock timeout: an append never fails here.
-- A listener arms (sql/queries/listener.sql): sets `armed`, then takes every ARMED stripe in share
-- mode (waiting for the appends of step 1), then every SILENT stripe in share mode and releases
-- them (waiting for the appends of step 3), then lets its runners read once more before sleeping.
-- On any notification it releases the ARMED stripes, and arms again before its runners sleep.
-- Every append therefore either notifies or has ended before a read that precedes the next sleep.
--
-- SECURITY DEFINER: a writer that may only INSERT into `events` reads and updates `wakeups`
-- through this function alone, and no other role can lock its row (which would make every append
-- notify) or clear it (which would silence the wake-ups). Every name below is schema-qualified,
-- operators and the variables' types included, so neither the writer's search_path nor its
-- temporary schema (searched first for types, in a SECURITY DEFINER function too) can stand in
-- for anything; a function-level SET search_path would do the same at a cost on every append.
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
            pid pg_catalog.int4 := pg_catalog.pg_backend_pid();
            stripe pg_catalog.int4 := pid OPERATOR(pg_catalog.%%) 64;
            -- A second stripe, never the first: 1 to 63 stripes on from it. (OPERATOR() has one
            -- precedence for all, left to right: hence the parentheses.)
            other pg_catalog.int4 := (stripe OPERATOR(pg_catalog.+) (1 OPERATOR(pg_catalog.+)
                ((pid OPERATOR(pg_catalog./) 64) OPERATOR(pg_catalog.%%) 63)))
                OPERATOR(pg_catalog.%%) 64;
            tries pg_catalog.int4 := 0;
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
            IF NOT pg_catalog.pg_try_advisory_xact_lock(%4$s, pid OPERATOR(pg_catalog.%%) 64)
                    AND NOT pg_catalog.pg_try_advisory_xact_lock(%4$s, other) THEN
                PERFORM pg_catalog.pg_notify(%5$L, '');  -- 3: a listener of an earlier release
                RETURN NULL;
            END IF;
            IF NOT pg_catalog.pg_try_advisory_xact_lock(%3$s, pid OPERATOR(pg_catalog.%%) 64)
                    AND NOT pg_catalog.pg_try_advisory_xact_lock(%3$s, other) THEN
                PERFORM pg_catalog.pg_notify(%5$L, '');  -- 4: both stripes are others'
                RETURN NULL;
            END IF;
            LOOP
                PERFORM FROM %1$I.wakeups w WHERE w.armed FOR NO KEY UPDATE SKIP LOCKED;
                IF FOUND THEN
                    UPDATE %1$I.wakeups SET armed = false;
                    PERFORM pg_catalog.pg_notify(%5$L, '');  -- 5: took the wake-up
                    RETURN NULL;
                END IF;
                PERFORM FROM %1$I.wakeups w WHERE w.armed;
                IF NOT FOUND THEN
                    RETURN NULL;  -- 4: taken by an append that committed
                END IF;
                -- Taken by an append that has not ended: its commit is a flush away.
                tries := tries OPERATOR(pg_catalog.+) 1;
                IF tries OPERATOR(pg_catalog.>) 5 THEN
                    PERFORM pg_catalog.pg_notify(%5$L, '');  -- 5: it stays open: notify too
                    RETURN NULL;
                END IF;
                PERFORM pg_catalog.pg_sleep(0.001);
            END LOOP;
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
