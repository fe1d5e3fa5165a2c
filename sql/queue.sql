-- The durable task queue's functions (the tasks table: migration 005): enqueue once per
-- key, claim with a lease, finish, release, extend. A task is enqueued in the same
-- transaction as the event that calls for it (on_event_applied, at the end of this file),
-- so an acknowledged request can never lose its follow-up work. Workers claim tasks with
-- FOR UPDATE SKIP LOCKED and hold a lease; a task whose worker died is claimed again when
-- its lease runs out.
--
-- Re-applied as a whole by `flask --app service migrate` whenever this file changes (see
-- docs/sql.md): every statement here must be safe to run again.

-- Wake sleeping workers when the enqueueing transaction commits. Workers also poll,
-- because NOTIFY does not pass a transaction-mode pooler.
CREATE OR REPLACE FUNCTION tasks_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasks', NEW.kind);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER tasks_notify_insert AFTER INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_notify();

-- The owner a job's tasks are queued under: its owner_id, or the nil uuid for a job with
-- none (one more owner). See migration 020.
-- PL/pgSQL: a SQL function with a subquery is not inlined, and its body was planned again
-- at every call (twice a finished prediction); this one's plan is made once a session.
CREATE OR REPLACE FUNCTION task_owner_key(p_job_id uuid) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT owner_id FROM jobs WHERE id = p_job_id),
                    '00000000-0000-0000-0000-000000000000'::uuid);
END $$;

-- Enqueue once per task_key; returns the task id, new or existing. fair_rank is the task's
-- place in virtual time, in steps of 2: two after its owner's last task of its kind that is
-- still queued or running, and never before one ahead of the front of the queue (the
-- lowest rank queued). So an owner with nothing waiting starts just ahead of the front,
-- before the next task of an owner with a batch, and then each owner's tasks alternate
-- with the others'; an owner with a task waiting already takes its turn after it.
CREATE OR REPLACE FUNCTION enqueue_task(
    p_kind text, p_task_key text, p_job_id uuid, p_payload jsonb,
    p_run_after timestamptz DEFAULT now(), p_max_attempts integer DEFAULT 8
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
    v_owner uuid := task_owner_key(p_job_id);
    v_rank bigint;
BEGIN
    SELECT greatest(
        (SELECT fair_rank - 1 FROM tasks WHERE status = 'queued' ORDER BY fair_rank LIMIT 1),
        (SELECT fair_rank + 2 FROM tasks WHERE status = 'queued' AND owner_key = v_owner AND kind = p_kind
         ORDER BY fair_rank DESC LIMIT 1),
        (SELECT max(fair_rank) + 2 FROM tasks WHERE status = 'running' AND owner_key = v_owner
                                                AND kind = p_kind))
    INTO v_rank;
    INSERT INTO tasks (kind, task_key, job_id, payload, run_after, max_attempts, owner_key, fair_rank)
    VALUES (p_kind, p_task_key, p_job_id, coalesce(p_payload, '{}'::jsonb), p_run_after, p_max_attempts,
            v_owner, coalesce(v_rank, 0))
    ON CONFLICT (task_key) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        SELECT id INTO v_id FROM tasks WHERE task_key = p_task_key;
    END IF;
    RETURN v_id;
END $$;

-- How long an owner's next submission must wait under its limits: 0 = it may run now;
-- NULL = until one of its predictions in flight finishes. In flight: its submissions being
-- created now (running tasks) and its predictions not yet finished. Creates in the last
-- minute: its submissions claimed (running) or finished (done, failed) in the last 60 s.
-- A NULL limit is off.
CREATE OR REPLACE FUNCTION owner_wait(p_owner uuid, p_max_running integer, p_per_minute integer)
RETURNS double precision
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_in_flight bigint;
    v_oldest timestamptz;
BEGIN
    IF p_max_running IS NOT NULL THEN
        SELECT count(*) INTO v_in_flight FROM tasks
        WHERE owner_key = p_owner AND kind = 'submit_prediction' AND status = 'running';
        -- two statements, not one with an OR: each keeps an index plan when cached generic
        IF v_in_flight < p_max_running AND p_owner = '00000000-0000-0000-0000-000000000000' THEN
            v_in_flight := v_in_flight + (
                SELECT count(*) FROM jobs j JOIN predictions p ON p.job_id = j.id
                WHERE j.owner_id IS NULL AND j.status IN ('pending', 'queued', 'running', 'processing')
                  AND p.status NOT IN ('succeeded', 'failed', 'canceled', 'aborted'));
        ELSIF v_in_flight < p_max_running THEN
            v_in_flight := v_in_flight + (
                SELECT count(*) FROM jobs j JOIN predictions p ON p.job_id = j.id
                WHERE j.owner_id = p_owner AND j.status IN ('pending', 'queued', 'running', 'processing')
                  AND p.status NOT IN ('succeeded', 'failed', 'canceled', 'aborted'));
        END IF;
        IF v_in_flight >= p_max_running THEN
            RETURN NULL;
        END IF;
    END IF;
    IF p_per_minute IS NOT NULL THEN
        -- the p_per_minute-th most recent create: the next may run when it leaves the window
        SELECT updated_at INTO v_oldest FROM tasks
        WHERE owner_key = p_owner AND kind = 'submit_prediction' AND status <> 'queued'
          AND updated_at > now() - interval '60 seconds'
        ORDER BY updated_at DESC OFFSET p_per_minute - 1 LIMIT 1;
        IF FOUND THEN
            RETURN greatest(extract(epoch FROM v_oldest + interval '60 seconds' - now()), 0.01);
        END IF;
    END IF;
    RETURN 0;
END $$;

-- Superseded: the claim took no owner limits.
DROP FUNCTION IF EXISTS claim_task(text, integer, text[]);

-- Claim the next runnable task of the given kinds: one whose lease ran out (its worker
-- died) first, else the queued one of lowest fair_rank (see enqueue_task), so owners take
-- turns. Every claim counts as an attempt.
--
-- With owner limits (NULL = off), a submission whose owner is at a limit is not claimed:
-- it and the owner's other ready submissions are held (still queued, run_after moved on:
-- to when the rate window lets the next one go, or p_hold_seconds when waiting for a
-- prediction to finish, which release_held_task cuts short) and the claim goes on to the
-- next owner. Nothing held is lost, and no worker loops on it: a held task is not ready
-- again until its run_after. A transaction-scoped advisory lock per limited owner makes
-- two workers' checks of one owner take turns, so together they never exceed its limits.
CREATE OR REPLACE FUNCTION claim_task(p_worker text, p_lease_seconds integer, p_kinds text[],
                                      p_owner_max_running integer DEFAULT NULL,
                                      p_owner_per_minute integer DEFAULT NULL,
                                      p_hold_seconds integer DEFAULT 30)
RETURNS SETOF tasks
LANGUAGE plpgsql AS $$
DECLARE
    v_task tasks;
    v_wait double precision;
    v_limited boolean := p_owner_max_running IS NOT NULL OR p_owner_per_minute IS NOT NULL;
BEGIN
    SELECT * INTO v_task FROM tasks
    WHERE status = 'running' AND lease_until < now() AND kind = ANY (p_kinds)
    ORDER BY lease_until LIMIT 1 FOR UPDATE SKIP LOCKED;
    -- a submission taken over from a dead worker was counted against its owner already
    IF v_task.id IS NULL THEN
        FOR i IN 1..100 LOOP  -- owners held per claim, at most; the rest wait for the next claim
            SELECT * INTO v_task FROM tasks
            WHERE status = 'queued' AND run_after <= now() AND kind = ANY (p_kinds)
            ORDER BY fair_rank, id LIMIT 1 FOR UPDATE SKIP LOCKED;
            EXIT WHEN v_task.id IS NULL OR NOT v_limited OR v_task.kind <> 'submit_prediction';
            PERFORM pg_advisory_xact_lock(hashtextextended('owner_limit:' || v_task.owner_key::text, 0));
            v_wait := owner_wait(v_task.owner_key, p_owner_max_running, p_owner_per_minute);
            EXIT WHEN v_wait = 0;
            UPDATE tasks SET run_after = now() + make_interval(secs => coalesce(v_wait, p_hold_seconds)),
                             held_by = CASE WHEN v_wait IS NULL THEN 'running' ELSE 'rate' END,
                             updated_at = now()
            WHERE id IN (SELECT id FROM tasks
                         WHERE owner_key = v_task.owner_key AND kind = 'submit_prediction'
                           AND status = 'queued' AND run_after <= now()
                         FOR UPDATE SKIP LOCKED);
            v_task := NULL;
        END LOOP;
    END IF;
    IF v_task.id IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE tasks SET status = 'running', attempts = attempts + 1, locked_by = p_worker, held_by = NULL,
                     lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    WHERE id = v_task.id
    RETURNING *;
END $$;

-- One of an owner's submissions held for lack of a free slot may go now (a prediction of
-- its finished): the first in its line, so its limit is checked again at the next claim.
CREATE OR REPLACE FUNCTION release_held_task(p_owner uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasks SET run_after = now(), held_by = NULL, updated_at = now()
    WHERE id = (SELECT id FROM tasks
                WHERE owner_key = p_owner AND kind = 'submit_prediction' AND status = 'queued'
                  AND held_by = 'running'
                ORDER BY fair_rank, id LIMIT 1 FOR UPDATE SKIP LOCKED);
    IF FOUND THEN
        PERFORM pg_notify('tasks', 'submit_prediction');
    END IF;
END $$;

-- Finish a claimed task. Each returns false when the worker no longer holds the lease
-- (another worker took the task over), so the caller can tell.
CREATE OR REPLACE FUNCTION finish_task(p_id bigint, p_worker text, p_status text, p_error text DEFAULT NULL,
                            p_retry_in_seconds double precision DEFAULT 0)
RETURNS boolean
LANGUAGE sql AS $$
    UPDATE tasks SET
        status      = p_status,
        last_error  = coalesce(p_error, last_error),
        run_after   = CASE WHEN p_status = 'queued'
                           THEN now() + make_interval(secs => p_retry_in_seconds) ELSE run_after END,
        lease_until = NULL,
        locked_by   = NULL,
        updated_at  = now()
    WHERE id = p_id AND locked_by = p_worker AND status = 'running'
    RETURNING true;
$$;

-- Give a task back without counting the attempt (a worker shutting down).
CREATE OR REPLACE FUNCTION release_task(p_id bigint, p_worker text) RETURNS boolean
LANGUAGE sql AS $$
    UPDATE tasks SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_until = NULL,
                     locked_by = NULL, updated_at = now()
    WHERE id = p_id AND locked_by = p_worker AND status = 'running'
    RETURNING true;
$$;

CREATE OR REPLACE FUNCTION extend_lease(p_id bigint, p_worker text, p_lease_seconds integer) RETURNS boolean
LANGUAGE sql AS $$
    UPDATE tasks SET lease_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    WHERE id = p_id AND locked_by = p_worker AND status = 'running'
    RETURNING true;
$$;


-- Work the live fold calls for ---------------------------------------------------------------
-- Enqueued in the transaction that records the event (apply_event in sql/fold.sql calls
-- on_event_applied on the live path only, never during a rebuild):
--   * a prediction of a job that has succeeded with outputs: one process_output task per
--     output URL, keyed process:<prediction>:<index>, so repeats of the news enqueue once;
--   * a two-step job whose first step is done: the second step's submission, once.

CREATE OR REPLACE FUNCTION on_event_applied(e events) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := stream_job_id(e.stream);
BEGIN
    IF v_job IS NULL THEN
        RETURN;  -- orphans have no job: no aspect ratio, nothing to post-process
    END IF;
    IF e.type IN ('replicate.webhook', 'replicate.polled')
       AND prediction_body(e.type, e.data) ->> 'status' IN ('succeeded', 'failed', 'canceled', 'aborted') THEN
        PERFORM release_held_task(task_owner_key(v_job));  -- a slot of its owner is free
    END IF;
    IF e.type IN ('replicate.webhook', 'replicate.polled') THEN
        PERFORM enqueue_task('process_output', format('process:%s:%s', p.id, u.ordinality - 1), v_job,
                             jsonb_build_object('prediction_id', p.id, 'index', u.ordinality - 1,
                                                'source_url', u.url, 'step', coalesce(p.step, 1)))
        FROM predictions p
        JOIN jobs j ON j.id = p.job_id
        CROSS JOIN LATERAL jsonb_array_elements_text(p.output_urls) WITH ORDINALITY AS u(url, ordinality)
        WHERE p.id = prediction_body(e.type, e.data) ->> 'id'
          AND p.status = 'succeeded' AND j.status <> 'canceled';
    ELSIF e.type IN ('output.processed', 'output.failed') THEN
        PERFORM enqueue_task('submit_prediction', format('submit:%s:2:0', j.id), j.id,
                             jsonb_build_object('step', 2, 'index', 0))
        FROM jobs j
        LEFT JOIN job_step_rollups r1 ON r1.job_id = j.id AND r1.step = 1
        LEFT JOIN job_step_output_rollups o1 ON o1.job_id = j.id AND o1.step = 1
        WHERE j.id = v_job AND j.next_step IS NOT NULL AND j.status <> 'canceled'
          -- step 1 needs all of predictions_expected but step 2's one
          AND job_step_state(j.predictions_expected - 1, coalesce(r1.submitted, 0), coalesce(r1.started, 0),
                             coalesce(r1.succeeded, 0), coalesce(r1.failed, 0),
                             coalesce(r1.outputs_expected, 0), coalesce(o1.processed, 0),
                             coalesce(o1.failed, 0)) = 'done';
    END IF;
END $$;
