-- name: existing_roles
SELECT rolname FROM pg_roles WHERE rolname = ANY(%(roles)s::text[]);

-- name: current_role_bypasses_rls
-- Superusers and BYPASSRLS roles are exempt from every row-level security policy, even FORCEd ones.
SELECT rolname, rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user;

-- name: rls_tables_blocking_writes
-- Tables whose row-level security stops the current role's writes: its own tables (owners are
-- exempt unless forced) with row-level security enabled and forced, and no permissive
-- `FOR ALL USING (true) WITH CHECK (true)` write policy of projectord's for a role whose
-- privileges the current role has. Empty for superusers and BYPASSRLS roles. A table another role
-- owns is not listed: its projection is refused on its own (foreign_owned_tables), and the other
-- projections run.
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s::text[]) AND c.relrowsecurity
  AND c.relforcerowsecurity
  AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
  AND NOT EXISTS (
      SELECT 1 FROM pg_roles WHERE rolname = current_user AND (rolsuper OR rolbypassrls)
  )
  AND NOT EXISTS (
      SELECT 1 FROM pg_policy p
      WHERE p.polrelid = c.oid AND p.polname = %(policy)s AND p.polcmd = '*' AND p.polpermissive
        AND pg_get_expr(p.polqual, p.polrelid) = 'true'
        AND pg_get_expr(p.polwithcheck, p.polrelid) = 'true'
        AND EXISTS (
            SELECT 1 FROM pg_catalog.unnest(p.polroles) AS r(oid)
            WHERE r.oid = 0::oid OR pg_has_role(r.oid, 'USAGE')
        )
  )
ORDER BY 1;

-- name: missing_select_grants
-- (table, role) pairs where a reader role cannot SELECT the table.
SELECT c.relname, r.rolname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN pg_roles r
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s::text[])
  AND r.rolname = ANY(%(roles)s::text[])
  AND NOT has_table_privilege(r.oid, c.oid, 'SELECT')
ORDER BY 1, 2;

-- name: missing_schema_usage
-- Reader roles without USAGE on the read-model schema: they could not name its tables.
SELECT r.rolname
FROM pg_roles r
JOIN pg_namespace n ON n.nspname = %(schema)s
WHERE r.rolname = ANY(%(roles)s::text[]) AND NOT has_schema_privilege(r.oid, n.oid, 'USAGE')
ORDER BY 1;
