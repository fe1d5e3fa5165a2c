-- Projections: the current view, derived only from events (the fold: sql/fold.sql).
-- Tables, not views: Supabase Realtime streams table changes and the dashboard needs
-- indexed reads. Every column can be rebuilt by `flask --app service replay`.

CREATE TABLE jobs (
    id                    uuid PRIMARY KEY,
    model                 text,
    version               text,
    deployment            text,
    aspect_ratio          text        NOT NULL DEFAULT '1:1',
    postprocess           jsonb       NOT NULL DEFAULT '{"mode": "auto"}'::jsonb,
    input                 jsonb       NOT NULL DEFAULT '{}'::jsonb,
    next_step             jsonb,
    metadata              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status                text        NOT NULL DEFAULT 'pending',
    predictions_expected  integer     NOT NULL DEFAULT 1,
    predictions_submitted integer     NOT NULL DEFAULT 0,
    predictions_succeeded integer     NOT NULL DEFAULT 0,
    predictions_failed    integer     NOT NULL DEFAULT 0,
    submit_failures       integer     NOT NULL DEFAULT 0,
    outputs_expected      integer     NOT NULL DEFAULT 0,
    outputs_processed     integer     NOT NULL DEFAULT 0,
    outputs_failed        integer     NOT NULL DEFAULT 0,
    outputs               jsonb       NOT NULL DEFAULT '[]'::jsonb,
    error                 text,
    canceled_at           timestamptz,
    created_at            timestamptz NOT NULL,
    started_at            timestamptz,
    completed_at          timestamptz,
    updated_at            timestamptz NOT NULL,
    last_position         bigint      NOT NULL,
    event_count           integer     NOT NULL DEFAULT 0,
    CONSTRAINT jobs_status_known CHECK (status IN (
        'pending', 'queued', 'running', 'processing', 'completed', 'failed', 'canceled'))
);

CREATE INDEX jobs_created_at ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_status_created_at ON jobs (status, created_at DESC);
CREATE INDEX jobs_model_created_at ON jobs (model, created_at DESC);
-- The reconciler's question: which unfinished jobs have gone quiet?
CREATE INDEX jobs_unfinished_updated_at ON jobs (updated_at)
    WHERE status IN ('pending', 'queued', 'running', 'processing');

-- One row per Replicate prediction. The *_key columns record which event each field
-- group came from (see prediction_facts in sql/fold.sql); they make the fold
-- order-independent and are compared, never shown.
CREATE TABLE predictions (
    id            text PRIMARY KEY,
    job_id        uuid,
    step          integer,
    status        text        NOT NULL,
    error         text,
    logs_tail     text,
    logs_length   integer     NOT NULL DEFAULT 0,
    metrics       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    output        jsonb,
    output_urls   jsonb       NOT NULL DEFAULT '[]'::jsonb,
    model         text,
    version       text,
    data_removed  boolean     NOT NULL DEFAULT false,
    created_at    timestamptz,
    started_at    timestamptz,
    completed_at  timestamptz,
    first_seen_at timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    event_count   integer     NOT NULL DEFAULT 0,
    state_key     text COLLATE "C" NOT NULL,
    logs_key      text COLLATE "C" NOT NULL,
    output_key    text COLLATE "C" NOT NULL
);

CREATE INDEX predictions_job_id ON predictions (job_id, step, id);
CREATE INDEX predictions_orphans ON predictions (first_seen_at) WHERE job_id IS NULL;

-- One row per output file of a prediction: what the worker made of it.
CREATE TABLE outputs (
    prediction_id text        NOT NULL,
    index         integer     NOT NULL,
    job_id        uuid,
    status        text        NOT NULL,
    source_url    text,
    url           text,
    original_url  text,
    width         integer,
    height        integer,
    bytes         bigint,
    error         text,
    detail        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at   timestamptz NOT NULL,
    fold_key      text COLLATE "C" NOT NULL,
    PRIMARY KEY (prediction_id, index),
    CONSTRAINT outputs_status_known CHECK (status IN ('processed', 'failed'))
);

CREATE INDEX outputs_job_id ON outputs (job_id);
