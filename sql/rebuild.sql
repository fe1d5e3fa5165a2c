-- The rebuild: the fold's facts and fold keys (sql/fold.sql), applied set-based, as
-- `flask --app service replay` runs it (service/replay.py). Each function works on every
-- stream (p_streams NULL) or on some, and expects the caller to have emptied that part of
-- the projections first (clear_projections) in the same transaction. A replay runs them in
-- its own session, where temporary tables named like the projections shadow them
-- (service/scratch.py): they write into whatever `jobs`, `predictions`, `outputs` and
-- `job_activity` name there.
--
-- JIT is off for the rebuild's statements: its compile time (0.3-0.5 s a statement,
-- measured on PostgreSQL 15) exceeds what it saves on these expression-heavy plans.
--
-- Re-applied as a whole by `flask --app service migrate` whenever this file changes (see
-- docs/sql.md): every statement here must be safe to run again.

-- Superseded: the rebuild took one stream (text) until it took a set of them.
DROP FUNCTION IF EXISTS clear_projections(text);
DROP FUNCTION IF EXISTS rebuild_predictions(text);
DROP FUNCTION IF EXISTS rebuild_outputs(text);
DROP FUNCTION IF EXISTS rebuild_jobs(text);
DROP FUNCTION IF EXISTS stream_filter(text, text);
DROP FUNCTION IF EXISTS job_filter(text, text);

-- A filter on the events' stream column for a rebuild of some streams ($1), or none.
CREATE OR REPLACE FUNCTION stream_filter(p_streams text[], alias text) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN p_streams IS NULL THEN 'true' ELSE alias || '.stream = ANY ($1)' END;

-- A filter on a projection's job column for a rebuild of some streams ($1), or none.
CREATE OR REPLACE FUNCTION job_filter(p_streams text[], alias text) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN p_streams IS NULL THEN 'true'
            ELSE alias || '.job_id = ANY (stream_job_ids($1))' END;

-- The job ids among some streams (an orphan prediction's stream is not one).
CREATE OR REPLACE FUNCTION stream_job_ids(p_streams text[]) RETURNS uuid[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY(SELECT stream_job_id(s) FROM unnest(p_streams) s WHERE stream_job_id(s) IS NOT NULL);

-- Empty the projections' rows of some streams (NULL: all), before rebuilding them.
CREATE OR REPLACE FUNCTION clear_projections(p_streams text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_streams IS NULL THEN
        DELETE FROM outputs;
        DELETE FROM predictions;
        DELETE FROM jobs;
        DELETE FROM job_activity;
    ELSE
        DELETE FROM outputs WHERE job_id = ANY (stream_job_ids(p_streams))
            OR (job_id IS NULL AND prediction_id = ANY (p_streams));
        DELETE FROM predictions WHERE job_id = ANY (stream_job_ids(p_streams))
            OR (job_id IS NULL AND id = ANY (p_streams));
        DELETE FROM jobs WHERE id = ANY (stream_job_ids(p_streams));
        DELETE FROM job_activity WHERE job_id = ANY (stream_job_ids(p_streams));
    END IF;
END $$;

-- The positions a full rebuild groups at once (rebuild_grouped). A window's groups are
-- held in memory; grouping the whole store at once keeps one group per prediction or job
-- (about 1 kB each), which past some millions of events no longer fits, and the spilled
-- aggregation writes every event's facts to disk and reads them back (at 20M events, tens
-- of GB). A multiple of the partitions' size, so that each window reads whole partitions.
-- The setting rjs.rebuild_window overrides it (the tests make windows of a few events).
CREATE OR REPLACE FUNCTION rebuild_window() RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
RETURN coalesce(nullif(current_setting('rjs.rebuild_window', true), '')::bigint,
                2 * event_partition_size());

-- Group events into a temporary table (dropped at commit): `key`, then the `partial`
-- aggregates, over `source` (a FROM over events e and a WHERE). For some streams (`only`,
-- a condition on them) in one statement; for the whole store (`only` NULL) a window of
-- positions at a time, in position order, each window into a table of its own. A key whose
-- events lie in several windows then has a group in each, and only those keys are grouped
-- again, by `merged` (the aggregates that combine partial ones: sum for count, max for
-- max...). CREATE TABLE AS, unlike INSERT, may run in parallel workers.
CREATE OR REPLACE FUNCTION rebuild_grouped(p_table text, p_key text, p_partial text,
                                           p_merged text, p_source text, p_only text,
                                           p_streams text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_window bigint := rebuild_window();
    v_from bigint;
    v_last bigint;
    v_parts text[] := '{}';
    v_settings text[];
BEGIN
    SELECT min(position) / v_window * v_window, max(position) INTO v_from, v_last FROM events;
    IF p_only IS NOT NULL OR v_from IS NULL OR v_last < v_from + v_window THEN  -- one statement
        EXECUTE format('CREATE TEMP TABLE %I ON COMMIT DROP AS SELECT %s AS key, %s %s AND %s GROUP BY 1',
                       p_table, p_key, p_partial, p_source, coalesce(p_only, 'true')) USING p_streams;
        RETURN;
    END IF;
    -- A window's groups fit in memory: hash them, reading the window's partitions whole.
    -- The planner, which guesses nearly a group per event, would sort each window instead
    -- (or read it in key order through an index), and a sort carries every column an
    -- aggregate reads into its files: a whole body, for is_final_submit_failure, 1.6 GB a
    -- window of 2M events. Set for these statements only, and put back.
    v_settings := ARRAY[current_setting('enable_sort'), current_setting('enable_indexscan'),
                        current_setting('enable_bitmapscan')];
    PERFORM set_config('enable_sort', 'off', true), set_config('enable_indexscan', 'off', true),
            set_config('enable_bitmapscan', 'off', true);
    WHILE v_from <= v_last LOOP
        v_parts := v_parts || format('%s_%s', p_table, cardinality(v_parts));
        EXECUTE format($sql$
            CREATE TEMP TABLE %I ON COMMIT DROP AS
            SELECT %s AS key, %s %s AND e.position >= %s AND e.position < %s GROUP BY 1
        $sql$, v_parts[cardinality(v_parts)], p_key, p_partial, p_source, v_from, v_from + v_window);
        v_from := v_from + v_window;
    END LOOP;
    PERFORM set_config('enable_sort', v_settings[1], true),
            set_config('enable_indexscan', v_settings[2], true),
            set_config('enable_bitmapscan', v_settings[3], true);
    EXECUTE format($sql$
        CREATE TEMP TABLE %1$I ON COMMIT DROP AS
        WITH parts AS (%2$s),
        split AS (SELECT key FROM parts GROUP BY key HAVING count(*) > 1)
        SELECT f.* FROM parts f WHERE NOT EXISTS (SELECT FROM split s WHERE s.key = f.key)
        UNION ALL
        SELECT f.key, %3$s FROM parts f WHERE EXISTS (SELECT FROM split s WHERE s.key = f.key)
        GROUP BY f.key
    $sql$, p_table,
       (SELECT string_agg(format('SELECT * FROM %I', t), ' UNION ALL ') FROM unnest(v_parts) t),
       p_merged);
    FOR i IN 1 .. cardinality(v_parts) LOOP
        EXECUTE format('DROP TABLE %I', v_parts[i]);
    END LOOP;
END $$;

-- Every prediction: first each one's winning keys from one pass over its events, then the
-- facts of the winning events.
CREATE OR REPLACE FUNCTION rebuild_predictions(p_streams text[]) RETURNS bigint
LANGUAGE plpgsql
-- A window's aggregation keeps one group per prediction (about 1 kB each) in memory.
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
    -- First each prediction's winning keys, from one pass over its events: each process
    -- computes the facts of its share of the events and groups them, the leader merges.
    -- The keys are compared as the live path compares them (the key columns are COLLATE
    -- "C"), which is also cheaper than the database's default collation.
    PERFORM rebuild_grouped('rebuild_prediction_groups', 'f.id', $partial$
               max(f.job_id::text COLLATE "C")::uuid AS job_id, min(f.step) AS step,
               max(f.state_key COLLATE "C") AS state_key, max(f.logs_key COLLATE "C") AS logs_key,
               max(f.output_key COLLATE "C") AS output_key, max(f.model) AS model,
               max(f.version) AS version, bool_or(f.data_removed) AS data_removed,
               min(f.created_at) AS created_at, min(f.started_at) AS started_at,
               min(f.first_seen_at) AS first_seen_at, max(f.updated_at) AS updated_at,
               count(*)::integer AS event_count $partial$, $merged$
               max(f.job_id::text COLLATE "C")::uuid, min(f.step), max(f.state_key COLLATE "C"),
               max(f.logs_key COLLATE "C"), max(f.output_key COLLATE "C"), max(f.model),
               max(f.version), bool_or(f.data_removed), min(f.created_at), min(f.started_at),
               min(f.first_seen_at), max(f.updated_at), sum(f.event_count)::integer $merged$, $source$
        FROM events e
        CROSS JOIN LATERAL prediction_facts(e.stream, e.type, e.data, e.metadata,
                                            e.position, e.recorded_at) f
        WHERE e.type IN ('prediction.submitted', 'replicate.webhook', 'replicate.polled',
                         'prediction.submit_failed') $source$,
        CASE WHEN p_streams IS NOT NULL THEN stream_filter(p_streams, 'e') END, p_streams);
    -- The predictions a retry submitted again (job.retried events name them, in their job's
    -- stream): superseded, as apply_event marks them on the live path.
    EXECUTE format($sql$
        CREATE TEMP TABLE rebuild_retried ON COMMIT DROP AS
        SELECT DISTINCT r.id, stream_job_id(e.stream) AS job_id
        FROM events e CROSS JOIN LATERAL jsonb_array_elements_text(e.data -> 'predictions') r(id)
        WHERE e.type = 'job.retried' AND %s
    $sql$, stream_filter(p_streams, 'e')) USING p_streams;
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
           g.first_seen_at, g.updated_at, g.event_count, g.state_key, g.logs_key, g.output_key,
           coalesce((g.id, g.job_id) IN (SELECT r.id, r.job_id FROM rebuild_retried r), false)
    FROM (SELECT f.key AS id, f.*, fold_key_position(f.state_key) AS state_at,
                 fold_key_position(f.logs_key) AS logs_at,
                 fold_key_position(f.output_key) AS output_at
          FROM rebuild_prediction_groups f ORDER BY state_at OFFSET 0) g
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
    DROP TABLE rebuild_retried;
    PERFORM set_config('default_toast_compression', v_compression, true);
    RETURN n;
END $$;

-- Every output: the event with the greatest fold key of each (prediction, index).
CREATE OR REPLACE FUNCTION rebuild_outputs(p_streams text[]) RETURNS bigint
LANGUAGE plpgsql
SET work_mem = '256MB'  -- sort the outputs in memory, not in files
SET jit = off
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format($sql$
        INSERT INTO outputs
        SELECT DISTINCT ON (f.prediction_id, f.index) f.*
        FROM events e
        CROSS JOIN LATERAL output_facts(e.stream, e.type, e.data, e.position, e.recorded_at) f
        WHERE e.type IN ('output.processed', 'output.failed') AND %s
        ORDER BY f.prediction_id, f.index, f.fold_key DESC
    $sql$, stream_filter(p_streams, 'e')) USING p_streams;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Every job, and its job_activity row, each inserted once with its derived columns
-- computed on the way in by job_derived_values (the definition the live path's touch_job
-- uses as well).
--
-- The rows are written in the order of the jobs_created_at index. Four of the jobs
-- table's six indexes lead with created_at (or with model or status, then created_at);
-- rows inserted in whatever order the joins leave them (by job id: random) land on a
-- random leaf page of every index. Sorted by (created_at DESC, id DESC), each index fills
-- nearly in order. Measured on the replay benchmark's 196,080 jobs, the same database and
-- PostgreSQL 15, four runs each, taking turns: unsorted 14.3, 13.2, 12.3, 11.9 s; sorted
-- 10.0, 12.4, 10.8, 11.0 s (copying the finished rows alone into an indexed copy of jobs:
-- 4.5 s unsorted, 3.1 s sorted). Same rows; only the order in which they are written changes.

CREATE OR REPLACE FUNCTION rebuild_jobs(p_streams text[]) RETURNS bigint
LANGUAGE plpgsql
-- Group the events by stream and join the rollups in memory (hash tables), rather than
-- reading events in stream order through the index and sorting rollups in files.
SET work_mem = '256MB'
SET jit = off
AS $$
DECLARE
    n bigint;
BEGIN
    -- Each stream's statistics, as the view job_stream_stats has them (the live path's), a
    -- window of positions at a time (rebuild_grouped).
    PERFORM rebuild_grouped('rebuild_stream_stats', 'e.stream', $partial$
               count(*)::integer AS event_count,
               min(e.position) FILTER (WHERE e.type = 'job.created') AS first_position,
               max(e.position) AS last_position,
               max(e.recorded_at) AS updated_at,
               min(e.recorded_at) FILTER (WHERE e.type = 'job.canceled') AS canceled_at,
               count(*) FILTER (WHERE is_final_submit_failure(e.type, e.data))::integer AS submit_failures,
               max(e.recorded_at) FILTER (WHERE e.type = 'job.retried') AS retried_at $partial$, $merged$
               sum(f.event_count)::integer, min(f.first_position), max(f.last_position),
               max(f.updated_at),
               min(f.canceled_at), sum(f.submit_failures)::integer, max(f.retried_at) $merged$,
        ' FROM events e WHERE true ', CASE WHEN p_streams IS NOT NULL THEN stream_filter(p_streams, 'e') END,
        p_streams);
    -- s: each job stream's statistics, for job_activity and for the jobs rows alike.
    -- b: each job as job.created describes it, and how many of its predictions_expected
    -- are step 1's (all but a second step's one) (OFFSET 0: hand job_derived_values plain
    -- columns, since an argument that is an expression used more than once keeps the
    -- functions it calls from being inlined, and a call per job costs more than the rest).
    -- When one stream is rebuilt, the rollups are filtered to its job, so they group only
    -- its rows.
    EXECUTE format($sql$
        WITH s AS MATERIALIZED (
            SELECT s.key AS stream, s.* FROM rebuild_stream_stats s
            WHERE stream_job_id(s.key) IS NOT NULL),
        activity AS (
            INSERT INTO job_activity (job_id, event_count, first_position, last_position, updated_at)
            SELECT stream_job_id(s.stream), s.event_count, s.first_position, s.last_position,
                   s.updated_at FROM s)
        INSERT INTO jobs (id, model, version, deployment, aspect_ratio, postprocess, input,
                          next_step, metadata, status, predictions_expected, predictions_submitted,
                          predictions_succeeded, predictions_failed, submit_failures,
                          outputs_expected, outputs_processed, outputs_failed, outputs, error,
                          canceled_at, created_at, started_at, completed_at, owner_id, deadline)
        SELECT b.id, b.model, b.version, b.deployment, b.aspect_ratio, b.postprocess, b.input,
               b.next_step, b.metadata, d.status, b.predictions_expected, d.predictions_submitted,
               d.predictions_succeeded, d.predictions_failed, b.submit_failures,
               d.outputs_expected, d.outputs_processed, d.outputs_failed, d.outputs, d.error,
               b.canceled_at, b.created_at, d.started_at, d.completed_at, b.owner_id, b.round_deadline
        FROM (SELECT j.*, j.predictions_expected - (j.next_step IS NOT NULL)::integer AS first_step_expected,
                     -- the deadline runs from the latest retry, as apply_event moves it
                     j.deadline + greatest(s.retried_at - j.created_at, interval '0') AS round_deadline
              FROM s
              JOIN events c ON c.stream = s.stream AND c.type = 'job.created'
              CROSS JOIN LATERAL job_facts(c.stream, c.data, c.recorded_at, s.canceled_at,
                                           s.submit_failures) j
              OFFSET 0) b
        LEFT JOIN job_step_rollups r1 ON r1.job_id = b.id AND r1.step = 1 AND %1$s
        LEFT JOIN job_step_output_rollups o1 ON o1.job_id = b.id AND o1.step = 1 AND %2$s
        LEFT JOIN job_step_rollups r2 ON r2.job_id = b.id AND r2.step = 2 AND %3$s
        LEFT JOIN job_step_output_rollups o2 ON o2.job_id = b.id AND o2.step = 2 AND %4$s
        CROSS JOIN LATERAL job_derived_values(b.canceled_at, b.first_step_expected,
                                              b.next_step IS NOT NULL, r1, o1, r2, o2,
                                              b.round_deadline) d
        ORDER BY b.created_at DESC, b.id DESC
    $sql$, job_filter(p_streams, 'r1'), job_filter(p_streams, 'o1'),
       job_filter(p_streams, 'r2'), job_filter(p_streams, 'o2')) USING p_streams;
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE rebuild_stream_stats;
    RETURN n;
END $$;
