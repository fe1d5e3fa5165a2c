-- Webhooks that arrive together are recorded together: one statement, one transaction,
-- one commit for the group (group commit; service/groups.py gathers them in the web
-- process). Each webhook is still appended and folded exactly as alone: the same
-- append_event, in the same transaction as its projection update, and it is answered
-- only after that transaction commits. What the group shares is the per-statement and
-- per-commit work (the round trip, the top-level statement's start-up, the commit record
-- and its WAL flush), which for one webhook measured about a third of the database's time.

-- p_group: a JSON array of {"webhook_id", "job", "body", "metadata"}, one per webhook, as
-- append_webhook takes them. Returns one row per element, n = its 1-based place in the
-- array. The appends run in stream order (then array order), so two groups committing at
-- once take their streams' advisory locks in the same order and cannot deadlock on them.
CREATE FUNCTION append_webhooks(p_group jsonb)
RETURNS TABLE (n integer, event_position bigint, duplicate boolean, stream text)
LANGUAGE plpgsql AS $$
DECLARE
    w record;
BEGIN
    FOR w IN
        -- nullif: a JSON null is SQL NULL here, as it is when append_webhook is called
        SELECT g.n::integer AS n, g.e ->> 'webhook_id' AS webhook_id,
               nullif(g.e -> 'body', 'null') AS body, nullif(g.e -> 'metadata', 'null') AS metadata,
               webhook_stream(g.e ->> 'job', g.e -> 'body' ->> 'id') AS stream
        FROM jsonb_array_elements(p_group) WITH ORDINALITY AS g(e, n)
        ORDER BY stream, g.n
    LOOP
        RETURN QUERY
        SELECT w.n, a.event_position, a.duplicate, w.stream
        FROM append_event(w.webhook_id, w.stream, 'replicate.webhook', w.body, w.metadata) a;
    END LOOP;
END $$;

-- One webhook is a group of one: a single definition of how a webhook is recorded.
CREATE OR REPLACE FUNCTION append_webhook(p_webhook_id text, p_job text, p_body jsonb, p_metadata jsonb)
RETURNS TABLE (event_position bigint, duplicate boolean, stream text)
LANGUAGE sql AS $$
    SELECT a.event_position, a.duplicate, a.stream
    FROM append_webhooks(jsonb_build_array(jsonb_build_object(
        'webhook_id', p_webhook_id, 'job', p_job, 'body', p_body, 'metadata', p_metadata))) a
$$;
