-- Two trims of the live path; the fold's rules are unchanged. Counted with callgrind over
-- the append benchmark's rows (scripts/bench/append_instructions.py): 1,776,980 -> 1,664,640
-- instructions per append.

-- 1. touch_job hands job_derived_values composites, not array elements (-4%) --------------
-- 011's touch_job passed each step's rollups as r1[1] and so on. job_derived_values is
-- inlined, and its body reads each argument's fields many times over, so every field
-- read became a subscript of an array parameter and then a field of the element: about
-- 60 subscripts to build and run, for every derivation. Copied once into composite
-- variables (a plain assignment), each read is a field of a parameter. Same values.
CREATE OR REPLACE FUNCTION touch_job(p_job uuid, e events, p_derive boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    r1 job_step_rollups[];  -- each a one-element array, or NULL: a record variable cannot
    r2 job_step_rollups[];  -- share an INTO list
    o1 job_step_output_rollups[];
    o2 job_step_output_rollups[];
    d record;
    -- each step's rollups as one composite, for job_derived_values (see the header)
    v_r1 job_step_rollups;
    v_r2 job_step_rollups;
    v_o1 job_step_output_rollups;
    v_o2 job_step_output_rollups;
BEGIN
    INSERT INTO job_activity AS a (job_id, event_count, last_position, updated_at)
    VALUES (p_job, 1, e.position, e.recorded_at)
    ON CONFLICT (job_id) DO UPDATE SET
        event_count   = a.event_count + 1,
        last_position = greatest(a.last_position, excluded.last_position),
        updated_at    = greatest(a.updated_at, excluded.updated_at);
    IF NOT p_derive THEN
        RETURN;
    END IF;
    SELECT CASE WHEN e.type = 'job.canceled' THEN least(j.canceled_at, e.recorded_at)
                ELSE j.canceled_at END AS canceled_at,
           j.submit_failures + is_final_submit_failure(e.type, e.data)::integer AS submit_failures,
           j.predictions_expected,
           j.next_step IS NOT NULL AS has_next,
           j.outputs_processed + j.outputs_failed > 0
               OR e.type IN ('output.processed', 'output.failed') AS has_outputs
    INTO c
    FROM jobs j WHERE j.id = p_job;
    IF NOT FOUND THEN
        RETURN;  -- events before job.created: it derives the job when it comes
    END IF;
    SELECT array_agg(r) FILTER (WHERE r.step = 1), array_agg(r) FILTER (WHERE r.step = 2)
    INTO r1, r2
    FROM job_step_rollups r WHERE r.job_id = p_job;
    IF c.has_outputs THEN
        SELECT array_agg(o) FILTER (WHERE o.step = 1), array_agg(o) FILTER (WHERE o.step = 2)
        INTO o1, o2
        FROM job_step_output_rollups o WHERE o.job_id = p_job;
    END IF;
    v_r1 := r1[1];
    v_r2 := r2[1];
    v_o1 := o1[1];
    v_o2 := o2[1];
    SELECT * INTO d FROM job_derived_values(c.canceled_at, c.predictions_expected, c.has_next,
                                            v_r1, v_o1, v_r2, v_o2);
    UPDATE jobs j
    SET (canceled_at, submit_failures, status, predictions_submitted, predictions_succeeded,
         predictions_failed, outputs_expected, outputs_processed, outputs_failed, outputs, error,
         started_at, completed_at)
      = (c.canceled_at, c.submit_failures, d.status, d.predictions_submitted,
         d.predictions_succeeded, d.predictions_failed, d.outputs_expected, d.outputs_processed,
         d.outputs_failed, d.outputs, d.error, d.started_at, d.completed_at)
    WHERE j.id = p_job
      AND (j.canceled_at, j.submit_failures, j.status, j.predictions_submitted,
           j.predictions_succeeded, j.predictions_failed, j.outputs_expected, j.outputs_processed,
           j.outputs_failed, j.outputs, j.error, j.started_at, j.completed_at)
          IS DISTINCT FROM
          (c.canceled_at, c.submit_failures, d.status, d.predictions_submitted,
           d.predictions_succeeded, d.predictions_failed, d.outputs_expected, d.outputs_processed,
           d.outputs_failed, d.outputs, d.error, d.started_at, d.completed_at);
END $$;

-- 2. on_event_applied only where it can act (-2%) -------------------------------------------
-- on_event_applied does something for two kinds of event only: a Replicate webhook that
-- leaves its prediction succeeded (enqueue the outputs' post-processing) and an output
-- event (submit a job's second step once its first is done). 011 called it for every
-- event that changed its prediction, and for job.created, prediction.submitted and
-- job.canceled, for which it does nothing; each call cost a statement, and for a
-- webhook a query. apply_prediction_event now says the prediction's status after the
-- event when the event changed it (NULL when it changed nothing), so apply_event knows.
DROP FUNCTION apply_prediction_event(events);
CREATE FUNCTION apply_prediction_event(e events) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_before record;
    v_after record;
BEGIN
    SELECT p.job_id, p.step, p.status, p.error, p.started_at, p.completed_at,
           jsonb_array_length(p.output_urls) AS outputs
    INTO v_before
    FROM predictions p WHERE p.id = prediction_body(e.type, e.data) ->> 'id';
    INSERT INTO predictions AS p
    SELECT * FROM prediction_facts(e.stream, e.type, e.data, e.metadata, e.position, e.recorded_at)
    ON CONFLICT (id) DO UPDATE SET
        job_id        = greatest(p.job_id, excluded.job_id),
        step          = least(p.step, excluded.step),
        status        = CASE WHEN excluded.state_key > p.state_key THEN excluded.status ELSE p.status END,
        error         = CASE WHEN excluded.state_key > p.state_key THEN excluded.error ELSE p.error END,
        metrics       = CASE WHEN excluded.state_key > p.state_key THEN excluded.metrics ELSE p.metrics END,
        completed_at  = CASE WHEN excluded.state_key > p.state_key THEN excluded.completed_at ELSE p.completed_at END,
        state_key     = greatest(p.state_key, excluded.state_key),
        logs_tail     = CASE WHEN excluded.logs_key > p.logs_key THEN excluded.logs_tail ELSE p.logs_tail END,
        logs_length   = CASE WHEN excluded.logs_key > p.logs_key THEN excluded.logs_length ELSE p.logs_length END,
        logs_key      = greatest(p.logs_key, excluded.logs_key),
        output        = CASE WHEN excluded.output_key > p.output_key THEN excluded.output ELSE p.output END,
        output_urls   = CASE WHEN excluded.output_key > p.output_key THEN excluded.output_urls ELSE p.output_urls END,
        output_key    = greatest(p.output_key, excluded.output_key),
        model         = greatest(p.model, excluded.model),
        version       = greatest(p.version, excluded.version),
        data_removed  = p.data_removed OR excluded.data_removed,
        created_at    = least(p.created_at, excluded.created_at),
        started_at    = least(p.started_at, excluded.started_at),
        first_seen_at = least(p.first_seen_at, excluded.first_seen_at),
        updated_at    = greatest(p.updated_at, excluded.updated_at),
        event_count   = p.event_count + 1
    RETURNING p.job_id, p.step, p.status, p.error, p.started_at, p.completed_at,
              jsonb_array_length(p.output_urls) AS outputs
    INTO v_after;
    IF v_before IS DISTINCT FROM v_after THEN
        RETURN v_after.status;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION apply_event(e events) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := stream_job_id(e.stream);
    v_derive boolean := true;
    v_hook boolean := false;
    v_status text;
BEGIN
    IF e.type = 'job.created' THEN
        -- Events recorded before job.created (they left a job_activity row) count as they
        -- would in a rebuild, and may have made predictions or outputs of this job: then its
        -- columns are derived from them. With none (the usual case), job_facts' row is
        -- already what the derivation gives (pending, nothing counted), and it is skipped.
        v_derive := EXISTS (SELECT FROM job_activity a WHERE a.job_id = v_job);
        INSERT INTO jobs
        SELECT j.* FROM job_stream_stats s
        CROSS JOIN LATERAL job_facts(e.stream, e.data, e.recorded_at, s.canceled_at,
                                     s.submit_failures) j
        WHERE s.stream = e.stream
        ON CONFLICT (id) DO NOTHING
        RETURNING v_derive OR predictions_expected < 1 INTO v_derive;  -- NULL: no new row
    ELSIF e.type IN ('prediction.submitted', 'replicate.webhook', 'replicate.polled',
                     'prediction.submit_failed') THEN
        v_status := apply_prediction_event(e);
        v_derive := v_status IS NOT NULL;
        -- on_event_applied's only work for a prediction event: post-process the outputs
        -- of a prediction that has succeeded (its query asks for status 'succeeded')
        v_hook := v_status = 'succeeded' AND e.type IN ('replicate.webhook', 'replicate.polled');
    ELSIF e.type IN ('output.processed', 'output.failed') THEN
        PERFORM apply_output_event(e);
        v_hook := true;  -- a job's first step may be done: submit the second
    END IF;
    IF v_job IS NOT NULL THEN
        PERFORM touch_job(v_job, e, coalesce(v_derive, false));
    END IF;
    IF v_hook AND v_job IS NOT NULL THEN  -- the hook has nothing to do for an orphan
        PERFORM on_event_applied(e);
    END IF;
END $$;
