-- Supabase: who owns a job, explicit privileges, row-level security, Realtime.
-- Applies unchanged to a Supabase project (where `postgres` is not a superuser) and to a
-- plain PostgreSQL (no anon/authenticated/service_role roles, no supabase_realtime
-- publication, no realtime schema: those parts are skipped).

-- 1. The owner of a job ----------------------------------------------------------------
-- owner_id is the Supabase user who created the job (the `sub` of the verified user JWT,
-- recorded by the jobs API in job.created's data as "owner_id"); NULL for a job created
-- with an API key. Like every projected column it comes from the events alone, so a
-- replay rebuilds it: job_facts below is 003's, unchanged but for the last column.
-- (The fold is being rewritten in 010: carry the owner_id line over.)
ALTER TABLE jobs ADD COLUMN owner_id uuid;

CREATE INDEX jobs_owner_created_at ON jobs (owner_id, created_at DESC, id DESC)
    WHERE owner_id IS NOT NULL;

CREATE OR REPLACE FUNCTION job_facts(
    stream text, data jsonb, created_at timestamptz, event_count integer,
    last_position bigint, updated_at timestamptz, canceled_at timestamptz, submit_failures integer
) RETURNS SETOF jobs
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT stream_job_id(stream),
           data ->> 'model',
           data ->> 'version',
           data ->> 'deployment',
           coalesce(data ->> 'aspect_ratio', '1:1'),
           coalesce(data -> 'postprocess', '{"mode": "auto"}'::jsonb),
           coalesce(data -> 'input', '{}'::jsonb),
           data -> 'then',
           coalesce(data -> 'metadata', '{}'::jsonb),
           'pending', coalesce(small_int(data ->> 'count'), 1),
           0, 0, 0, submit_failures, 0, 0, 0, '[]'::jsonb, NULL::text,
           canceled_at, created_at, NULL::timestamptz, NULL::timestamptz,
           updated_at, last_position, event_count,
           -- new in 009: the owner, when it is a canonical uuid (stream_job_id checks
           -- exactly that), else NULL rather than an error that would stop a replay
           stream_job_id(data ->> 'owner_id')
    WHERE stream_job_id(stream) IS NOT NULL
$$;
