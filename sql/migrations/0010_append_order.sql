-- Each aggregate's events reach projections in version order, and the store alone sets
-- `transaction_id` (docs/ordering.md).
--
-- Projections read in commit order, (transaction_id, global_position). A transaction gets its id at
-- its first write, so a transaction that took its id early (a dispatcher that locked its command
-- row, a writer that lost an optimistic-concurrency race and retried in a savepoint) could append
-- version n+1 with a *lower* id than version n's, and every projection read n+1 first. This
-- BEFORE INSERT row trigger (it fires for INSERT and COPY alike):
--   * sets NEW.transaction_id to the appending transaction's own id, whatever the writer sent: an
--     old value would hide the event behind checkpoints, a future one would hold the horizon;
--   * refuses, with SQLSTATE 40001, an append whose transaction id is lower than that of the
--     aggregate's latest version: retried in a fresh transaction, it gets a higher id;
--   * refuses, with SQLSTATE 23514, a version below the aggregate's latest one that does not exist
--     yet (a gap filled late, or one statement writing n+1 before n): no retry can order it.
--     A version that exists already is left to UNIQUE (aggregate_id, version), so a stale writer
--     still gets the usual unique violation.
-- Versions written earlier in the same transaction (or statement, or COPY: a row trigger sees the
-- rows its statement wrote before) carry the same id and a lower position, so they pass. The
-- latest version is one backward probe of the (aggregate_id, version) unique index.
-- The common path evaluates only simple expressions (plpgsql's fast path, no executor run).
-- The schema is a constant of the function (like 0009's channel): no search_path lookups per row.
-- enable_seqscan is off inside it because a session plans the lookup once and keeps the plan: made
-- while the table was tiny (a new store, stale statistics) it would be a sequential scan, kept
-- for every later row of that session, and a bulk INSERT or COPY would go quadratic
-- (tests/test_batch_transaction.py grows the table so). With it off, the plan is the index probe.
DO $migration$
BEGIN
    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION order_appended_event() RETURNS trigger
        LANGUAGE plpgsql SET enable_seqscan = off AS $body$
        DECLARE
            latest_version integer;
            latest_id xid8;
        BEGIN
            NEW.transaction_id := pg_current_xact_id();
            SELECT e.version, e.transaction_id INTO latest_version, latest_id
            FROM %1$I.events e
            WHERE e.aggregate_id = NEW.aggregate_id
            ORDER BY e.version DESC
            LIMIT 1;
            IF latest_version IS NULL THEN
                RETURN NEW;
            END IF;
            IF latest_version < NEW.version THEN
                IF latest_id > NEW.transaction_id THEN
                    RAISE EXCEPTION USING
                        ERRCODE = 'serialization_failure',
                        MESSAGE = format('aggregate %%s: version %%s cannot be appended by'
                            ' transaction %%s, older than transaction %%s that appended version'
                            ' %%s: an aggregate''s versions must come from ever newer'
                            ' transactions', NEW.aggregate_id, NEW.version, NEW.transaction_id,
                            latest_id, latest_version),
                        HINT = 'retry the whole transaction: a new transaction gets a newer id';
                END IF;
                RETURN NEW;
            END IF;
            -- Rare: a version at or below the latest. An existing one is the unique constraint's.
            IF EXISTS (
                SELECT FROM %1$I.events e
                WHERE e.aggregate_id = NEW.aggregate_id AND e.version = NEW.version
            ) THEN
                RETURN NEW;
            END IF;
            RAISE EXCEPTION USING
                ERRCODE = 'check_violation',
                MESSAGE = format('aggregate %%s: version %%s is below its latest version %%s and'
                    ' cannot be ordered after it', NEW.aggregate_id, NEW.version, latest_version),
                HINT = 'append each aggregate''s versions in increasing order';
        END;
        $body$
    $function$, current_schema());
END;
$migration$;

DROP TRIGGER IF EXISTS events_ordered ON events;
CREATE TRIGGER events_ordered
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION order_appended_event();
