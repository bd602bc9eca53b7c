-- The version-order check (0010) runs with its owner's rights: it reads the aggregate's latest
-- version from the events table, and a writer that may only INSERT into that table (the
-- recommended setup, docs/security-roles.md) got "permission denied for table events" on every
-- append. SECURITY DEFINER lets it read that one row, nothing more: the function takes no
-- argument but the row being inserted, reads by the row's own aggregate id, and its search_path
-- is pinned so that no object of the writer's (an operator, a function) can stand in for
-- pg_catalog's. The trigger itself is unchanged.
ALTER FUNCTION order_appended_event() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
