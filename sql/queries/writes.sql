-- Which tables projections write (sql/migrations/0013_tables_written.sql).

-- name: record_tables_written
-- Run inside a batch's transaction, after its handler and before the checkpoint's compare-and-set:
-- every table the handler wrote, once per projection (this statement's own lock on
-- projection_writes is not the handler's).
INSERT INTO {schema}.projection_writes (projection, table_schema, table_name)
SELECT %(name)s, w.table_schema, w.table_name
FROM {schema}.tables_written() AS w
WHERE w.relation <> to_regclass('{schema}.projection_writes')::oid
ON CONFLICT DO NOTHING;

-- name: undeclared_tables_written
-- Tables the projection was seen writing that are not among its declared ones (which live in the
-- read-model schema: the first on the daemon's search_path, as for the rebuild's TRUNCATE).
SELECT table_schema, table_name
FROM {schema}.projection_writes
WHERE projection = %(name)s
  AND NOT (table_schema = current_schema() AND table_name = ANY(%(tables)s::text[]))
ORDER BY 1, 2;

-- name: forget_tables_written
-- A confirmed rebuild starts the record over: the handler, from the first event, shows again
-- which tables it writes.
DELETE FROM {schema}.projection_writes WHERE projection = %(name)s;

-- name: tables_written_outside
-- The shadow's guard, in an online rebuild's batch transaction: tables written outside the
-- shadow schema. The batch is rolled back when there is one. It runs at the end of the handler,
-- before the checkpoint's compare-and-set.
SELECT table_schema || '.' || table_name
FROM {schema}.tables_written()
WHERE table_schema <> %(shadow)s
ORDER BY 1;
