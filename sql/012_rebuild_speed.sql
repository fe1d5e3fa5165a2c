-- A rebuild of the predictions projection that runs in parallel workers, same fold.
--
-- rebuild_predictions' first pass (every prediction event's facts and fold keys, grouped
-- by prediction) is most of a replay's time, and it ran in one process: 010's plan had no
-- Gather. The cause was prediction_facts' subqueries with OFFSET 0 (003), which compute the
-- body, its logs and output, and the log length once each. Inlined into a query over
-- events, they are LATERAL subqueries that refer to the event's columns, and PostgreSQL
-- (15 at least) plans a subquery with such outer references as parallel-unsafe: the whole
-- aggregation stays in the leader, however the statement is issued (CREATE TABLE AS,
-- EXECUTE, a temp table: none of them was the obstacle).
--
-- prediction_facts computes each costly value once another way: as a FROM item that is an
-- expression (a function scan: `FROM coalesce(x) AS v(x)`). A function scan is evaluated
-- once per event, like the fenced subquery, and may run in a worker. Same values, same
-- rules, same stored keys (checked on the benchmark's 1,000,000 events: every row of
-- 003's prediction_facts and of this one is identical); the live path
-- (apply_prediction_event) calls the same function.
--
-- A trap avoided: the output size in the fold keys is pg_column_size of the output as `->`
-- returns it (a 4-byte varlena header). A value that went through a function scan's tuple
-- store may come back with a 1-byte header, 3 bytes smaller; so the output is never put
-- in a function scan, and its size is always taken from `->` directly.


-- What one event says about its prediction, as a predictions row (event_count 1): 003's
-- facts and keys, with two function scans in place of the OFFSET 0 subqueries. body: the
-- prediction object, detoasted once (by '{}' ||, as in 003), since the jsonb operators
-- would otherwise decompress a stored body again for every field they read. n: the log
-- length in characters, read in both keys and costly on long logs. The logs, status and
-- output are read from body where they are used: extracting a field of a detoasted body
-- is cheaper than a third function scan (measured: 003's CPU per event with two, +27%
-- with three).
CREATE OR REPLACE FUNCTION prediction_facts(
    stream text, type text, data jsonb, metadata jsonb, pos bigint, recorded_at timestamptz
) RETURNS SETOF predictions
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT body.b ->> 'id',
           stream_job_id(stream),
           prediction_step(type, data, metadata),
           body.b ->> 'status',
           body.b ->> 'error',
           CASE WHEN octet_length(body.b ->> 'logs') <= 4000 THEN body.b ->> 'logs'
                ELSE right(body.b ->> 'logs', 4000) END,
           coalesce(n.logs_length, 0),
           CASE WHEN jsonb_typeof(body.b -> 'metrics') = 'object' THEN body.b -> 'metrics' ELSE '{}'::jsonb END,
           nullif(body.b -> 'output', 'null'::jsonb),
           output_urls(nullif(body.b -> 'output', 'null'::jsonb)),
           body.b ->> 'model',
           body.b ->> 'version',
           coalesce(body.b -> 'data_removed' = 'true'::jsonb, false),
           text_timestamptz(body.b ->> 'created_at'),
           text_timestamptz(body.b ->> 'started_at'),
           text_timestamptz(body.b ->> 'completed_at'),
           recorded_at,
           recorded_at,
           1,
           prediction_status_rank(body.b ->> 'status')::text
               || fold_key_part(coalesce(n.logs_length, 0), 10)
               || fold_key_part(coalesce(pg_column_size(nullif(body.b -> 'output', 'null'::jsonb)), 0), 10)
               || fold_key_hash(jsonb_hash_extended(body.b, 0))
               || fold_key_part(pos, 19),
           CASE WHEN body.b ->> 'logs' IS NULL THEN '' ELSE
               fold_key_part(n.logs_length, 10)
               || fold_key_hash(hashtextextended(body.b ->> 'logs', 0))
               || fold_key_part(pos, 19) END,
           CASE WHEN nullif(body.b -> 'output', 'null'::jsonb) IS NULL THEN '' ELSE
               fold_key_part(pg_column_size(nullif(body.b -> 'output', 'null'::jsonb)), 10)
               || fold_key_hash(jsonb_hash_extended(nullif(body.b -> 'output', 'null'::jsonb), 0))
               || fold_key_part(pos, 19) END
    FROM coalesce('{}'::jsonb || prediction_body(type, data)) AS body(b)
    CROSS JOIN LATERAL coalesce(length(body.b ->> 'logs')) AS n(logs_length)
    WHERE body.b ->> 'id' IS NOT NULL
$$;

CREATE OR REPLACE FUNCTION rebuild_predictions(p_stream text) RETURNS bigint
LANGUAGE plpgsql
-- The aggregation keeps one group per prediction (about 1 kB each): in memory it reads
-- each event once; spilled to disk it would write and read them all again.
SET work_mem = '256MB'
SET jit = off
AS $$
DECLARE
    n bigint;
    v_compression text := current_setting('default_toast_compression');
BEGIN
    -- The log tails are most of what this writes; lz4, where the server has it, compresses
    -- them several times faster than the default pglz. The stored values are the same.
    IF EXISTS (SELECT FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        PERFORM set_config('default_toast_compression', 'lz4', true);
    END IF;
    -- First each prediction's winning keys, from one pass over its events. A statement that
    -- only reads (CREATE TABLE AS, unlike INSERT) may run in parallel workers: each worker
    -- computes the facts of its share of the events and groups them, the leader merges.
    -- The keys are compared as the live path compares them (the key columns are COLLATE
    -- "C"), which is also cheaper than the database's default collation.
    EXECUTE format($sql$
        CREATE TEMP TABLE rebuild_prediction_groups ON COMMIT DROP AS
        SELECT f.id,
               max(f.job_id::text COLLATE "C")::uuid AS job_id,
               min(f.step) AS step,
               max(f.state_key COLLATE "C") AS state_key,
               max(f.logs_key COLLATE "C") AS logs_key,
               max(f.output_key COLLATE "C") AS output_key,
               fold_key_position(max(f.state_key COLLATE "C")) AS state_at,
               fold_key_position(max(f.logs_key COLLATE "C")) AS logs_at,
               fold_key_position(max(f.output_key COLLATE "C")) AS output_at,
               max(f.model) AS model,
               max(f.version) AS version,
               bool_or(f.data_removed) AS data_removed,
               min(f.created_at) AS created_at,
               min(f.started_at) AS started_at,
               min(f.first_seen_at) AS first_seen_at,
               max(f.updated_at) AS updated_at,
               count(*)::integer AS event_count
        FROM events e
        CROSS JOIN LATERAL prediction_facts(e.stream, e.type, e.data, e.metadata,
                                            e.position, e.recorded_at) f
        WHERE e.type IN ('prediction.submitted', 'replicate.webhook', 'replicate.polled',
                         'prediction.submit_failed')
          AND %s
        GROUP BY f.id
    $sql$, stream_filter(p_stream, 'e')) USING p_stream;
    -- Then the facts of each winning event. One event usually holds the greatest state,
    -- logs and output keys at once: it is read once, and the logs' or output's own winner
    -- is looked up only when it is another event. Winners are a fraction of the events:
    -- each is fetched by position, in position order (so the heap is read front to back),
    -- rather than by hashing every event to find them.
    INSERT INTO predictions
    SELECT g.id, g.job_id, g.step, s.status, s.error,
           CASE WHEN g.logs_at = g.state_at THEN s.logs_tail ELSE l.logs_tail END,
           coalesce(CASE WHEN g.logs_at = g.state_at THEN s.logs_length ELSE l.logs_length END, 0),
           s.metrics,
           CASE WHEN g.output_at = g.state_at THEN s.output ELSE o.output END,
           coalesce(CASE WHEN g.output_at = g.state_at THEN s.output_urls ELSE o.output_urls END,
                    '[]'::jsonb),
           g.model, g.version, g.data_removed, g.created_at, g.started_at, s.completed_at,
           g.first_seen_at, g.updated_at, g.event_count, g.state_key, g.logs_key, g.output_key
    FROM (SELECT * FROM rebuild_prediction_groups ORDER BY state_at OFFSET 0) g
    CROSS JOIN LATERAL (
        SELECT f.*
        FROM events se
        CROSS JOIN LATERAL prediction_facts(se.stream, se.type, se.data, se.metadata,
                                            se.position, se.recorded_at) f
        WHERE se.position = g.state_at
        OFFSET 0) s
    LEFT JOIN LATERAL (
        SELECT f.logs_tail, f.logs_length
        FROM events le
        CROSS JOIN LATERAL prediction_facts(le.stream, le.type, le.data, le.metadata,
                                            le.position, le.recorded_at) f
        WHERE le.position = g.logs_at AND g.logs_at <> g.state_at
        OFFSET 0) l ON true
    LEFT JOIN LATERAL (
        SELECT f.output, f.output_urls
        FROM events oe
        CROSS JOIN LATERAL prediction_facts(oe.stream, oe.type, oe.data, oe.metadata,
                                            oe.position, oe.recorded_at) f
        WHERE oe.position = g.output_at AND g.output_at <> g.state_at
        OFFSET 0) o ON true;
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE rebuild_prediction_groups;
    PERFORM set_config('default_toast_compression', v_compression, true);
    RETURN n;
END $$;
