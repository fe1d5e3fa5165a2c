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

-- What a replay's scratch copy of predictions keeps in place of a log tail (its winning
-- logs event is named by logs_key, whose position it reads the tail from again where one
-- is written: service/scratch.py): a 64-bit hash of it, as text. The tails are two thirds
-- of a predictions row's bytes; at 20M events the scratch copy with them took 7.3 GB, more
-- than the page cache had left beside the store, and it was read back four times (the
-- jobs' step rollups, two indexes, the comparison). The comparison hashes the live tails
-- the same way, so a live tail that differs is still found.
CREATE OR REPLACE FUNCTION scratch_digest(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtextextended(value, 0)::text;

-- Until the transaction ends, values written compressed are compressed with lz4 where the
-- server has it: several times faster than the default pglz, on log tails above all. The
-- stored values are the same. (rebuild_predictions, and a replay's restore_ahead.)
CREATE OR REPLACE FUNCTION prefer_lz4_compression() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        PERFORM set_config('default_toast_compression', 'lz4', true);
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

-- Superseded: one grouping a pass, where rebuild_windowed makes several in one.
DROP FUNCTION IF EXISTS rebuild_grouped(text, text, text, text, text, text, text[]);

-- Fill temporary tables (dropped at commit) from the events, each by a SELECT (`selects`,
-- its rows' first column `key`) whose `{window}` is a condition on events e. For some
-- streams (`only`, a condition on them) one statement each; for the whole store (`only`
-- NULL) a window of positions at a time, in position order: each window's statements run
-- one after the other, so that the window's partitions, read from disk by the first, are
-- still in memory for the others (a pass per table read the whole store from disk each
-- time, at 20M events 17.5 GB). CREATE TABLE AS, unlike INSERT, may run in parallel workers.
--
-- Each window's rows go into a table of their own, and the table named in `tables` is
-- their parent (inheritance: reading it reads them all; the readers drop it with CASCADE).
-- A key found in several windows has a row in each: those rows, a few, are deleted and
-- combined into one by `merges` (a SELECT over `split_parts f`, the deleted rows: the
-- aggregates that combine partial ones, sum for count, max for max...), written to one
-- more child. (Copying every window's rows into one table, but the split keys' merged,
-- read them three times and wrote them all again: 24.5 s of a 20M-event replay.)
CREATE OR REPLACE FUNCTION rebuild_windowed(p_tables text[], p_selects text[], p_merges text[],
                                            p_only text, p_streams text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_window bigint := rebuild_window();
    v_from bigint;
    v_last bigint;
    v_windows integer := 0;
    v_settings text[];
    v_hashagg text := current_setting('enable_hashagg');
BEGIN
    SELECT min(position) / v_window * v_window, max(position) INTO v_from, v_last FROM events;
    IF p_only IS NOT NULL OR v_from IS NULL OR v_last < v_from + v_window THEN  -- one statement
        FOR i IN 1 .. cardinality(p_tables) LOOP
            EXECUTE format('CREATE TEMP TABLE %I ON COMMIT DROP AS %s', p_tables[i],
                           replace(p_selects[i], '{window}', coalesce(p_only, 'true'))) USING p_streams;
        END LOOP;
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
        FOR i IN 1 .. cardinality(p_tables) LOOP
            EXECUTE format('CREATE TEMP TABLE %I ON COMMIT DROP AS %s', p_tables[i] || '_' || v_windows,
                           replace(p_selects[i], '{window}', format('e.position >= %s AND e.position < %s',
                                                                    v_from, v_from + v_window)));
        END LOOP;
        v_windows := v_windows + 1;
        v_from := v_from + v_window;
    END LOOP;
    PERFORM set_config('enable_sort', v_settings[1], true),
            set_config('enable_indexscan', v_settings[2], true),
            set_config('enable_bitmapscan', v_settings[3], true);
    FOR i IN 1 .. cardinality(p_tables) LOOP
        EXECUTE format('CREATE TEMP TABLE %I ON COMMIT DROP AS SELECT * FROM %I LIMIT 0',
                       p_tables[i], p_tables[i] || '_0');
        FOR w IN 0 .. v_windows - 1 LOOP
            EXECUTE format('ALTER TABLE %I INHERIT %I', p_tables[i] || '_' || w, p_tables[i]);
        END LOOP;
        EXECUTE format('CREATE TEMP TABLE %I () INHERITS (%I) ON COMMIT DROP',
                       p_tables[i] || '_split', p_tables[i]);
        -- Only a 64-bit hash of each key is grouped (8 bytes, where the text key took ~40),
        -- then the rows of the hashes found more than once are taken out of their windows
        -- and combined by key: two keys with one hash are each combined with themselves
        -- alone, as if split. Grouped sorted, not hashed: a hash table of every key of a
        -- large store is far larger than the CPU's caches, and each key lands on a random
        -- part of it (at 20M events, 3.9M prediction keys: 3.8-4.7 s hashed, in 508 MB;
        -- 1.8-1.9 s sorted, in a 98 MB sort; hashed, the three tables took 10.1 s of a
        -- 170 s scan).
        PERFORM set_config('enable_hashagg', 'off', true);
        EXECUTE format('CREATE TEMP TABLE rebuild_split ON COMMIT DROP AS '
                       'SELECT hashtextextended(key, 0) AS hash FROM %I GROUP BY 1 HAVING count(*) > 1',
                       p_tables[i]);
        PERFORM set_config('enable_hashagg', v_hashagg, true);
        ANALYZE rebuild_split;
        EXECUTE format($sql$
            WITH split_parts AS (
                DELETE FROM %1$I f WHERE hashtextextended(f.key, 0) IN (SELECT s.hash FROM rebuild_split s)
                RETURNING f.*)
            INSERT INTO %2$I %3$s
        $sql$, p_tables[i], p_tables[i] || '_split', p_merges[i]);
        DROP TABLE rebuild_split;
    END LOOP;
END $$;

-- The first phase of a rebuild: one pass over the events (of some streams, or all, a window
-- at a time) into the temporary tables the others read, dropped at commit:
-- rebuild_prediction_groups: each prediction's winning keys and the aggregates of its
--   events (rebuild_predictions fetches the facts of its winning events);
-- rebuild_output_facts: each output's winning event's row (rebuild_outputs);
-- rebuild_stream_stats: each stream's statistics, as the view job_stream_stats has them
--   (the live path's: keep the two alike), and its job.created's body and time (a stream
--   has one), for rebuild_jobs.
-- Returns how many events it read.
CREATE OR REPLACE FUNCTION rebuild_scan(p_streams text[]) RETURNS bigint
LANGUAGE plpgsql
-- A window's aggregation keeps one group per prediction or stream (about 1 kB each) in memory.
SET work_mem = '256MB'
SET jit = off
AS $$
DECLARE
    n bigint;
BEGIN
    -- The keys are compared as the live path compares them (the key columns are COLLATE
    -- "C"), which is also cheaper than the database's default collation.
    PERFORM rebuild_windowed(
        ARRAY['rebuild_prediction_groups', 'rebuild_output_facts', 'rebuild_stream_stats'],
        ARRAY[$predictions$
            SELECT f.id AS key,
                   max(f.job_id::text COLLATE "C")::uuid AS job_id, min(f.step) AS step,
                   max(f.state_key COLLATE "C") AS state_key, max(f.logs_key COLLATE "C") AS logs_key,
                   max(f.output_key COLLATE "C") AS output_key, max(f.model) AS model,
                   max(f.version) AS version, bool_or(f.data_removed) AS data_removed,
                   min(f.created_at) AS created_at, min(f.started_at) AS started_at,
                   min(f.first_seen_at) AS first_seen_at, max(f.updated_at) AS updated_at,
                   count(*)::integer AS event_count
            FROM events e
            CROSS JOIN LATERAL prediction_facts(e.stream, e.type, e.data, e.metadata,
                                                e.position, e.recorded_at) f
            WHERE e.type IN ('prediction.submitted', 'replicate.webhook', 'replicate.polled',
                             'prediction.submit_failed') AND {window}
            GROUP BY 1
            ORDER BY fold_key_position(max(f.state_key COLLATE "C")) $predictions$,
        $outputs$
            SELECT DISTINCT ON (1) (f.prediction_id || '/' || f.index) COLLATE "C" AS key, f AS output
            FROM events e
            CROSS JOIN LATERAL output_facts(e.stream, e.type, e.data, e.position, e.recorded_at) f
            WHERE e.type IN ('output.processed', 'output.failed') AND {window}
            ORDER BY 1, f.fold_key DESC $outputs$,
        $streams$
            SELECT e.stream AS key,
                   count(*)::integer AS event_count,
                   min(e.position) FILTER (WHERE e.type = 'job.created') AS first_position,
                   max(e.position) AS last_position,
                   max(e.recorded_at) AS updated_at,
                   min(e.recorded_at) FILTER (WHERE e.type = 'job.canceled') AS canceled_at,
                   count(*) FILTER (WHERE is_final_submit_failure(e.type, e.data))::integer AS submit_failures,
                   max(e.recorded_at) FILTER (WHERE e.type = 'job.retried') AS retried_at,
                   min(e.recorded_at) FILTER (WHERE e.type = 'job.created') AS created_at,
                   min(e.data::text COLLATE "C") FILTER (WHERE e.type = 'job.created') AS created_data
            FROM events e WHERE {window}
            GROUP BY 1 $streams$],
        ARRAY[$predictions$
            SELECT f.key, max(f.job_id::text COLLATE "C")::uuid, min(f.step), max(f.state_key COLLATE "C"),
                   max(f.logs_key COLLATE "C"), max(f.output_key COLLATE "C"), max(f.model),
                   max(f.version), bool_or(f.data_removed), min(f.created_at), min(f.started_at),
                   min(f.first_seen_at), max(f.updated_at), sum(f.event_count)::integer
            FROM split_parts f GROUP BY f.key $predictions$,
        $outputs$
            SELECT DISTINCT ON (f.key) f.key, f.output
            FROM split_parts f ORDER BY f.key, (f.output).fold_key DESC $outputs$,
        $streams$
            SELECT f.key, sum(f.event_count)::integer, min(f.first_position), max(f.last_position),
                   max(f.updated_at), min(f.canceled_at), sum(f.submit_failures)::integer,
                   max(f.retried_at), min(f.created_at), min(f.created_data COLLATE "C")
            FROM split_parts f GROUP BY f.key $streams$],
        CASE WHEN p_streams IS NOT NULL THEN stream_filter(p_streams, 'e') END, p_streams);
    SELECT coalesce(sum(event_count), 0) INTO n FROM rebuild_stream_stats;
    RETURN n;
END $$;

-- Every prediction: the facts of its winning events (rebuild_scan found which they are).
CREATE OR REPLACE FUNCTION rebuild_predictions(p_streams text[]) RETURNS bigint
LANGUAGE plpgsql
SET work_mem = '256MB'
SET jit = off
AS $$
DECLARE
    n bigint;
    v_compression text := current_setting('default_toast_compression');
    -- a replay's scratch copy keeps a digest of each log tail (scratch_digest)
    v_digest boolean := coalesce(current_setting('rjs.rebuild_logs', true) = 'digest', false);
BEGIN
    -- The log tails are most of what this writes.
    PERFORM prefer_lz4_compression();
    -- Each prediction's winning keys are in rebuild_prediction_groups (rebuild_scan).
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
    -- rather than by hashing every event to find them. The order is rebuild_scan's: each
    -- window's groups sorted by their winning event (a window's sort fits in memory, where
    -- sorting all the groups here went through files, 1.4 GB at 20M events), the windows
    -- read in order (an inheritance parent reads its children in the order they were made),
    -- then the few split keys' merged groups.
    INSERT INTO predictions
    SELECT g.id, g.job_id, g.step, s.status, s.error,
           CASE WHEN v_digest THEN scratch_digest(CASE WHEN g.logs_at = g.state_at THEN s.logs_tail
                                                    ELSE l.logs_tail END)
                WHEN g.logs_at = g.state_at THEN s.logs_tail ELSE l.logs_tail END,
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
          FROM rebuild_prediction_groups f OFFSET 0) g
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
    DROP TABLE rebuild_prediction_groups CASCADE;
    DROP TABLE rebuild_retried;
    PERFORM set_config('default_toast_compression', v_compression, true);
    RETURN n;
END $$;

-- Every output: the event with the greatest fold key of each (prediction, index), as
-- rebuild_scan found it.
CREATE OR REPLACE FUNCTION rebuild_outputs(p_streams text[]) RETURNS bigint
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO outputs SELECT (f.output).* FROM rebuild_output_facts f;
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE rebuild_output_facts CASCADE;
    RETURN n;
END $$;

-- Every job, and its job_activity row, each inserted once with its derived columns
-- computed on the way in by job_derived_values (the definition the live path's touch_job
-- uses as well).
--
-- The rows go into the scratch tables, which have no indexes yet (service/scratch.py builds
-- them after the rows), in whatever order the joins leave them. The cut-over writes new
-- rows into the live jobs table in the order of its jobs_created_at index (scratch.TABLES'
-- order), where the order pays: four of the jobs table's six indexes lead with created_at
-- (or with model or status, then created_at), and rows inserted by job id (random) land on
-- a random leaf page of every index. Measured on the replay benchmark's 196,080 jobs, the
-- same database and PostgreSQL 15, four runs each, taking turns, rebuilding into indexed
-- tables: unsorted 14.3, 13.2, 12.3, 11.9 s; sorted 10.0, 12.4, 10.8, 11.0 s (copying the
-- finished rows alone into an indexed copy of jobs: 4.5 s unsorted, 3.1 s sorted). Sorted
-- here as well, every job's wide row was sorted twice, and at 20M events (3.9M jobs,
-- ~700 bytes each in the sort) the first sort went through files; without it the jobs
-- stage took about the same (110.7-115.8 s at 20M against 112.6-116.3), but no longer
-- sorts for nothing.

CREATE OR REPLACE FUNCTION rebuild_jobs(p_streams text[]) RETURNS bigint
LANGUAGE plpgsql
-- Group the step rollups and join them in memory (hash tables), rather than sorting the
-- jobs' rows in files.
SET work_mem = '256MB'
SET jit = off
AS $$
DECLARE
    n bigint;
    v_target text;
BEGIN
    -- Each stream's statistics, and its job.created, are in rebuild_stream_stats (rebuild_scan).
    -- The planner's row counts for the statements below: a new table has no statistics, and
    -- the planner, guessing a few thousand rows, sorted every job's wide row (several
    -- times) to merge-join them. A small sample gives the counts.
    -- (Some streams' tables are small: planned from their size alone, as a catch-up in
    -- the cut-over must be quick.)
    v_target := current_setting('default_statistics_target');
    PERFORM set_config('default_statistics_target', '10', true);
    IF p_streams IS NULL THEN
        ANALYZE predictions, outputs;
    END IF;
    -- Each step's rollups, grouped once: a job reads step 1's and step 2's of both. Grouped
    -- in the jobs statement itself, each was grouped twice (once per step).
    EXECUTE format('CREATE TEMP TABLE rebuild_step_rollups ON COMMIT DROP AS '
                   'SELECT r.job_id, r.step, r AS rollup FROM job_step_rollups r WHERE %s',
                   job_filter(p_streams, 'r')) USING p_streams;
    EXECUTE format('CREATE TEMP TABLE rebuild_step_output_rollups ON COMMIT DROP AS '
                   'SELECT o.job_id, o.step, o AS rollup FROM job_step_output_rollups o WHERE %s',
                   job_filter(p_streams, 'o')) USING p_streams;
    IF p_streams IS NULL THEN
        ANALYZE rebuild_stream_stats, rebuild_step_rollups, rebuild_step_output_rollups;
    END IF;
    PERFORM set_config('default_statistics_target', v_target, true);
    -- s: each job stream's statistics, for job_activity and for the jobs rows alike.
    -- b: each job as job.created describes it, and how many of its predictions_expected
    -- are step 1's (all but a second step's one) (OFFSET 0: hand job_derived_values plain
    -- columns, since an argument that is an expression used more than once keeps the
    -- functions it calls from being inlined, and a call per job costs more than the rest).
    -- (EXECUTE: planned anew each time, for the tables these names are in this session)
    EXECUTE $sql$
        WITH s AS MATERIALIZED (
            SELECT s.key AS stream, s.event_count, s.first_position, s.last_position, s.updated_at,
                   s.canceled_at, s.submit_failures, s.retried_at, s.created_at,
                   s.created_data::jsonb AS created  -- the body once: past work_mem, kept in a file
            FROM rebuild_stream_stats s
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
              CROSS JOIN LATERAL job_facts(s.stream, s.created, s.created_at, s.canceled_at,
                                           s.submit_failures) j
              WHERE s.created IS NOT NULL
              OFFSET 0) b
        LEFT JOIN rebuild_step_rollups r1 ON r1.job_id = b.id AND r1.step = 1
        LEFT JOIN rebuild_step_output_rollups o1 ON o1.job_id = b.id AND o1.step = 1
        LEFT JOIN rebuild_step_rollups r2 ON r2.job_id = b.id AND r2.step = 2
        LEFT JOIN rebuild_step_output_rollups o2 ON o2.job_id = b.id AND o2.step = 2
        CROSS JOIN LATERAL job_derived_values(b.canceled_at, b.first_step_expected,
                                              b.next_step IS NOT NULL, r1.rollup, o1.rollup,
                                              r2.rollup, o2.rollup, b.round_deadline) d
    $sql$;
    GET DIAGNOSTICS n = ROW_COUNT;
    DROP TABLE rebuild_stream_stats, rebuild_step_rollups, rebuild_step_output_rollups CASCADE;
    RETURN n;
END $$;
