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
