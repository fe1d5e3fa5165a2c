-- Live updates without Supabase: NOTIFY jobs_changed with the job id when what the
-- dashboard shows of a job changes; GET /api/dashboard/stream LISTENs (service/changes.py).
-- (The tables: unrecorded_webhooks and jobs_feed_listeners, migration 008.)
--
-- Every notifying transaction takes a cluster-wide lock at commit, so notifying
-- transactions commit one at a time: measured with 16 connections appending webhooks,
-- notifying on each visible change cost 25-40% of the throughput. So the triggers notify
-- only while someone listens (live updates are off on the page until a person turns them
-- on): an open stream keeps jobs_feed_listeners.listening_until a little ahead of now,
-- and otherwise a webhook pays one lookup of a one-row table. NOTIFY is delivered at
-- commit and deduplicated within a transaction, so one event notifies once.
--
-- Re-applied as a whole by `flask --app service migrate` whenever this file changes (see
-- docs/sql.md): every statement here must be safe to run again.

-- A stream announces it listens for the next p_seconds (and again at each heartbeat).
CREATE OR REPLACE FUNCTION jobs_feed_listen(p_seconds double precision) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO jobs_feed_listeners (singleton, listening_until)
    VALUES (true, now() + make_interval(secs => p_seconds))
    ON CONFLICT (singleton) DO UPDATE
    SET listening_until = greatest(jobs_feed_listeners.listening_until, excluded.listening_until);
$$;

-- Does a dashboard listen? PL/pgSQL rather than SQL: a SQL function called on its own
-- (not inlined into a query) is planned again at every call, and the jobs triggers ask
-- this for every statement that writes jobs; PL/pgSQL keeps the plan for the session.
CREATE OR REPLACE FUNCTION jobs_feed_listened() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT listening_until > now() FROM jobs_feed_listeners), false);
END $$;

-- A job's row changed: notify when what the dashboard shows of it did. The trigger is
-- queued only while a dashboard listens (its WHEN is a function call, short to parse:
-- PostgreSQL parses a trigger's WHEN clause again for every statement that fires it, and
-- a WHEN comparing seven columns of OLD and NEW cost every job update that), and the
-- function compares the columns.
CREATE OR REPLACE FUNCTION jobs_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.status, OLD.predictions_submitted, OLD.predictions_succeeded, OLD.predictions_failed,
        OLD.outputs_processed, OLD.outputs_failed, OLD.error)
       IS DISTINCT FROM
       (NEW.status, NEW.predictions_submitted, NEW.predictions_succeeded, NEW.predictions_failed,
        NEW.outputs_processed, NEW.outputs_failed, NEW.error) THEN
        PERFORM pg_notify('jobs_changed', NEW.id::text);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER jobs_notify_update AFTER UPDATE ON jobs
    FOR EACH ROW WHEN (jobs_feed_listened())
    EXECUTE FUNCTION jobs_notify_change();

-- Inserts and deletes per statement: a replay rewrites every job in one statement, and
-- listeners are told "everything changed" ('*') rather than sent one id per job. A
-- statement trigger fires even when no row changed (an INSERT ... ON CONFLICT DO NOTHING
-- that found the job), so each first looks at its transition table.
CREATE OR REPLACE FUNCTION jobs_notify_inserted() RETURNS trigger
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

CREATE OR REPLACE FUNCTION jobs_notify_removed() RETURNS trigger
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

CREATE OR REPLACE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify_inserted();

CREATE OR REPLACE TRIGGER jobs_notify_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify_removed();

CREATE OR REPLACE TRIGGER jobs_notify_truncate AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify_removed();

-- Operational state, for the service alone (Supabase's API roles: sql/supabase_security.sql).
REVOKE ALL ON unrecorded_webhooks FROM PUBLIC;
REVOKE ALL ON jobs_feed_listeners FROM PUBLIC;
REVOKE ALL ON FUNCTION jobs_feed_listen(double precision) FROM PUBLIC;
