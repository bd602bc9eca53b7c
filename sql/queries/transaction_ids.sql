-- name: transaction_ids_ahead
-- Transaction ids this server never handed out: the newest event's, with the server's next id
-- (the snapshot's xmax: the first id not yet assigned; read without taking an id, unlike
-- pg_current_xact_id()). Every id this cluster assigned is below `next_id`, and a checkpoint
-- (newest_checkpoint_transaction, positions.sql, read before this) is at most a past horizon (a
-- snapshot's xmin), so at most `next_id`. Anything higher came from another cluster: a pg_dump
-- restore, logical replication (docs/ordering.md). The newest event is one probe at the end of
-- an index (events_commit_order).
SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next_id,
       (SELECT e.transaction_id::text::bigint FROM {schema}.events e
        ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1) AS newest_event;
