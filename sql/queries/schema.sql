-- name: schema_access
-- Per schema `init` uses: whether it exists, and whether the current role may create objects in
-- it (for a schema that does not exist yet: whether it may create it, CREATE on the database).
-- Checked before any DDL, so `init` fails with one line saying what to grant rather than with
-- Postgres's "permission denied for schema public" (the default on PostgreSQL 15 and later).
SELECT s.name, n.oid IS NOT NULL,
       CASE WHEN n.oid IS NULL THEN has_database_privilege(current_database()::text, 'CREATE')
            ELSE has_schema_privilege(n.oid, 'CREATE') END
FROM pg_catalog.unnest(%(schemas)s::text[]) AS s(name)
LEFT JOIN pg_namespace n ON n.nspname = s.name;

-- name: missing_tables
-- Which of these tables do not exist in the schema.
SELECT t.name
FROM pg_catalog.unnest(%(tables)s::text[]) AS t(name)
WHERE NOT EXISTS (
    SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = %(schema)s AND c.relname = t.name
);

-- name: current_identity
SELECT current_user, current_database();

-- name: build_schema_access
-- Before a build makes or uses a schema of its own: whether the current role may create a schema
-- (CREATE on the database), who it is, and who owns the schema if it exists. A schema another
-- role made is never used or dropped: its names are predictable, and its tables, triggers or
-- default privileges would run or be written as projectord's role.
SELECT has_database_privilege(current_database()::text, 'CREATE'), current_user, current_database(),
       (SELECT pg_get_userbyid(n.nspowner) FROM pg_namespace n WHERE n.nspname = %(schema)s);
