-- name: projection_has_applied_events
-- Whether the projection's checkpoint is past any event of its types: then its tables hold state
-- computed from events, and a table recreated empty would be wrong.
SELECT EXISTS (
    SELECT 1
    FROM {schema}.projection_positions p
    JOIN {schema}.events e
      ON (e.transaction_id, e.global_position) <= (p.transaction_id, p.global_position)
    WHERE p.name = %(name)s AND e.type = ANY(%(types)s::text[])
);

-- name: implicit_cast_exists
-- Postgres converts this type to that one implicitly (a widening such as integer → bigint), or
-- they are the same type with another modifier; and whether both types are built in (in
-- pg_catalog). Only then may a drift check cast stored values: a type, cast or operator from
-- another schema is its owner's code, and a check must run none.
SELECT %(source)s::oid = %(target)s::oid OR EXISTS (
           SELECT 1 FROM pg_cast
           WHERE castsource = %(source)s::oid AND casttarget = %(target)s::oid
             AND castcontext = 'i'
       ),
       NOT EXISTS (
           SELECT 1 FROM pg_type
           WHERE oid IN (%(source)s::oid, %(target)s::oid)
             AND typnamespace <> 'pg_catalog'::regnamespace
       );

-- name: extra_grants
-- Privileges other than SELECT that a role other than the owner holds on these tables, or on one
-- of their columns: (table, grantee or 'public', privilege, column or NULL). Only projectord
-- writes a read model; TRUNCATE is not subject to row-level security, TRIGGER runs the grantee's
-- code as projectord, REFERENCES lets others block its deletes.
SELECT DISTINCT c.relname,
       CASE WHEN a.grantee = 0 THEN 'public' ELSE pg_get_userbyid(a.grantee) END,
       a.privilege_type, o.attname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL (
    SELECT NULL::text AS attname, c.relacl AS acl
    UNION ALL
    SELECT att.attname::text, att.attacl
    FROM pg_attribute att
    WHERE att.attrelid = c.oid AND att.attnum > 0 AND NOT att.attisdropped
) o
CROSS JOIN LATERAL aclexplode(o.acl) a
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s::text[])
  AND a.grantee <> c.relowner AND a.privilege_type <> 'SELECT'
ORDER BY 1, 4 NULLS FIRST, 2, 3;
