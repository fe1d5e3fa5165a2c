-- The event store: every fact the service learns, in arrival order, never changed.
--
-- position   global order of recording (not of commit: concurrent appends may commit
--            out of position order, so projections never depend on it for correctness)
-- event_key  idempotency key: the webhook-id header for a Replicate webhook, a
--            deterministic key (e.g. submitted:<job>:<step>:<n>) for our own events
-- stream     the job id; the prediction id when no job is known (an orphan)

CREATE TABLE events (
    position    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_key   text        NOT NULL,
    stream      text        NOT NULL,
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT events_event_key_unique UNIQUE (event_key),
    CONSTRAINT events_type_known CHECK (type IN (
        'job.created', 'job.canceled',
        'prediction.submitted', 'prediction.submit_failed',
        'replicate.webhook', 'replicate.polled',
        'output.processed', 'output.failed')),
    CONSTRAINT events_data_is_object CHECK (jsonb_typeof(data) = 'object'),
    CONSTRAINT events_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT events_stream_nonempty CHECK (stream <> ''),
    CONSTRAINT events_key_nonempty CHECK (event_key <> '')
);

CREATE INDEX events_stream_position ON events (stream, position);

COMMENT ON TABLE events IS
    'Append-only log of every webhook and service event. UPDATE, DELETE and TRUNCATE raise.';

-- app_user is the role the service's own login is meant to be a member of when it is not
-- the owner; it may read and append events, nothing else (its grants and the
-- immutability triggers are in sql/store.sql).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_user') THEN
        CREATE ROLE app_user NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- another database on this server created it at the same moment; roles are per server
END $$;
