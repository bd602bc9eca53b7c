-- The schema version of each event's payload: the shape it was written in, which upcasters turn
-- into the current one when it is decoded (projectord/upcasting.py, docs/upcasting.md). Stored
-- rows are never rewritten.
--
-- Default 1: every row written before this migration, and every append by a writer that does not
-- name the column (a plain SQL INSERT), is version 1. A column added with a constant default is
-- recorded in the catalog only (PostgreSQL 11 and later): no rewrite, no scan of the table.
--
-- It needs the table's ACCESS EXCLUSIVE lock, and while a lock request waits every later one
-- queues behind it: waiting out a long reader (a report, pg_dump, a slow batch) would stall every
-- append for up to `init`'s whole `lock_timeout`. So each try waits 50 ms at most, and between
-- tries the appends go on; the tries stop (lock_not_available, as any lock wait of `init`) once
-- that `lock_timeout` has passed. Once taken, the lock holds new appends until `init` commits.
DO $$
DECLARE
    outer_timeout text := pg_catalog.current_setting('lock_timeout');
    give_up timestamptz := pg_catalog.clock_timestamp() + outer_timeout::interval;
BEGIN
    LOOP
        BEGIN
            PERFORM pg_catalog.set_config('lock_timeout', '50ms', true);
            ALTER TABLE events ADD COLUMN IF NOT EXISTS schema_version integer NOT NULL DEFAULT 1;
            PERFORM pg_catalog.set_config('lock_timeout', outer_timeout, true);
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_catalog.set_config('lock_timeout', outer_timeout, true);
            IF outer_timeout::interval > interval '0' AND pg_catalog.clock_timestamp() > give_up
            THEN
                RAISE;
            END IF;
            PERFORM pg_catalog.pg_sleep(0.05 + pg_catalog.random() * 0.15);
        END;
    END LOOP;
END;
$$;

-- Versions start at 1. NOT VALID: checked for every new row, without a scan of the existing
-- ones, which all hold the default.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_constraint
        WHERE conrelid = 'events'::regclass AND conname = 'events_schema_version_check'
    ) THEN
        ALTER TABLE events ADD CONSTRAINT events_schema_version_check
            CHECK (schema_version >= 1) NOT VALID;
    END IF;
END;
$$;
