-- name: fetch_batch
-- The next batch of a projection in commit order, with the safe horizon it was read under.
-- One statement, so the horizon and the rows come from the same snapshot: every transaction below
-- the snapshot's xmin has ended, so no event can later appear at or behind a checkpoint taken here.
-- The horizon row is always returned (LEFT JOIN), with NULL event columns when the batch is empty.
-- No outer ORDER BY: the lateral join is a nested loop over the single horizon row, which keeps
-- the index order, and an outer sort would cost more than the scan (tests/integration/test_query_plan.py).
-- `held_back` says some committed events sit beyond the horizon, waiting for an older transaction.
-- Columns come in the forms cheapest to turn into an `Event` (projectord/fetcher.py): payload and
-- metadata as JSON text, recorded_at as it is sent in binary (microseconds since 2000-01-01,
-- which the fetch reads as an integer) and the event id as its 16 bytes (`uuid_send`: a UUID
-- object cost the client about 0.15 µs a row), each decoded only if a handler reads it; the
-- transaction id as xid8 in binary (an integer too). Computing an epoch (numeric arithmetic) and
-- a transaction id's text for every row cost the server about 0.35 µs a row, as much as the
-- rest of the row's conversion. Converted columns are aliased and the ORDER BY is qualified, so
-- it sorts by the index's columns, never by a converted output column.
-- `held_back` compares the newest transaction id with the horizon: one probe at the end of the
-- index whatever the table's size (an EXISTS over `transaction_id >= horizon`, a value the
-- planner cannot see, may be planned as a sequential scan that reads the whole table).
-- `newest` is that newest event's position, about the table's size: a plan prepared while the
-- table was small (a sequential scan) is replaced once it has doubled (projectord/fetcher.py).
-- The byte bound, cheaply: an event whose payload and metadata text exceed `max_event_bytes`
-- comes without them (NULL, which the columns never are), so `limit` events weigh at most
-- `limit * max_event_bytes`. The client keeps the events before the first such one and reads
-- from there with `fetch_batch_by_bytes` (projectord/fetcher.py). A running sum over the batch
-- instead (a window) cost the server as much again as the whole read.
WITH horizon AS (
    SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin
), newest AS (
    SELECT w.transaction_id, w.global_position FROM {schema}.events w
    ORDER BY w.transaction_id DESC LIMIT 1
)
SELECT h.xmin::text::bigint AS horizon,
       coalesce((SELECT n.transaction_id >= h.xmin FROM newest n), false) AS held_back,
       coalesce((SELECT n.global_position FROM newest n), 0) AS newest,
       e.global_position, e.event_id, e.tenant_id, e.aggregate_id, e.aggregate_type, e.version,
       e.type,
       CASE WHEN octet_length(e.payload_json) + octet_length(e.metadata_json)
                 <= %(max_event_bytes)s THEN e.payload_json END AS payload_json,
       CASE WHEN octet_length(e.payload_json) + octet_length(e.metadata_json)
                 <= %(max_event_bytes)s THEN e.metadata_json END AS metadata_json,
       e.recorded_at, e.txid, e.schema_version
FROM horizon h
LEFT JOIN LATERAL (
    SELECT ev.global_position, pg_catalog.uuid_send(ev.event_id) AS event_id, ev.tenant_id,
           ev.aggregate_id, ev.aggregate_type, ev.version, ev.type, ev.payload::text AS payload_json,
           ev.metadata::text AS metadata_json,
           ev.recorded_at, ev.transaction_id AS txid, ev.schema_version
    FROM {schema}.events ev
    WHERE (ev.transaction_id, ev.global_position) > (%(txid)s::xid8, %(position)s::bigint)
      AND ev.transaction_id < h.xmin
      AND ev.type = ANY(%(types)s::text[])
    ORDER BY ev.transaction_id, ev.global_position
    LIMIT %(limit)s
) e ON true;

-- name: fetch_batch_by_bytes
-- `fetch_batch` bounded by a running sum of bytes, for events too large for its cheap bound.
-- A batch is bounded in bytes too: an event counts its payload and metadata as the JSON text
-- sent here; `running` is the batch's total up to and including it (a window over the rows already
-- in commit order: no sort). Rows past `max_bytes` are never sent, except that a first row larger
-- than the bound comes alone when `alone` (a read-ahead passes false: it must fit what is left).
-- `more` on the last row sent says the bound cut the batch: more rows were read than sent. The
-- rows past the cut are still read and converted here, which is why the client asks for only
-- about as many rows as its byte bound is likely to hold (projectord/fetcher.py).
WITH horizon AS (
    SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin
), newest AS (
    SELECT w.transaction_id, w.global_position FROM {schema}.events w
    ORDER BY w.transaction_id DESC LIMIT 1
)
SELECT h.xmin::text::bigint AS horizon,
       coalesce((SELECT n.transaction_id >= h.xmin FROM newest n), false) AS held_back,
       coalesce((SELECT n.global_position FROM newest n), 0) AS newest,
       e.running, e.more,
       e.global_position, e.event_id, e.tenant_id, e.aggregate_id, e.aggregate_type, e.version,
       e.type, e.payload_json, e.metadata_json, e.recorded_at, e.txid, e.schema_version
FROM horizon h
LEFT JOIN LATERAL (
    SELECT b.* FROM (
        SELECT r.*, sum(octet_length(r.payload_json) + octet_length(r.metadata_json)) OVER w
                   AS running,
               row_number() OVER w AS n,
               pg_catalog.lead(r.global_position) OVER w IS NOT NULL AS more
        FROM (
            SELECT ev.transaction_id, ev.global_position,
                   pg_catalog.uuid_send(ev.event_id) AS event_id, ev.tenant_id,
                   ev.aggregate_id, ev.aggregate_type, ev.version, ev.type,
                   ev.payload::text AS payload_json, ev.metadata::text AS metadata_json,
                   ev.recorded_at, ev.transaction_id AS txid, ev.schema_version
            FROM {schema}.events ev
            WHERE (ev.transaction_id, ev.global_position) > (%(txid)s::xid8, %(position)s::bigint)
              AND ev.transaction_id < h.xmin
              AND ev.type = ANY(%(types)s::text[])
            ORDER BY ev.transaction_id, ev.global_position
            LIMIT %(limit)s
        ) r
        WINDOW w AS (ORDER BY r.transaction_id, r.global_position
                     ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
    ) b
    WHERE b.running <= %(max_bytes)s OR (b.n = 1 AND %(alone)s)
) e ON true;

-- name: append_events
-- One statement for the whole append, rows in the order given (identity values follow it).
-- `schema_version`: the version of each payload's shape (projectord/upcasting.py).
INSERT INTO {schema}.events
    (event_id, tenant_id, aggregate_id, aggregate_type, version, type, payload, metadata,
     schema_version)
SELECT u.event_id, u.tenant_id, u.aggregate_id, u.aggregate_type, u.version, u.type, u.payload,
       u.metadata, u.schema_version
FROM ROWS FROM (pg_catalog.unnest(%(event_ids)s::uuid[]), pg_catalog.unnest(%(tenant_ids)s::uuid[]),
               pg_catalog.unnest(%(aggregate_ids)s::uuid[]),
               pg_catalog.unnest(%(aggregate_types)s::text[]),
               pg_catalog.unnest(%(versions)s::int[]), pg_catalog.unnest(%(types)s::text[]),
               pg_catalog.unnest(%(payloads)s::jsonb[]), pg_catalog.unnest(%(metadata)s::jsonb[]),
               pg_catalog.unnest(%(schema_versions)s::int[]))
     WITH ORDINALITY AS u(event_id, tenant_id, aggregate_id, aggregate_type, version, type,
                          payload, metadata, schema_version, n)
ORDER BY u.n
RETURNING global_position;

-- name: aggregate_version
SELECT coalesce(max(version), 0) FROM {schema}.events WHERE aggregate_id = %(aggregate_id)s;

-- name: load_aggregate
-- Payload and metadata as JSON text, decoded (and upcast) only when `apply` reads them.
SELECT global_position, event_id, tenant_id, aggregate_id, aggregate_type, version, type,
       payload::text, metadata::text, recorded_at, transaction_id::text, schema_version
FROM {schema}.events
WHERE aggregate_id = %(aggregate_id)s AND version > %(after_version)s
ORDER BY version;

-- name: latest_event_of_types
-- The last committed event of these types in commit order: `wait` waits until checkpoints pass it.
-- ORDER BY is qualified: a bare `transaction_id` would sort by the text output column ('999' after
-- '1337'), and return an event far behind the last one.
SELECT e.transaction_id::text, e.global_position
FROM {schema}.events e
WHERE e.type = ANY(%(types)s::text[])
ORDER BY e.transaction_id DESC, e.global_position DESC
LIMIT 1;

-- name: count_unapplied
-- Lag: committed events of a projection's types beyond its checkpoint.
SELECT count(*)
FROM {schema}.events
WHERE (transaction_id, global_position) > (%(txid)s::xid8, %(position)s::bigint)
  AND type = ANY(%(types)s::text[]);

-- name: count_events
SELECT count(*) FROM {schema}.events;
