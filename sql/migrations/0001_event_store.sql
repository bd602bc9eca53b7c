-- The event store and the projections' checkpoints.
-- Runs with search_path set to projectord's own schema; every object below lands there.

CREATE TABLE IF NOT EXISTS events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    tenant_id       uuid        NOT NULL,
    aggregate_id    uuid        NOT NULL,
    aggregate_type  text        NOT NULL DEFAULT '',
    version         integer     NOT NULL,
    type            text        NOT NULL,
    payload         jsonb       NOT NULL DEFAULT '{}',
    metadata        jsonb       NOT NULL DEFAULT '{}',
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    UNIQUE (aggregate_id, version)
);

-- Serves the commit-order read: (transaction_id, global_position) > checkpoint, ordered the same way.
CREATE INDEX IF NOT EXISTS events_commit_order ON events (transaction_id, global_position);

-- One notification per inserting transaction: a statement-level trigger with a constant payload.
-- Postgres folds identical notifications of one transaction into one, so a transaction of many
-- INSERT statements still wakes the listener once. The channel is named after the schema so two
-- installations in one database do not wake each other.
CREATE OR REPLACE FUNCTION notify_events_appended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('projectord_' || TG_TABLE_SCHEMA, '');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS events_appended ON events;
CREATE TRIGGER events_appended
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_events_appended();

-- One row per projection: its checkpoint (a (transaction_id, global_position) pair) and its state.
CREATE TABLE IF NOT EXISTS projection_positions (
    name            text        PRIMARY KEY,
    transaction_id  xid8        NOT NULL DEFAULT '0',
    global_position bigint      NOT NULL DEFAULT 0,
    state           text        NOT NULL DEFAULT 'running',
    applied_total   bigint      NOT NULL DEFAULT 0,
    last_error      jsonb,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
