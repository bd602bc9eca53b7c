-- Each batch checks, in its own transaction and before its handler runs, that the tables it will
-- write are still projectord's: owned by the current role (membership does not count), with no
-- trigger and no rule (a projection cannot declare either, so any there is someone else's code,
-- and would run as projectord, which reads every tenant). The tables are locked first, in the
-- mode the handler's writes take anyway (ROW EXCLUSIVE): a DROP, a CREATE TRIGGER or a CREATE
-- RULE waits for the batch's COMMIT, so what was checked is what the handler writes. Whoever may
-- drop a table (its schema's owner) could otherwise swap it for one of their own between two
-- batches. A failure raises SQLSTATE PJ002, naming table and owner or trigger; the batch rolls
-- back and the runner refuses the projection (projectord/runner.py, projectord/foreign_owner.py).
-- Tables that do not exist are skipped: the handler's own statement reports them, as before.
-- Not SECURITY DEFINER: it runs as the caller. The search path is pinned, so no name in it
-- resolves to another role's object.
CREATE OR REPLACE FUNCTION guard_tables(read_model_schema text, tables text[]) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
    found oid[] := '{}';
    problem text;
BEGIN
    FOREACH t IN ARRAY tables LOOP
        CONTINUE WHEN to_regclass(format('%I.%I', read_model_schema, t)) IS NULL;
        EXECUTE format('LOCK TABLE %I.%I IN ROW EXCLUSIVE MODE', read_model_schema, t);
        -- Resolved again after the lock: a swap committed meanwhile is what gets checked.
        found := found || to_regclass(format('%I.%I', read_model_schema, t))::oid;
    END LOOP;
    SELECT string_agg(p.text, '; ' ORDER BY p.text) INTO problem
    FROM (
        SELECT format('%I.%I is owned by role %I', n.nspname, c.relname,
                      pg_get_userbyid(c.relowner)) AS text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = ANY(found)
          AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)
        UNION ALL
        SELECT format('%I.%I has trigger %I (function %s, owned by role %I)', n.nspname,
                      c.relname, tg.tgname, tg.tgfoid::regprocedure,
                      pg_get_userbyid(p.proowner))
        FROM pg_trigger tg
        JOIN pg_class c ON c.oid = tg.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_proc p ON p.oid = tg.tgfoid
        WHERE tg.tgrelid = ANY(found) AND NOT tg.tgisinternal
        UNION ALL
        SELECT format('%I.%I has rule %I', n.nspname, c.relname, r.rulename)
        FROM pg_rewrite r
        JOIN pg_class c ON c.oid = r.ev_class
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE r.ev_class = ANY(found)
    ) p;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'refusing to write tables that run code projectord did not declare: %',
            problem
            USING ERRCODE = 'PJ002';
    END IF;
    RETURN true;
END;
$$;
