-- The event store: events is append-only, and every event is recorded through append_event,
-- which folds it into the projections (sql/fold.sql) in the same transaction.
--
-- Re-applied as a whole by `flask --app service migrate` whenever this file changes (see
-- docs/sql.md): every statement here must be safe to run again.


-- Immutability ------------------------------------------------------------------------------
-- Enforced here, for every role including the owner, not by convention.
CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege', HINT = 'record a new event instead';
END $$;

CREATE OR REPLACE TRIGGER events_no_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

CREATE OR REPLACE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Application roles may read and append, nothing else. app_user (migration 001) is the
-- role the service's own login is meant to be a member of when it is not the owner.
REVOKE ALL ON events FROM PUBLIC;
REVOKE ALL ON events FROM app_user;
GRANT SELECT, INSERT ON events TO app_user;

-- Row-level security is on for every table (migration 009): app_user reads and appends
-- events, as its privileges say. No other policy touches events (service_role bypasses
-- RLS; sql/supabase_security.sql grants it read and append).
DROP POLICY IF EXISTS events_app_user_select ON events;
CREATE POLICY events_app_user_select ON events FOR SELECT TO app_user USING (true);
DROP POLICY IF EXISTS events_app_user_insert ON events;
CREATE POLICY events_app_user_insert ON events FOR INSERT TO app_user WITH CHECK (true);


-- Append -------------------------------------------------------------------------------------
-- Record one event and fold it into the projections, in the caller's transaction.
-- Idempotent by event_key: a duplicate records nothing, changes nothing, and returns
-- the original event's position with duplicate = true. Appends to one stream are
-- serialised (advisory lock), so a job's derived counts never miss a concurrent event;
-- a full replay holds a SHARE lock on events, so appends wait for it to commit.
CREATE OR REPLACE FUNCTION append_event(
    p_event_key text, p_stream text, p_type text, p_data jsonb, p_metadata jsonb DEFAULT '{}'
) RETURNS TABLE (event_position bigint, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    e events;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_stream, 0));
    INSERT INTO events (event_key, stream, type, data, metadata)
    VALUES (p_event_key, p_stream, p_type, p_data, coalesce(p_metadata, '{}'::jsonb))
    ON CONFLICT (event_key) DO NOTHING
    RETURNING * INTO e;
    IF e.position IS NULL THEN
        RETURN QUERY SELECT ev.position, true FROM events ev WHERE ev.event_key = p_event_key;
        RETURN;
    END IF;
    PERFORM apply_event(e);
    RETURN QUERY SELECT e.position, false;
END $$;


-- Replicate webhooks -------------------------------------------------------------------------
-- Record a Replicate webhook in one call: decide its stream, append, fold.
--
-- The stream is the job named by the webhook URL's ?job= when that job exists; else
-- the job our own records already tie the prediction to; else the prediction id
-- itself (an orphan, still recorded so Replicate stops retrying and a person can see it).

-- PL/pgSQL rather than SQL so the two lookups are planned once per session, not per webhook.
CREATE OR REPLACE FUNCTION webhook_stream(p_job text, p_prediction_id text) RETURNS text
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

-- Webhooks that arrive together are recorded together: one statement, one transaction,
-- one commit for the group (group commit; service/groups.py gathers them in the web
-- process). Each webhook is still appended and folded exactly as alone: the same
-- append_event, in the same transaction as its projection update, and it is answered
-- only after that transaction commits. What the group shares is the per-statement and
-- per-commit work (the round trip, the top-level statement's start-up, the commit record
-- and its WAL flush), which for one webhook measured about a third of the database's time.
--
-- p_group: a JSON array of {"webhook_id", "job", "body", "metadata"}, one per webhook, as
-- append_webhook takes them. Returns one row per element, n = its 1-based place in the
-- array. The appends run in stream order (then array order), so two groups committing at
-- once take their streams' advisory locks in the same order and cannot deadlock on them.
CREATE OR REPLACE FUNCTION append_webhooks(p_group jsonb)
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
