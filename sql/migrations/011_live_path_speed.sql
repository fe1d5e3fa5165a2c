-- CHECK constraints that are cheap to start, and lz4 for what the live path compresses.
--
-- Measured with callgrind on a PostgreSQL 15 backend appending the append benchmark's
-- events (scripts/bench/append_instructions.py), most of an append's instructions went to
-- starting statements rather than to the work they do. Every INSERT or UPDATE of a table
-- with CHECK constraints parses and plans each constraint again (PostgreSQL keeps them per
-- statement execution, not per session): about a tenth of an append, mostly the IN lists
-- of known values.


-- 1. CHECK constraints that are cheap to start -----------------------------------------------
-- The same rules, each a call of an IMMUTABLE PL/pgSQL function: a constraint's stored
-- expression is parsed for every statement that writes its table, and a call is short to
-- parse where an IN list of constants is long; the function's own plan is kept for the
-- session. The constraint names are kept: errors still name the rule that refused a row.
CREATE FUNCTION is_event_type(type text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN type IN ('job.created', 'job.canceled',
                    'prediction.submitted', 'prediction.submit_failed',
                    'replicate.webhook', 'replicate.polled',
                    'output.processed', 'output.failed');
END $$;

CREATE FUNCTION is_object(value jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN jsonb_typeof(value) = 'object';
END $$;

CREATE FUNCTION is_nonempty(value text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN value <> '';
END $$;

CREATE FUNCTION is_output_status(status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN status IN ('processed', 'failed');
END $$;

CREATE FUNCTION is_job_status(status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN status IN ('pending', 'queued', 'running', 'processing', 'completed', 'failed', 'canceled');
END $$;

CREATE FUNCTION is_task_kind(kind text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN kind IN ('submit_prediction', 'cancel_prediction', 'process_output');
END $$;

CREATE FUNCTION is_task_status(status text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN status IN ('queued', 'running', 'done', 'failed');
END $$;

-- events refuses UPDATE through a trigger, not ALTER TABLE: the constraints are replaced
-- in place (each new one is checked against every row already there).
ALTER TABLE events
    DROP CONSTRAINT events_type_known, ADD CONSTRAINT events_type_known CHECK (is_event_type(type)),
    DROP CONSTRAINT events_data_is_object, ADD CONSTRAINT events_data_is_object CHECK (is_object(data)),
    DROP CONSTRAINT events_metadata_is_object,
    ADD CONSTRAINT events_metadata_is_object CHECK (is_object(metadata)),
    DROP CONSTRAINT events_stream_nonempty, ADD CONSTRAINT events_stream_nonempty CHECK (is_nonempty(stream)),
    DROP CONSTRAINT events_key_nonempty, ADD CONSTRAINT events_key_nonempty CHECK (is_nonempty(event_key));
ALTER TABLE jobs DROP CONSTRAINT jobs_status_known,
    ADD CONSTRAINT jobs_status_known CHECK (is_job_status(status));
ALTER TABLE outputs DROP CONSTRAINT outputs_status_known,
    ADD CONSTRAINT outputs_status_known CHECK (is_output_status(status));
ALTER TABLE tasks DROP CONSTRAINT tasks_kind_known,
    ADD CONSTRAINT tasks_kind_known CHECK (is_task_kind(kind));
ALTER TABLE tasks DROP CONSTRAINT tasks_status_known,
    ADD CONSTRAINT tasks_status_known CHECK (is_task_status(status));


-- 2. lz4 for what the live path compresses ---------------------------------------------------
-- Webhook bodies over ~2 kB and prediction log tails are compressed as they are stored;
-- with the default pglz that was about a twentieth of an append's instructions. lz4
-- compresses several times faster and decompresses faster too (a replay reads every
-- body). Only where the server was built with it (the Debian and Supabase builds are; the
-- embedded pgserver is not): values already stored keep their compression, and reading
-- either kind needs nothing from the reader.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE events ALTER COLUMN data SET COMPRESSION lz4;
        ALTER TABLE predictions ALTER COLUMN logs_tail SET COMPRESSION lz4,
                                ALTER COLUMN output SET COMPRESSION lz4;
        ALTER TABLE jobs ALTER COLUMN input SET COMPRESSION lz4,
                         ALTER COLUMN outputs SET COMPRESSION lz4;
    END IF;
END $$;
