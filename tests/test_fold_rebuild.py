"""The rebuild's faster forms must say exactly what the plain rules say."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
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
