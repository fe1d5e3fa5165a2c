-- Record a Replicate webhook in one call: decide its stream, append, fold.
--
-- The stream is the job named by the webhook URL's ?job= when that job exists; else
-- the job our own records already tie the prediction to; else the prediction id
-- itself (an orphan, still recorded so Replicate stops retrying and a person can see it).

-- PL/pgSQL rather than SQL so the two lookups are planned once per session, not per webhook.
CREATE FUNCTION webhook_stream(p_job text, p_prediction_id text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_stream text;
BEGIN
    SELECT id::text INTO v_stream FROM jobs WHERE id = stream_job_id(p_job);
    IF v_stream IS NULL THEN
        SELECT job_id::text INTO v_stream FROM predictions
        WHERE id = p_prediction_id AND job_id IS NOT NULL;
    END IF;
    RETURN coalesce(v_stream, p_prediction_id);
END $$;

CREATE FUNCTION append_webhook(p_webhook_id text, p_job text, p_body jsonb, p_metadata jsonb)
RETURNS TABLE (event_position bigint, duplicate boolean, stream text)
LANGUAGE plpgsql AS $$
DECLARE
    v_stream text := webhook_stream(p_job, p_body ->> 'id');
BEGIN
    RETURN QUERY
    SELECT a.event_position, a.duplicate, v_stream
    FROM append_event(p_webhook_id, v_stream, 'replicate.webhook', p_body, p_metadata) a;
END $$;
