-- A full rebuild writes the jobs rows in the order of the jobs_created_at index.
--
-- Four of the jobs table's six indexes lead with created_at (or with model or status,
-- then created_at). 010's rebuild_jobs inserted the rows in whatever order its joins left
-- them (by job id: random), so every index insert landed on a random leaf page. Sorted by
-- (created_at DESC, id DESC), each index fills nearly in order. Measured on the replay
-- benchmark's 196,080 jobs, the same database and PostgreSQL 15, four runs each, taking
-- turns: rebuild_jobs 14.3, 13.2, 12.3, 11.9 s; sorted 10.0, 12.4, 10.8, 11.0 s (copying
-- the finished rows alone into an indexed copy of jobs: 4.5 s unsorted, 3.1 s sorted).
-- Same rows; only the order in which they are written changes.

CREATE OR REPLACE FUNCTION rebuild_jobs(p_stream text) RETURNS bigint
LANGUAGE plpgsql
-- Group the events by stream and join the rollups in memory (hash tables), rather than
-- reading events in stream order through the index and sorting rollups in files.
SET work_mem = '256MB'
SET jit = off
AS $$
DECLARE
    n bigint;
BEGIN
    -- s: each job stream's statistics, once (OFFSET 0: ask which streams are jobs once per
    -- stream, not once per event), for job_activity and for the jobs rows alike.
    -- b: each job as job.created describes it (OFFSET 0: hand job_derived_values plain
    -- columns, since an argument that is an expression used more than once keeps the
    -- functions it calls from being inlined, and a call per job costs more than the rest).
    -- When one stream is rebuilt, the rollups are filtered to its job, so they group only
    -- its rows.
    EXECUTE format($sql$
        WITH s AS MATERIALIZED (
            SELECT * FROM (SELECT * FROM job_stream_stats s WHERE %1$s OFFSET 0) s
            WHERE stream_job_id(s.stream) IS NOT NULL),
        activity AS (
            INSERT INTO job_activity (job_id, event_count, last_position, updated_at)
            SELECT stream_job_id(s.stream), s.event_count, s.last_position, s.updated_at FROM s)
        INSERT INTO jobs (id, model, version, deployment, aspect_ratio, postprocess, input,
                          next_step, metadata, status, predictions_expected, predictions_submitted,
                          predictions_succeeded, predictions_failed, submit_failures,
                          outputs_expected, outputs_processed, outputs_failed, outputs, error,
                          canceled_at, created_at, started_at, completed_at, owner_id)
        SELECT b.id, b.model, b.version, b.deployment, b.aspect_ratio, b.postprocess, b.input,
               b.next_step, b.metadata, d.status, b.predictions_expected, d.predictions_submitted,
               d.predictions_succeeded, d.predictions_failed, b.submit_failures,
               d.outputs_expected, d.outputs_processed, d.outputs_failed, d.outputs, d.error,
               b.canceled_at, b.created_at, d.started_at, d.completed_at, b.owner_id
        FROM (SELECT j.*
              FROM s
              JOIN events c ON c.stream = s.stream AND c.type = 'job.created'
              CROSS JOIN LATERAL job_facts(c.stream, c.data, c.recorded_at, s.canceled_at,
                                           s.submit_failures) j
              OFFSET 0) b
        LEFT JOIN job_step_rollups r1 ON r1.job_id = b.id AND r1.step = 1 AND %2$s
        LEFT JOIN job_step_output_rollups o1 ON o1.job_id = b.id AND o1.step = 1 AND %3$s
        LEFT JOIN job_step_rollups r2 ON r2.job_id = b.id AND r2.step = 2 AND %4$s
        LEFT JOIN job_step_output_rollups o2 ON o2.job_id = b.id AND o2.step = 2 AND %5$s
        CROSS JOIN LATERAL job_derived_values(b.canceled_at, b.predictions_expected,
                                              b.next_step IS NOT NULL, r1, o1, r2, o2) d
        ORDER BY b.created_at DESC, b.id DESC
    $sql$, stream_filter(p_stream, 's'), job_filter(p_stream, 'r1'), job_filter(p_stream, 'o1'),
       job_filter(p_stream, 'r2'), job_filter(p_stream, 'o2')) USING p_stream;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;
