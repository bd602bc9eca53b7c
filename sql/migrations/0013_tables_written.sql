-- Which tables a transaction has written so far, and which tables each projection was seen to
-- write: what keeps a rebuild from applying events a second time to a table it does not empty.
--
-- tables_written(): the tables the calling transaction holds a lock on that only writes take
-- (ROW EXCLUSIVE: INSERT, UPDATE, DELETE, MERGE, COPY FROM; ACCESS EXCLUSIVE: TRUNCATE, ALTER,
-- DROP; and the two in between, taken by explicit LOCK TABLE and some DDL). Relation locks last
-- until the transaction ends, so a write cannot hide from it, whatever name or search_path it
-- used; reads (ACCESS SHARE) and row locks (SELECT … FOR UPDATE/SHARE: ROW SHARE) do not count.
-- Temporary tables are the session's own and are left out. Only the caller's own locks are read,
-- from the lock table in shared memory: no catalog scan, no I/O.
-- (projectord/online_rebuild.py: the shadow's guard; projectord/runner.py: the sampled record.)
CREATE OR REPLACE FUNCTION tables_written()
RETURNS TABLE (relation oid, table_schema text, table_name text)
LANGUAGE sql STABLE AS $$
    SELECT c.oid, n.nspname::text, c.relname::text
    FROM pg_catalog.pg_locks l
    JOIN pg_catalog.pg_class c ON c.oid = l.relation
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE l.pid = pg_catalog.pg_backend_pid()
      AND l.locktype = 'relation'
      AND l.granted
      AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                     'AccessExclusiveLock')
      AND c.relkind IN ('r', 'p', 'f')
      AND n.oid <> pg_catalog.pg_my_temp_schema()
$$;

-- The tables each projection's handler was seen writing (projectord/runner.py samples a batch
-- now and then). An offline rebuild empties only the declared tables, so it refuses while this
-- names another one, unless the operator confirms (projectord/operations.py).
CREATE TABLE IF NOT EXISTS projection_writes (
    projection text NOT NULL,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, table_schema, table_name)
);
