-- Dead letters: events a projection could not apply and an operator moved aside (`projectord
-- skip`), so the projection could go on. The event itself stays in `events`; this row says which
-- projection gave up on it, why, and after how many attempts, so it can be inspected and retried.
CREATE TABLE IF NOT EXISTS dead_letters (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection      text        NOT NULL,
    event_id        uuid        NOT NULL,
    global_position bigint      NOT NULL,
    transaction_id  xid8        NOT NULL,
    event_type      text        NOT NULL,
    error_type      text,
    error_message   text        NOT NULL DEFAULT '',
    traceback       text,
    attempts        integer     NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS dead_letters_projection ON dead_letters (projection, created_at);
