-- The request's claimed role, only when the session actually holds it.
--
-- Anyone who can run SQL can set `request.jwt.claims` (SET, set_config, PGOPTIONS), so a claimed
-- role proves nothing by itself: DB role "user" could claim "admin". The read policies therefore
-- ask for this instead of the raw claim: the claim's role when the current role is that role or
-- a member of it (a role it could SET ROLE to anyway), else NULL, which matches no row. What the
-- database cannot check is the claimed tenant: choosing it is the trusted authenticator's job.
--
-- Like request_claims(), malformed claims give NULL instead of an error, a role name that does not
-- exist gives NULL (pg_has_role would raise), and search_path is pinned to pg_catalog. SECURITY
-- INVOKER (the default), so current_user is the reading session's role.

CREATE OR REPLACE FUNCTION request_role() RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    claims jsonb;
    claimed text;
BEGIN
    claims := nullif(current_setting('request.jwt.claims', true), '')::jsonb;
    IF jsonb_typeof(claims) IS DISTINCT FROM 'object'
       OR jsonb_typeof(claims -> 'role') IS DISTINCT FROM 'string' THEN
        RETURN NULL;
    END IF;
    claimed := claims ->> 'role';
    IF claimed = current_user THEN
        RETURN claimed;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = claimed)
       AND pg_has_role(current_user, claimed, 'MEMBER') THEN
        RETURN claimed;
    END IF;
    RETURN NULL;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;
