-- The command store: every command submitted through `dispatch`, with its outcome.
-- Runs with search_path set to projectord's own schema; every object below lands there.
--
-- `id` is the client's idempotency key: a command id is handled once, and dispatching it again
-- returns the stored outcome. `pending` rows are commands stored but not yet decided (a dispatcher
-- died between storing and deciding); dispatching the same id again completes them.

CREATE TABLE IF NOT EXISTS commands (
    id            uuid        PRIMARY KEY,
    tenant_id     uuid        NOT NULL,
    type          text        NOT NULL,
    payload       jsonb       NOT NULL DEFAULT '{}',
    metadata      jsonb       NOT NULL DEFAULT '{}',
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'consumed', 'processed', 'failed')),
    aggregate_id  uuid,
    result        jsonb,
    error         text,
    attempts      integer     NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- "What did this aggregate receive?" and "what is still pending or failed?" for operators.
CREATE INDEX IF NOT EXISTS commands_by_aggregate ON commands (aggregate_id, created_at);
CREATE INDEX IF NOT EXISTS commands_unfinished ON commands (created_at)
    WHERE status IN ('pending', 'failed');
