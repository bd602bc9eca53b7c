-- name: transaction_ids_ahead
-- Transaction ids this server never handed out: the newest event's and the newest checkpoint's,
-- with the server's next id (the snapshot's xmax: the first id not yet assigned; read without
-- taking an id, unlike pg_current_xact_id()). Every id this cluster assigned is below `next_id`,
-- and a checkpoint is at most a past horizon (a snapshot's xmin), so at most `next_id`. Anything
-- higher came from another cluster: a pg_dump restore, logical replication (docs/ordering.md).
-- Each newest value is one probe at the end of an index (events_commit_order) or a small table.
SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next_id,
       (SELECT e.transaction_id::text::bigint FROM {schema}.events e
        ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1) AS newest_event,
       (SELECT p.transaction_id::text::bigint FROM {schema}.projection_positions p
        ORDER BY p.transaction_id DESC LIMIT 1) AS newest_checkpoint;
