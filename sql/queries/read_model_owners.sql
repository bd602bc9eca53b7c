-- name: foreign_owned_tables
-- Relations named like a projection's tables, in the read-model schema, that the current role
-- (projectord's) does not own, whatever their kind (a view's rules are code too). Their triggers,
-- rules, policies and defaults are their owner's code and would run as projectord on every write.
-- Membership in the owner does not count: up to PostgreSQL 15 a role may grant itself to others.
SELECT c.relname, pg_get_userbyid(c.relowner), current_user::text
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s::text[])
  AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)
ORDER BY 1;

-- name: foreign_code
-- Triggers (other than the internal ones of constraints) and rules on the read-model tables
-- named: (table, 'trigger' or 'rule', its name, the trigger's function, that function's owner).
-- A projection cannot declare either, so each is code someone else attached, which would run as
-- projectord (reading every tenant) on every batch; a TRIGGER privilege is enough to attach one.
-- Read from the catalog only: nothing is run.
SELECT c.relname, 'trigger', tg.tgname, tg.tgfoid::regprocedure::text,
       pg_get_userbyid(p.proowner)
FROM pg_trigger tg
JOIN pg_class c ON c.oid = tg.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = tg.tgfoid
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s::text[]) AND NOT tg.tgisinternal
UNION ALL
SELECT c.relname, 'rule', r.rulename, NULL, NULL
FROM pg_rewrite r
JOIN pg_class c ON c.oid = r.ev_class
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s::text[])
ORDER BY 1, 2, 3;

-- name: guard_tables
-- Before a batch's handler, in its transaction: lock the projection's tables (ROW EXCLUSIVE, as
-- its writes would) and check they are still projectord's own, with no trigger or rule; raises
-- SQLSTATE PJ002 otherwise (sql/migrations/0016_guard_read_model_tables.sql).
SELECT {schema}.guard_tables(%(schema)s, %(tables)s::text[]);

-- name: read_model_schema_owner
-- The read-model schema's owner, whether that role is trusted, and projectord's role. Whoever owns
-- the schema (or is a member of its owner) may drop and replace every table in it, so it must be
-- projectord's role or a superuser (who can do anything anyway). For a schema owned by
-- pg_database_owner (PostgreSQL 15's `public`), that is whoever owns the database.
SELECT pg_get_userbyid(n.nspowner),
       o.oid = me.oid OR o.rolsuper
       OR (o.rolname = 'pg_database_owner' AND EXISTS (
               SELECT FROM pg_database d JOIN pg_roles dba ON dba.oid = d.datdba
               WHERE d.datname = current_database() AND (dba.oid = me.oid OR dba.rolsuper))),
       me.rolname::text
FROM pg_namespace n
JOIN pg_roles o ON o.oid = n.nspowner
JOIN pg_roles me ON me.rolname = current_user
WHERE n.nspname = %(schema)s;
