-- Work the live fold calls for, enqueued in the transaction that records the event
-- (on_event_applied runs on the live path only, never during a rebuild):
--   * a prediction of a job that has succeeded with outputs: one process_output task per
--     output URL, keyed process:<prediction>:<index>, so repeats of the news enqueue once;
--   * a two-step job whose first step is done: the second step's submission, once.

CREATE OR REPLACE FUNCTION on_event_applied(e events) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := stream_job_id(e.stream);
BEGIN
    IF v_job IS NULL THEN
        RETURN;  -- orphans have no job: no aspect ratio, nothing to post-process
    END IF;
    IF e.type IN ('replicate.webhook', 'replicate.polled') THEN
        PERFORM enqueue_task('process_output', format('process:%s:%s', p.id, u.ordinality - 1), v_job,
                             jsonb_build_object('prediction_id', p.id, 'index', u.ordinality - 1,
                                                'source_url', u.url, 'step', coalesce(p.step, 1)))
        FROM predictions p
        JOIN jobs j ON j.id = p.job_id
        CROSS JOIN LATERAL jsonb_array_elements_text(p.output_urls) WITH ORDINALITY AS u(url, ordinality)
        WHERE p.id = prediction_body(e.type, e.data) ->> 'id'
          AND p.status = 'succeeded' AND j.status <> 'canceled';
    ELSIF e.type IN ('output.processed', 'output.failed') THEN
        PERFORM enqueue_task('submit_prediction', format('submit:%s:2:0', j.id), j.id,
                             jsonb_build_object('step', 2, 'index', 0))
        FROM jobs j
        LEFT JOIN job_step_rollups r1 ON r1.job_id = j.id AND r1.step = 1
        LEFT JOIN job_step_output_rollups o1 ON o1.job_id = j.id AND o1.step = 1
        WHERE j.id = v_job AND j.next_step IS NOT NULL AND j.status <> 'canceled'
          AND job_step_state(j.predictions_expected, coalesce(r1.submitted, 0), coalesce(r1.started, 0),
                             coalesce(r1.succeeded, 0), coalesce(r1.failed, 0),
                             coalesce(r1.outputs_expected, 0), coalesce(o1.processed, 0),
                             coalesce(o1.failed, 0)) = 'done';
    END IF;
END $$;
