-- The versions of projections that do not serve reads (sql/migrations/0019_projection_versions.sql):
-- being built, or kept for a rollback. Only projectord/runner/version_store.py runs these.

-- name: version_rows
SELECT name, version, role, tables_schema, since
FROM {schema}.projection_versions WHERE name = ANY(%(names)s::text[]) ORDER BY name, version;

-- name: all_version_rows
SELECT name, version, role, tables_schema, since
FROM {schema}.projection_versions ORDER BY name, version;

-- name: lock_version_row
-- The row of one version, held still until the caller's transaction ends.
SELECT role, tables_schema FROM {schema}.projection_versions
WHERE name = %(name)s AND version = %(version)s FOR UPDATE;

-- name: start_building
-- The build of a version begins (or goes on after a crash: the row is there already).
INSERT INTO {schema}.projection_versions (name, version, role, tables_schema)
VALUES (%(name)s, %(version)s, 'building', %(tables_schema)s)
ON CONFLICT (name, version) DO UPDATE SET role = 'building', since = now(),
    tables_schema = excluded.tables_schema;

-- name: keep_version
-- A swap: the version that leaves service is kept, in its own schema, for a rollback.
INSERT INTO {schema}.projection_versions (name, version, role, tables_schema)
VALUES (%(name)s, %(version)s, 'kept', %(tables_schema)s)
ON CONFLICT (name, version) DO UPDATE SET role = 'kept', since = now(),
    tables_schema = excluded.tables_schema;

-- name: request_rollback
-- `projectord rollback`: a kept version is to be caught up and swapped back in.
UPDATE {schema}.projection_versions SET role = 'building', since = now()
WHERE name = %(name)s AND version = %(version)s AND role = 'kept'
RETURNING tables_schema;

-- name: forget_version
DELETE FROM {schema}.projection_versions WHERE name = %(name)s AND version = %(version)s;

-- name: expired_versions
-- Kept versions past their retention, each taken by one daemon only (the others skip it).
SELECT name, version, tables_schema FROM {schema}.projection_versions
WHERE role = 'kept' AND since < now() - make_interval(secs => %(seconds)s)
ORDER BY since FOR UPDATE SKIP LOCKED;

-- name: schema_exists
SELECT to_regnamespace(%(schema)s) IS NOT NULL;
