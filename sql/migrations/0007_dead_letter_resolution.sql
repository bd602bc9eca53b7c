-- How a dead letter was dealt with. The row stays, as a record; pending ones have resolved_at NULL.
-- resolution: 'retried' (`projectord dead-letters retry` re-applied the event) or 'rebuilt' (a
-- rebuild of the projection started over from the first event, so it meets the event again).
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS resolved_at timestamptz;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS resolution text;

CREATE INDEX IF NOT EXISTS dead_letters_pending ON dead_letters (projection, id)
    WHERE resolved_at IS NULL;
