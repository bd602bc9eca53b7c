-- The wake-up trigger with its advisory-lock key and channel as constants, computed here once per
-- schema: it runs in every appending transaction, and computing hashtext('projectord_' ||
-- TG_TABLE_SCHEMA) there cost 8 writers about 8 % of their appends (benchmarks/write_cost.py;
-- a trigger that does nothing costs about 5 %). The protocol is 0006's, unchanged.
DO $migration$
DECLARE
    channel text := 'projectord_' || current_schema();
BEGIN
    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION notify_events_appended() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        BEGIN
            IF NOT pg_try_advisory_xact_lock(%s, pg_backend_pid() %% 64) THEN
                PERFORM pg_notify(%L, '');
            END IF;
            RETURN NULL;
        END;
        $body$
    $function$, hashtext(channel), channel);
END;
$migration$;
