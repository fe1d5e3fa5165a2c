from __future__ import annotations

import random
import threading

from service import db, queue
from tests.conftest import new_job_id


def test_enqueue_is_idempotent_by_key(conn):
    first = queue.enqueue(conn, "submit_prediction", "submit:x:1:0", None, {"step": 1})
    again = queue.enqueue(conn, "submit_prediction", "submit:x:1:0", None, {"step": 2})
    assert first == again
    assert conn.execute("SELECT count(*) AS n, max(payload->>'step') AS step FROM tasks").fetchone() == \
        {"n": 1, "step": "1"}


def test_a_claimed_task_is_not_claimed_again_until_its_lease_runs_out(conn):
    queue.enqueue(conn, "submit_prediction", "k", None, {})
    task = queue.claim(conn, "w1", 60)
    assert task is not None and task.attempts == 1
    assert queue.claim(conn, "w2", 60) is None
    conn.execute("UPDATE tasks SET lease_until = now() - interval '1 second'")  # w1 died
    taken = queue.claim(conn, "w2", 60)
    assert taken.id == task.id and taken.attempts == 2
    assert queue.complete(conn, task, "w1") is False  # w1 lost the lease
    assert queue.complete(conn, taken, "w2") is True
    assert conn.execute("SELECT status FROM tasks").fetchone()["status"] == "done"


def test_retry_waits_and_release_does_not_count_an_attempt(conn):
    queue.enqueue(conn, "submit_prediction", "k", None, {})
    task = queue.claim(conn, "w", 60)
    assert queue.retry(conn, task, "w", "boom", 3600)
    assert queue.claim(conn, "w", 60) is None  # not before its time
    row = conn.execute("SELECT status, last_error, attempts FROM tasks").fetchone()
    assert row == {"status": "queued", "last_error": "boom", "attempts": 1}
    conn.execute("UPDATE tasks SET run_after = now()")
    again = queue.claim(conn, "w", 60)
    assert queue.release(conn, again, "w")
    assert conn.execute("SELECT attempts FROM tasks").fetchone()["attempts"] == 1


def test_concurrent_workers_never_claim_the_same_task(db_url, conn):
    job = new_job_id()
    for i in range(40):
        queue.enqueue(conn, "submit_prediction", f"submit:{job}:1:{i}", job, {"index": i})
    claimed: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        with db.connect(db_url, autocommit=True) as own:
            while (task := queue.claim(own, name, 60)) is not None:
                with lock:
                    claimed.append(task.id)
                queue.complete(own, task, name)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 40
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE status = 'done'").fetchone()["n"] == 40


def test_backoff_grows_and_is_capped():
    assert all(1.0 <= queue.backoff(1) <= 2.0 for _ in range(50))
    assert all(1.0 <= queue.backoff(30, cap=300.0) <= 300.0 for _ in range(50))
    assert max(queue.backoff(6) for _ in range(200)) > 16


def test_backoff_leaves_the_global_random_state_alone():
    """A worker thread's jitter must not move the generator other code shares (Hypothesis
    warns when it moves during a draw; in CI that came from the database pool's thread,
    tests/test_fuzz.py)."""
    before = random.getstate()
    delays = {queue.backoff(6) for _ in range(20)}
    assert random.getstate() == before and len(delays) > 1
