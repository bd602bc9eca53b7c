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
-- `projectord rollback`: a kept version is to be caught up and swapped back in (from the schema
-- a build of the version uses: the tables a drift rebuild replaced were moved there first).
UPDATE {schema}.projection_versions
SET role = 'building', since = now(), tables_schema = %(tables_schema)s
WHERE name = %(name)s AND version = %(version)s AND role = 'kept'
RETURNING tables_schema;

-- name: forget_version
DELETE FROM {schema}.projection_versions WHERE name = %(name)s AND version = %(version)s;

-- name: expired_versions
-- Kept versions past their retention, each taken by one daemon only (the others skip it).
SELECT name, version, tables_schema FROM {schema}.projection_versions
WHERE role = 'kept' AND since < now() - make_interval(secs => %(seconds)s)
ORDER BY since FOR UPDATE SKIP LOCKED;

-- name: dependents
-- Objects of other relations that depend on these tables (views, materialized views, foreign
-- keys of other tables): a versioned swap moves the old tables out and they would follow them,
-- serving the old version for good. The swap waits until they are gone.
SELECT DISTINCT
       CASE WHEN d.classid = 'pg_rewrite'::regclass THEN 'view ' ELSE 'foreign key of ' END
       || dn.nspname || '.' || dc.relname || ' on ' || tn.nspname || '.' || t.relname
FROM pg_catalog.pg_class t
JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
JOIN pg_catalog.pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = t.oid
LEFT JOIN pg_catalog.pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
LEFT JOIN pg_catalog.pg_constraint c
       ON d.classid = 'pg_constraint'::regclass AND c.oid = d.objid AND c.contype = 'f'
JOIN pg_catalog.pg_class dc ON dc.oid = coalesce(r.ev_class, c.conrelid)
JOIN pg_catalog.pg_namespace dn ON dn.oid = dc.relnamespace
WHERE tn.nspname = %(schema)s AND t.relname = ANY(%(tables)s::text[]) AND dc.oid <> t.oid
ORDER BY 1;
