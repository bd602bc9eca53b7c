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
-- Privileges that a role other than the owner holds on these tables, or on one of their columns,
-- and should not: (table, grantee or 'public', privilege, column or NULL). Only projectord writes
-- a read model, so every privilege other than SELECT (TRUNCATE is not subject to row-level
-- security, TRIGGER runs the grantee's code as projectord, REFERENCES lets others block its
-- deletes). On a secured table (%(secured)s), SELECT too, unless the grantee is one of the
-- projection's `read_access` roles: PUBLIC or another role would read through any permissive
-- policy. And any grant option, on any table ('SELECT WITH GRANT OPTION' for a reader that keeps
-- its SELECT): it lets the grantee pass the privilege on. Every operand is exact-typed
-- (aclitem columns are text, oid, bool), so no operator of another schema can be chosen.
SELECT DISTINCT g.relname, g.grantee, g.privilege, g.attname
FROM (
    SELECT c.relname,
           CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0::oid THEN 'public'::text
                ELSE pg_catalog.pg_get_userbyid(a.grantee)::text END AS grantee,
           a.privilege_type, a.is_grantable, o.attname
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
    CROSS JOIN LATERAL (
        SELECT NULL::text AS attname, c.relacl AS acl
        UNION ALL
        SELECT att.attname::text, att.attacl
        FROM pg_catalog.pg_attribute att
        WHERE att.attrelid OPERATOR(pg_catalog.=) c.oid AND att.attnum OPERATOR(pg_catalog.>) 0::int2
          AND NOT att.attisdropped
    ) o
    CROSS JOIN LATERAL pg_catalog.aclexplode(o.acl) a
    WHERE n.nspname OPERATOR(pg_catalog.=) %(schema)s::text
      AND c.relname OPERATOR(pg_catalog.=) ANY(%(tables)s::text[])
      AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
) x
CROSS JOIN LATERAL (
    SELECT x.relname, x.grantee, x.attname,
           CASE WHEN x.privilege_type OPERATOR(pg_catalog.<>) 'SELECT'::text
                     OR (%(secured)s::bool
                         AND x.grantee OPERATOR(pg_catalog.<>) ALL(%(readers)s::text[]))
                THEN x.privilege_type
                WHEN x.is_grantable THEN 'SELECT WITH GRANT OPTION'::text
           END AS privilege
) g
WHERE g.privilege IS NOT NULL
ORDER BY 1, 4 NULLS FIRST, 2, 3;
