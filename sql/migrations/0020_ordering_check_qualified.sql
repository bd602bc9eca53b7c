-- The version-order check (0010, run as its owner since 0015) without its pinned search_path: it
-- runs for every appended row, and a function-level SET clause is applied and undone on every
-- call (a new GUC nesting level, the setting parsed and assigned, then restored; on PostgreSQL
-- 15 and older the restore walks every setting the server has), which for search_path also
-- throws away the session's cached namespace path twice a row. Counted with callgrind, dropping
-- it takes 12-16 % off the check's instructions per row on PostgreSQL 15 and 2-8 % on 18
-- (docs/ordering.md), and the pinned path is not needed when nothing in the function depends on
-- it:
--   * every function, operator, type and table is named with its schema (pg_catalog's operators
--     as OPERATOR(pg_catalog.=); the events table by the schema, a constant of the function), so
--     no object a writer puts first on its search_path (its own schema, or pg_temp: never searched
--     for functions and operators, searched for types) can stand in for one of them while the
--     function runs with its owner's rights; ORDER BY uses the type's default btree operator
--     class, which is no search_path lookup either;
--   * enable_seqscan stays off inside it, the one setting it keeps (tests/integration/
--     test_version_order.py checks both): a session plans the lookup once and keeps the plan,
--     and one made while the table was tiny would be a sequential scan for every later row of
--     that session, a bulk INSERT or COPY gone quadratic. No query shape forces the index probe
--     without it: on a table of a page or two the planner rightly prefers the scan, and nothing
--     replans the cached plan as the table grows.
-- The body is otherwise 0010's, so the rules, SQLSTATEs and messages are unchanged
-- (docs/ordering.md). CREATE OR REPLACE keeps the function's OID, owner and grants, so the trigger
-- is untouched and no lock on the events table is taken: sessions appending meanwhile compile
-- the new body at their next statement.
DO $migration$
BEGIN
    EXECUTE pg_catalog.format($function$
        CREATE OR REPLACE FUNCTION %1$I.order_appended_event() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET enable_seqscan = off AS $body$
        DECLARE
            latest_version pg_catalog.int4;
            latest_id pg_catalog.xid8;
        BEGIN
            NEW.transaction_id := pg_catalog.pg_current_xact_id();
            SELECT e.version, e.transaction_id INTO latest_version, latest_id
            FROM %1$I.events e
            WHERE e.aggregate_id OPERATOR(pg_catalog.=) NEW.aggregate_id
            ORDER BY e.version DESC
            LIMIT 1;
            IF latest_version IS NULL THEN
                RETURN NEW;
            END IF;
            IF latest_version OPERATOR(pg_catalog.<) NEW.version THEN
                IF latest_id OPERATOR(pg_catalog.>) NEW.transaction_id THEN
                    RAISE EXCEPTION USING
                        ERRCODE = 'serialization_failure',
                        MESSAGE = pg_catalog.format('aggregate %%s: version %%s cannot be'
                            ' appended by transaction %%s, older than transaction %%s that'
                            ' appended version %%s: an aggregate''s versions must come from'
                            ' ever newer transactions', NEW.aggregate_id, NEW.version,
                            NEW.transaction_id, latest_id, latest_version),
                        HINT = 'retry the whole transaction: a new transaction gets a newer id';
                END IF;
                RETURN NEW;
            END IF;
            -- Rare: a version at or below the latest. An existing one is the unique constraint's.
            IF EXISTS (
                SELECT FROM %1$I.events e
                WHERE e.aggregate_id OPERATOR(pg_catalog.=) NEW.aggregate_id
                  AND e.version OPERATOR(pg_catalog.=) NEW.version
            ) THEN
                RETURN NEW;
            END IF;
            RAISE EXCEPTION USING
                ERRCODE = 'check_violation',
                MESSAGE = pg_catalog.format('aggregate %%s: version %%s is below its latest'
                    ' version %%s and cannot be ordered after it', NEW.aggregate_id,
                    NEW.version, latest_version),
                HINT = 'append each aggregate''s versions in increasing order';
        END;
        $body$
    $function$, pg_catalog.current_schema());
END;
$migration$;
