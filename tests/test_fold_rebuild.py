"""The rebuild's faster forms must say exactly what the plain rules say."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service import events, replay
from tests.conftest import new_job_id
from tests.workload import bodies, create_job, webhook

# The definition stream_job_id replaced: a counted regex, slow but plainly right.
REFERENCE_JOB_ID = """
    SELECT CASE WHEN length(s) = 36
        AND s ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
        THEN s::uuid END AS expected, stream_job_id(s) AS actual
    FROM unnest(%s::text[]) AS s"""

UUID_ALPHABET = "0123456789abcdefABCDEF-_%{} g\n\u00e9"


def _near_uuids(draw_text: str, flips: list[tuple[int, str]]) -> str:
    chars = list(draw_text)
    for i, c in flips:
        chars[i % len(chars)] = c
    return "".join(chars)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(uuids=st.lists(st.uuids().map(str), min_size=1, max_size=5),
       flips=st.lists(st.tuples(st.integers(0, 40), st.sampled_from(UUID_ALPHABET)), max_size=3),
       other=st.lists(st.text(alphabet=UUID_ALPHABET, max_size=40), max_size=5))
def test_stream_job_id_agrees_with_the_regex_definition(conn, uuids, flips, other):
    streams = uuids + [_near_uuids(u, flips) for u in uuids] + [u.upper() for u in uuids] + other
    streams += [u[:-1] for u in uuids] + [u + "0" for u in uuids]
    streams += [u.replace("-", "", 1) + "-" for u in uuids]
    for row in conn.execute(REFERENCE_JOB_ID, (streams,)).fetchall():
        assert row["actual"] == row["expected"]


def _rows(conn) -> dict[str, list[dict]]:
    return {
        "predictions": conn.execute("SELECT * FROM predictions ORDER BY id").fetchall(),
        "outputs": conn.execute("SELECT * FROM outputs ORDER BY prediction_id, index").fetchall(),
        "jobs": conn.execute("SELECT * FROM jobs ORDER BY id").fetchall(),
    }


def test_rebuild_matches_live_when_state_logs_and_output_come_from_different_events(conn):
    """The rebuild reads each winning event once; here the winners differ, and bodies are
    large enough to be stored compressed."""
    job = new_job_id()
    create_job(conn, job)
    long_logs = "a step of a long run, with a wide line ▏█ to be compressed\n" * 200
    starting, processing, final = bodies(["starting_sdxl_create_response", "processing_sdxl_more_logs",
                                          "failed_flux11pro_nsfw_with_traceback_logs"], "pw")
    processing = dict(processing, logs=long_logs, output=["https://replicate.delivery/a/partial.png"])
    final = dict(final, logs="short", output=None)  # greatest state, but not the longest logs
    events.append(conn, key=f"submitted:{job}:1:0", stream=job, type="prediction.submitted",
                  data={"step": 1, "index": 0, "prediction": starting})
    webhook(conn, job, final, key="msg_final")
    webhook(conn, job, processing, key="msg_processing")
    webhook(conn, job, processing, key="msg_processing_again")  # same body, other id: a tie
    live = _rows(conn)
    row = live["predictions"][0]
    assert row["status"] == "failed" and row["logs_length"] == len(long_logs)
    assert row["output"] == processing["output"]
    conn.execute("DELETE FROM outputs; DELETE FROM predictions; DELETE FROM jobs")
    assert replay.replay(conn).committed
    assert _rows(conn) == live


# 003_fold.sql's job_status, as it was written before 011 said each argument once.
REFERENCE_JOB_STATUS = """
    SELECT c, f, h, n, job_status(c, f, h, n) AS actual,
           CASE WHEN c IS NOT NULL THEN 'canceled'
                WHEN f <> 'done' THEN CASE f WHEN 'failed' THEN 'failed' ELSE f END
                WHEN NOT h THEN 'completed'
                WHEN n = 'pending' THEN 'processing'
                WHEN n = 'queued' THEN 'running'
                WHEN n = 'done' THEN 'completed'
                ELSE n END AS expected
    FROM unnest(ARRAY[NULL, now()]::timestamptz[]) AS c,
         unnest(%(states)s::text[]) AS f,
         unnest(ARRAY[false, true]) AS h,
         unnest(%(states)s::text[]) AS n"""
STEP_STATES = ["pending", "queued", "running", "processing", "failed", "done"]


def test_job_status_gives_the_plain_rules_answer_for_every_step_state(conn):
    rows = conn.execute(REFERENCE_JOB_STATUS, {"states": STEP_STATES}).fetchall()
    assert len(rows) == 2 * 6 * 2 * 6
    for row in rows:
        assert row["actual"] == row["expected"], row


def test_job_step_state_covers_only_the_states_job_status_names(conn):
    """job_status names each state job_step_state can give; a new state must be added there."""
    rows = conn.execute("""
        SELECT DISTINCT job_step_state(e, s, st, su, f, oe, p, of) AS state
        FROM unnest(ARRAY[0, 1, 2]) e, unnest(ARRAY[0, 1, 2]) s, unnest(ARRAY[0, 1, 2]) st,
             unnest(ARRAY[0, 1, 2]) su, unnest(ARRAY[0, 1, 2]) f, unnest(ARRAY[0, 1, 2]) oe,
             unnest(ARRAY[0, 1, 2]) p, unnest(ARRAY[0, 1, 2]) of""").fetchall()
    assert {r["state"] for r in rows} == set(STEP_STATES)


# 010_fold_speed.sql's job_derived_values, inlined by hand: the columns as they were
# derived before 011 computed the status once.
REFERENCE_DERIVED = """
    WITH a AS (SELECT %(canceled_at)s::timestamptz AS canceled_at, %(expected)s::integer AS expected,
                      %(has_next)s::boolean AS has_next,
                      %(r1)s::job_step_rollups AS r1, %(o1)s::job_step_output_rollups AS o1,
                      %(r2)s::job_step_rollups AS r2, %(o2)s::job_step_output_rollups AS o2)
    SELECT to_jsonb(d.*) AS actual, to_jsonb(x.*) AS expected
    FROM a
    CROSS JOIN LATERAL job_derived_values(a.canceled_at, a.expected, a.has_next, a.r1, a.o1, a.r2, a.o2) d
    CROSS JOIN LATERAL (
        SELECT st.status,
               coalesce((r1).submitted, 0) + coalesce((r2).submitted, 0) AS predictions_submitted,
               coalesce((r1).succeeded, 0) + coalesce((r2).succeeded, 0) AS predictions_succeeded,
               coalesce((r1).failed, 0) + coalesce((r2).failed, 0) AS predictions_failed,
               coalesce((r1).outputs_expected, 0) + coalesce((r2).outputs_expected, 0) AS outputs_expected,
               coalesce((o1).processed, 0) + coalesce((o2).processed, 0) AS outputs_processed,
               coalesce((o1).failed, 0) + coalesce((o2).failed, 0) AS outputs_failed,
               coalesce((o1).outputs, '[]'::jsonb) || coalesce((o2).outputs, '[]'::jsonb) AS outputs,
               CASE WHEN st.status = 'failed' THEN coalesce((r2).error, (o2).error, (r1).error, (o1).error,
                                                            'no prediction succeeded') END AS error,
               (r1).started_at,
               CASE st.status
                   WHEN 'canceled' THEN canceled_at
                   WHEN 'completed' THEN greatest((r1).completed_at, (o1).completed_at,
                                                  (r2).completed_at, (o2).completed_at)
                   WHEN 'failed' THEN greatest((r1).completed_at, (o1).completed_at,
                                               (r2).completed_at, (o2).completed_at)
               END AS completed_at
        FROM (SELECT job_step_state(expected, coalesce((r1).submitted, 0), coalesce((r1).started, 0),
                                    coalesce((r1).succeeded, 0), coalesce((r1).failed, 0),
                                    coalesce((r1).outputs_expected, 0), coalesce((o1).processed, 0),
                                    coalesce((o1).failed, 0)) AS first_step) s1
        CROSS JOIN LATERAL (SELECT
            job_step_state(1, coalesce((r2).submitted, 0), coalesce((r2).started, 0),
                           coalesce((r2).succeeded, 0), coalesce((r2).failed, 0),
                           coalesce((r2).outputs_expected, 0), coalesce((o2).processed, 0),
                           coalesce((o2).failed, 0)) AS next_step) s2
        CROSS JOIN LATERAL (SELECT CASE
            WHEN canceled_at IS NOT NULL THEN 'canceled'
            WHEN first_step <> 'done' THEN first_step
            WHEN NOT has_next THEN 'completed'
            WHEN next_step = 'pending' THEN 'processing'
            WHEN next_step = 'queued' THEN 'running'
            WHEN next_step = 'done' THEN 'completed'
            ELSE next_step END AS status) st) x"""


def _rollup(counts: str, started_at: str | None = None, completed_at: str | None = None,
            error: str | None = None) -> str:
    """A job_step_rollups value of step 1; counts: submitted, started, succeeded, failed,
    outputs_expected."""
    return (f"(00000000-0000-0000-0000-000000000001,1,{counts},"
            f"{started_at or ''},{completed_at or ''},{error or ''})")


small = st.integers(0, 2)
moment = st.one_of(st.none(), st.sampled_from(["2026-01-01T00:00:01Z", "2026-01-01T00:00:05Z"]))
failure = st.one_of(st.none(), st.sampled_from(["boom", "NSFW"]))
prediction_rollup = st.one_of(st.none(), st.builds(
    lambda counts, started_at, completed_at, error:
        _rollup(",".join(map(str, counts)), started_at, completed_at, error),
    st.tuples(small, small, small, small, small), moment, moment, failure))
output_rollup = st.one_of(st.none(), st.builds(
    lambda processed, failed, completed_at, error:
        f"(00000000-0000-0000-0000-000000000001,1,{processed},{failed},{completed_at or ''},"
        f"\"[{{\"\"url\"\": {processed}}}]\",{error or ''})",
    small, small, moment, failure))


def _each_state_of_step_2(test):
    """Step 1 done, step 2 in each state job_step_state can give: rare draws, so named."""
    for r2 in [None, "1,0,0,0,0", "1,1,0,0,0", "1,1,1,0,1", "1,1,0,1,0", "1,1,1,0,0"]:
        test = example(canceled_at=None, expected=1, has_next=True, r1=_rollup("1,1,1,0,0"), o1=None,
                       r2=r2 and _rollup(r2), o2=None)(test)
    return test


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@_each_state_of_step_2
@given(canceled_at=moment, expected=st.integers(0, 3), has_next=st.booleans(),
       r1=prediction_rollup, o1=output_rollup, r2=prediction_rollup, o2=output_rollup)
def test_job_derived_values_gives_what_the_plain_rules_give(conn, canceled_at, expected, has_next,
                                                            r1, o1, r2, o2):
    row = conn.execute(REFERENCE_DERIVED, {"canceled_at": canceled_at, "expected": expected,
                                           "has_next": has_next, "r1": r1, "o1": o1, "r2": r2,
                                           "o2": o2}).fetchone()
    assert row["actual"] == row["expected"]
