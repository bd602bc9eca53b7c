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
             AND typnamespace <> 'pg_catalog'::regnamespace::oid
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

-- name: schema_create_holders
-- Roles that may create in these schemas besides their owner, projectord's own role and
-- superusers: (schema, grantee or 'public'). Whatever they create there (operators, functions,
-- types, tables) can be picked by a name that projectord or a handler resolves, and then runs as
-- projectord. PUBLIC's CREATE on `public` (PostgreSQL 14 and older) is one of them.
SELECT n.nspname::text,
       CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0::oid THEN 'public'::text
            ELSE pg_catalog.pg_get_userbyid(a.grantee)::text END
FROM pg_catalog.pg_namespace n
CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) a
WHERE n.nspname OPERATOR(pg_catalog.=) ANY(%(schemas)s::text[])
  AND a.privilege_type OPERATOR(pg_catalog.=) 'CREATE'::text
  AND a.grantee OPERATOR(pg_catalog.<>) n.nspowner
  AND a.grantee OPERATOR(pg_catalog.<>) ALL(
      SELECT r.oid FROM pg_catalog.pg_roles r
      WHERE r.rolsuper OR r.rolname OPERATOR(pg_catalog.=) current_user)
ORDER BY 1, 2;

-- name: foreign_schema_objects
-- Functions (aggregates, procedures), operators and types in these schemas that a role other
-- than the schema's owner, projectord's own role or a superuser owns: (schema, owner, functions,
-- operators, types, a few of their names). Array types made with a type, and the row types of
-- tables, are counted with what they belong to (a table is not one of these objects).
SELECT n.nspname::text, pg_catalog.pg_get_userbyid(o.owner)::text,
       pg_catalog.count(*) FILTER (WHERE o.kind OPERATOR(pg_catalog.=) 'function'::text),
       pg_catalog.count(*) FILTER (WHERE o.kind OPERATOR(pg_catalog.=) 'operator'::text),
       pg_catalog.count(*) FILTER (WHERE o.kind OPERATOR(pg_catalog.=) 'type'::text),
       (pg_catalog.array_agg(o.name ORDER BY o.name))[1:3]
FROM pg_catalog.pg_namespace n
CROSS JOIN LATERAL (
    SELECT 'function'::text AS kind, p.oid::regprocedure::text AS name, p.proowner AS owner
    FROM pg_catalog.pg_proc p WHERE p.pronamespace OPERATOR(pg_catalog.=) n.oid
    UNION ALL
    SELECT 'operator'::text, op.oid::regoperator::text, op.oprowner
    FROM pg_catalog.pg_operator op WHERE op.oprnamespace OPERATOR(pg_catalog.=) n.oid
    UNION ALL
    SELECT 'type'::text, t.oid::regtype::text, t.typowner
    FROM pg_catalog.pg_type t
    LEFT JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.typrelid
    WHERE t.typnamespace OPERATOR(pg_catalog.=) n.oid
      AND (c.oid IS NULL OR c.relkind OPERATOR(pg_catalog.=) 'c'::"char")
      AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type e
                      WHERE e.typarray OPERATOR(pg_catalog.=) t.oid)
) o
WHERE n.nspname OPERATOR(pg_catalog.=) ANY(%(schemas)s::text[])
  AND o.owner OPERATOR(pg_catalog.<>) n.nspowner
  AND o.owner OPERATOR(pg_catalog.<>) ALL(
      SELECT r.oid FROM pg_catalog.pg_roles r
      WHERE r.rolsuper OR r.rolname OPERATOR(pg_catalog.=) current_user)
GROUP BY n.nspname, o.owner
ORDER BY 1, 2;
