-- The schema version of each event's payload: the shape it was written in, which upcasters turn
-- into the current one when it is decoded (projectord/upcasting.py, docs/upcasting.md). Stored
-- rows are never rewritten.
--
-- Default 1: every row written before this migration, and every append by a writer that does not
-- name the column (a plain SQL INSERT), is version 1. A column added with a constant default is
-- recorded in the catalog only (PostgreSQL 11 and later): no rewrite, no scan of the table. The
-- ACCESS EXCLUSIVE lock it needs waits for the appends in flight and holds new ones only until
-- `init` commits, within its `lock_timeout`.
ALTER TABLE events ADD COLUMN IF NOT EXISTS schema_version integer NOT NULL DEFAULT 1;

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
