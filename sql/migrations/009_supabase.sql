-- Supabase: who owns a job, row-level security, Realtime's replica identity, and the record
-- a broadcast carries. Applies unchanged to a Supabase project (where `postgres` is not a
-- superuser) and to a plain PostgreSQL. The privileges, policies, publication membership and
-- broadcast trigger that go with them are in sql/supabase_security.sql.

-- 1. The owner of a job ----------------------------------------------------------------
-- owner_id is the Supabase user who created the job (the `sub` of the verified user JWT,
-- recorded by the jobs API in job.created's data as "owner_id"); NULL for a job created
-- with an API key. Like every projected column it comes from the events alone, so a
-- replay rebuilds it (job_facts in sql/fold.sql).
ALTER TABLE jobs ADD COLUMN owner_id uuid;

CREATE INDEX jobs_owner_created_at ON jobs (owner_id, created_at DESC, id DESC)
    WHERE owner_id IS NOT NULL;


-- 2. Row-level security -------------------------------------------------------------------
-- On for every table, so a role that is granted a table by someone's default privileges
-- still reads no row without a policy (the policies are in sql/supabase_security.sql and,
-- for events, sql/store.sql).
ALTER TABLE events ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE predictions ENABLE ROW LEVEL SECURITY;
ALTER TABLE outputs ENABLE ROW LEVEL SECURITY;
ALTER TABLE tasks ENABLE ROW LEVEL SECURITY;
ALTER TABLE unrecorded_webhooks ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs_feed_listeners ENABLE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF to_regclass('schema_migrations') IS NOT NULL THEN  -- the migrate command's record
        ALTER TABLE schema_migrations ENABLE ROW LEVEL SECURITY;
    END IF;
END $$;


-- 3. Realtime ------------------------------------------------------------------------------
-- Replica identity: the primary key (DEFAULT), deliberately not FULL. FULL would write the
-- whole old row (a prediction's 4 kB of logs, a job's outputs) into the WAL with every
-- update, and Realtime does not pass old rows to subscribers under row-level security
-- anyway: a change names its row by primary key, and a DELETE carries only the key.
ALTER TABLE jobs REPLICA IDENTITY DEFAULT;
ALTER TABLE predictions REPLICA IDENTITY DEFAULT;

-- What a broadcast of a job's change carries (sql/supabase_security.sql): what a page shows
-- of a job's progress, not the whole row (its input and outputs can be kilobytes); the page
-- fetches the rest when it needs it.
CREATE TYPE job_change AS (
    id uuid, owner_id uuid, status text, predictions_expected integer,
    predictions_succeeded integer, predictions_failed integer, outputs_processed integer,
    outputs_failed integer, error text, completed_at timestamptz
);
