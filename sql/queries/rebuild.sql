-- name: rebuild_lock_key
-- One online rebuild per projection at a time: a session lock, released when its connection ends,
-- on a random key only the daemon's role can read (sql/migrations/0014_lock_keys.sql).
INSERT INTO {schema}.lock_keys AS k (purpose, name) VALUES ('rebuild', %(key)s)
ON CONFLICT (purpose, name) DO UPDATE SET key = k.key
RETURNING key;

-- name: table_grants
-- Privileges others hold on a table (not its owner's), to carry over to the table replacing it.
SELECT CASE WHEN a.grantee = 0::oid THEN 'public' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL aclexplode(c.relacl) AS a
WHERE n.nspname = %(schema)s AND c.relname = %(table)s AND a.grantee <> c.relowner
ORDER BY 1, 2;

-- name: table_owners
-- Which of these tables exist in the schema, and whether the current role (projectord's) owns
-- them: a table another role owns passes neither its owner nor its grants to its replacement.
SELECT c.relname, c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s::text[]) AND c.relkind IN ('r', 'p');

-- name: adopt_shadow_dead_letters
-- The swap: events the shadow dead-lettered (on_error = "skip") are the projection's now.
UPDATE {schema}.dead_letters SET projection = %(name)s WHERE projection = %(shadow)s;

-- name: delete_shadow_dead_letters
-- A rebuild that is abandoned: its shadow's dead letters go with its tables.
DELETE FROM {schema}.dead_letters WHERE projection = %(shadow)s;

-- name: keep_version_dead_letters
-- A versioned swap: the projection's pending dead letters go with the tables that leave service
-- (to their kept unit `NAME#vN`: those tables never applied the events, and a rollback to them
-- brings the dead letters back), and the build's become the projection's. One statement: for a
-- rebuild of the serving version the kept unit *is* the build's, and the two sets are exchanged.
UPDATE {schema}.dead_letters
SET projection = CASE WHEN projection = %(name)s THEN %(kept)s ELSE %(name)s END
WHERE (projection = %(name)s AND resolved_at IS NULL) OR projection = %(shadow)s;
