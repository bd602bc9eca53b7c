-- Advisory-lock keys nobody else can know in advance.
-- Advisory locks carry no privileges: any role that can connect to the database can take any key.
-- The keys were hashtext() of fixed names, so a role with nothing but CONNECT could take a
-- projection's lock first and no daemon would ever run that projection (issue 18). Each lock now
-- has a random bigint key (about 60 random bits, from gen_random_uuid()) stored here. Only the
-- daemon's role (the owner) can read this table, and a daemon counts as fellow daemons only
-- sessions of its own role (or of members of it).
-- A held key is visible in pg_locks, so a stranger who saw it may take it once it is released;
-- a daemon that finds a key held only by strangers draws a new one (`rekey_lock` in
-- sql/queries/ownership.sql). docs/security-locks.md has the whole story.
CREATE TABLE IF NOT EXISTS lock_keys (
    purpose text   NOT NULL,  -- 'projection', 'instance', 'rebuild'
    name    text   NOT NULL,  -- the projection's name ('' for the instance lock)
    key     bigint NOT NULL
        DEFAULT ('x' || translate(gen_random_uuid()::text, '-', ''))::bit(64)::bigint,
    PRIMARY KEY (purpose, name)
);
REVOKE ALL ON lock_keys FROM PUBLIC;
