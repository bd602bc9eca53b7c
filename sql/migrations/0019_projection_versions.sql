-- Versioned projections (docs/evolution.md): a projection declares `version = N`, and raising it
-- builds the new version in tables of its own while the old one serves reads, then swaps them in.
--
-- projection_positions.version: the version of the projection whose tables the row's checkpoint
-- belongs to. On the row named after the projection that is the version serving reads; on a row
-- `NAME#vN` it is N, a version being built or kept for a rollback. Every compare-and-set of a
-- checkpoint checks it (sql/queries/positions.sql), so code of one version can never commit a
-- batch into the tables of another, even when both checkpoints happen to be equal. Default 1:
-- every row of an earlier release is version 1, serving, and so is every row a daemon of an
-- earlier release creates while this one upgrades next to it.
--
-- A column with a constant default is recorded in the catalog only (no rewrite, no scan), but it
-- needs the table's ACCESS EXCLUSIVE lock, and a waiting lock request queues every later one
-- behind it: the running daemons' batches would stall behind `init` for its whole lock_timeout
-- while it waits out one slow batch. So each try waits 50 ms at most, and between tries the
-- batches go on; the tries stop (lock_not_available, as any lock wait of `init`) once `init`'s
-- own lock_timeout has passed (as in 0017_event_schema_version.sql).
DO $$
DECLARE
    outer_timeout text := pg_catalog.current_setting('lock_timeout');
    give_up timestamptz := pg_catalog.clock_timestamp() + outer_timeout::interval;
BEGIN
    LOOP
        BEGIN
            PERFORM pg_catalog.set_config('lock_timeout', '50ms', true);
            ALTER TABLE projection_positions
                ADD COLUMN IF NOT EXISTS version integer NOT NULL DEFAULT 1;
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

-- The versions of a projection that do not serve reads: one being built (`building`, from the
-- first event, or a kept one being caught up for a rollback) or one kept after a swap for a
-- rollback (`kept`). Their tables live in `tables_schema`; their checkpoint is the positions row
-- `NAME#vN`. The serving version is the positions row `NAME`'s `version`.
CREATE TABLE IF NOT EXISTS projection_versions (
    name text NOT NULL,
    version integer NOT NULL CHECK (version >= 1),
    role text NOT NULL CHECK (role IN ('building', 'kept')),
    tables_schema text NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
