-- The wake-up channel always fits PostgreSQL's 63-byte identifier limit. 'projectord_' || schema
-- is too long for a schema of more than 52 bytes, and pg_notify() then raised "channel name too
-- long" in every append while a listener was armed, which is the daemon's normal idle state. Such
-- a schema now gets 'projectord_' || md5(schema) (43 bytes); the daemon derives the same name
-- (projectord/listener.py: channel_name). Shorter schemas keep their channel, so a daemon of the
-- previous release keeps being woken during an upgrade. The trigger is 0009's, with that channel.
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
