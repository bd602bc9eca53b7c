-- The request's claims, for the row-level security policies that `read_access` implies.
--
-- Claims follow the PostgREST/Supabase convention: a JSON object in the setting
-- `request.jwt.claims`. A cast of malformed JSON (or of a malformed uuid) raises, and an error in a
-- policy would fail the reader's whole query; these functions turn a missing, empty, malformed or
-- non-object value into NULL instead, which matches no row: such a session reads nothing.
--
-- Policies call them by reference, so readers need no USAGE on this schema; for the same reason
-- neither calls the other by name. Their search_path is pinned to pg_catalog.

CREATE OR REPLACE FUNCTION request_claims() RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    claims jsonb;
BEGIN
    claims := nullif(current_setting('request.jwt.claims', true), '')::jsonb;
    IF jsonb_typeof(claims) = 'object' THEN
        RETURN claims;
    END IF;
    RETURN NULL;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION request_tenant_id() RETURNS uuid
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    claims jsonb;
BEGIN
    claims := nullif(current_setting('request.jwt.claims', true), '')::jsonb;
    IF jsonb_typeof(claims) = 'object' AND jsonb_typeof(claims -> 'tenant_id') = 'string' THEN
        RETURN (claims ->> 'tenant_id')::uuid;
    END IF;
    RETURN NULL;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;
