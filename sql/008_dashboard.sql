-- What the dashboard needs beyond the projections: the webhook deliveries that never
-- became events (for the health panel), a change feed on `jobs` for live updates, and
-- indexes for the dashboard's time-window reads.

-- Webhook deliveries that were answered but not recorded as events: refused ones (bad
-- signature, not a prediction, too large, refused by the event store) and duplicates
-- (a webhook-id already recorded, acknowledged again). A refused body is never stored,
-- only why it was refused and by whom. Operational state like `tasks`: not a projection,
-- replay neither reads nor rebuilds it, and old rows may be deleted at will.
CREATE TABLE unrecorded_webhooks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    outcome     text        NOT NULL,
    http_status integer     NOT NULL,
    webhook_id  text,
    remote_addr text,
    detail      text,
    CONSTRAINT unrecorded_webhooks_outcome_known CHECK (outcome IN (
        'bad_signature', 'bad_webhook', 'body_too_large', 'invalid_event', 'duplicate')),
    -- header values come from anyone who can reach the endpoint: keep them short
    CONSTRAINT unrecorded_webhooks_short CHECK (
        char_length(webhook_id) <= 256 AND char_length(remote_addr) <= 64
        AND char_length(detail) <= 512)
);

CREATE INDEX unrecorded_webhooks_received_at ON unrecorded_webhooks (received_at);
-- "was this recorded webhook delivered again?", for the job timeline
CREATE INDEX unrecorded_webhooks_duplicates ON unrecorded_webhooks (webhook_id)
    WHERE outcome = 'duplicate';

COMMENT ON TABLE unrecorded_webhooks IS
    'Webhook deliveries answered without recording an event: refused (bad_signature 401, '
    'bad_webhook 400, body_too_large 413, invalid_event 400) or duplicate (webhook-id already '
    'recorded, answered 200). Bodies are never kept. Not a projection; safe to prune.';

-- The health panel counts webhooks per minute over a recent window. events is
-- append-only and recorded_at grows with position, the case BRIN is made for: a few
-- bytes per range of pages, next to nothing added to an append.
CREATE INDEX events_recorded_at_brin ON events USING brin (recorded_at)
    WITH (pages_per_range = 32, autosummarize = on);

-- The change feed's fallback where LISTEN is unavailable (a transaction-mode pooler):
-- "which jobs changed since t?".
CREATE INDEX jobs_updated_at ON jobs (updated_at);


-- Live updates without Supabase: NOTIFY jobs_changed with the job id when what the
-- dashboard shows of a job changes; GET /api/dashboard/stream LISTENs (service/changes.py).
--
-- Every notifying transaction takes a cluster-wide lock at commit, so notifying
-- transactions commit one at a time: measured with 16 connections appending webhooks,
-- notifying on each visible change cost 25-40% of the throughput. So the trigger notifies
-- only while someone listens (live updates are off on the page until a person turns them
-- on): an open stream keeps jobs_feed_listeners.listening_until a little ahead of now,
-- and otherwise a webhook pays one lookup of a one-row table. Updates that change nothing
-- shown (most log-only webhooks) do not even make that lookup. NOTIFY is delivered at
-- commit and deduplicated within a transaction, so one event notifies once.
CREATE UNLOGGED TABLE jobs_feed_listeners (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    listening_until timestamptz NOT NULL
);

COMMENT ON TABLE jobs_feed_listeners IS
    'One row: until when a dashboard change feed listens on jobs_changed. Unlogged: after a '
    'crash it is empty, and the next stream to open writes it again.';

-- A stream announces it listens for the next p_seconds (and again at each heartbeat).
CREATE FUNCTION jobs_feed_listen(p_seconds double precision) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO jobs_feed_listeners (singleton, listening_until)
    VALUES (true, now() + make_interval(secs => p_seconds))
    ON CONFLICT (singleton) DO UPDATE
    SET listening_until = greatest(jobs_feed_listeners.listening_until, excluded.listening_until);
$$;

CREATE FUNCTION jobs_feed_listened() RETURNS boolean
LANGUAGE sql STABLE
RETURN coalesce((SELECT listening_until > now() FROM jobs_feed_listeners), false);

-- (The row trigger asks the table itself rather than calling jobs_feed_listened: one
-- function call less on the webhook path.)
CREATE FUNCTION jobs_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobs_changed', NEW.id::text)
    FROM jobs_feed_listeners WHERE listening_until > now();
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_notify_update AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.predictions_submitted IS DISTINCT FROM NEW.predictions_submitted
          OR OLD.predictions_succeeded IS DISTINCT FROM NEW.predictions_succeeded
          OR OLD.predictions_failed IS DISTINCT FROM NEW.predictions_failed
          OR OLD.outputs_processed IS DISTINCT FROM NEW.outputs_processed
          OR OLD.outputs_failed IS DISTINCT FROM NEW.outputs_failed
          OR OLD.error IS DISTINCT FROM NEW.error)
    EXECUTE FUNCTION jobs_notify_change();

-- Inserts and deletes per statement: a replay rewrites every job in one statement, and
-- listeners are told "everything changed" ('*') rather than sent one id per job. A
-- statement trigger fires even when no row changed (an INSERT ... ON CONFLICT DO NOTHING
-- that found the job), so each first looks at its transition table.
CREATE FUNCTION jobs_notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_ids text[];
BEGIN
    IF NOT jobs_feed_listened() THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(id::text) INTO v_ids FROM (SELECT id FROM new_rows LIMIT 21) r;
    IF cardinality(v_ids) > 20 THEN
        PERFORM pg_notify('jobs_changed', '*');
    ELSIF v_ids IS NOT NULL THEN
        PERFORM pg_notify('jobs_changed', id) FROM unnest(v_ids) AS id;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION jobs_notify_removed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- separate IFs: old_rows exists only for DELETE, and one expression is planned whole
    IF NOT jobs_feed_listened() THEN
        RETURN NULL;
    ELSIF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('jobs_changed', '*');
    ELSIF EXISTS (SELECT FROM old_rows) THEN
        PERFORM pg_notify('jobs_changed', '*');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify_inserted();

CREATE TRIGGER jobs_notify_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify_removed();

CREATE TRIGGER jobs_notify_truncate AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify_removed();


-- Live updates with Supabase: Realtime streams the jobs table to the dashboard, which
-- connects with the public anon key. The anon role may see only which job changed and
-- its status (Realtime leaves out columns a role cannot select); the page then reads the
-- job through the API with its API key. Supabase grants anon everything on new tables
-- by default; for jobs that is narrowed here. Elsewhere (plain PostgreSQL) there is no
-- anon role and no supabase_realtime publication, and this does nothing.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
        REVOKE ALL ON jobs FROM anon;
        GRANT SELECT (id, status, updated_at) ON jobs TO anon;
        REVOKE ALL ON unrecorded_webhooks, jobs_feed_listeners FROM anon;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
        REVOKE ALL ON unrecorded_webhooks, jobs_feed_listeners FROM authenticated;
    END IF;
    IF EXISTS (SELECT FROM pg_publication WHERE pubname = 'supabase_realtime' AND NOT puballtables)
       AND NOT EXISTS (SELECT FROM pg_publication_tables
                       WHERE pubname = 'supabase_realtime' AND schemaname = current_schema()
                         AND tablename = 'jobs') THEN
        ALTER PUBLICATION supabase_realtime ADD TABLE jobs;
    END IF;
END $$;

REVOKE ALL ON unrecorded_webhooks FROM PUBLIC;
REVOKE ALL ON jobs_feed_listeners FROM PUBLIC;
REVOKE ALL ON FUNCTION jobs_feed_listen(double precision) FROM PUBLIC;
