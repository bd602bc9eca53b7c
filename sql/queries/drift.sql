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
