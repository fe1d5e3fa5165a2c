"""Group commit (service/groups.py) with real threads: who gets which result, how groups form."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.groups import GroupCommit
from tests.waiting import wait_for


class Recorder:
    """A record function that keeps the groups it was given; the first group waits for
    `release`, so everything submitted meanwhile has to queue behind it."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, items):
        self.groups.append(list(items))
        self.entered.set()
        self.release.wait(10)
        return [ValueError(f"item {item} is bad") if item < 0 else item * 10 for item in items]


def submit_while_blocked(groups: GroupCommit, recorder: Recorder, first: int, rest: list[int]):
    """Submit `first`, and `rest` while first's group is being recorded; their outcomes."""
    with ThreadPoolExecutor(len(rest) + 1) as pool:
        futures = [pool.submit(groups.submit, first)]
        assert recorder.entered.wait(10)
        futures += [pool.submit(groups.submit, item) for item in rest]
        wait_for("the rest to queue", lambda: groups.waiting == len(rest), 10)
        recorder.release.set()
        return [f.exception() or f.result() for f in futures]


def test_what_arrives_during_a_commit_is_recorded_as_one_group_and_each_caller_gets_its_own():
    recorder = Recorder()
    groups = GroupCommit(recorder)
    outcomes = submit_while_blocked(groups, recorder, 1, [2, 3, 4, 5, 6, 7, 8])
    assert outcomes == [10, 20, 30, 40, 50, 60, 70, 80]
    assert len(recorder.groups) == 2
    assert recorder.groups[0] == [1]
    assert sorted(recorder.groups[1]) == [2, 3, 4, 5, 6, 7, 8]
    assert groups.waiting == 0


def test_an_items_error_is_raised_in_its_own_caller_only():
    recorder = Recorder()
    groups = GroupCommit(recorder)
    outcomes = submit_while_blocked(groups, recorder, 1, [2, -3, 4])
    assert outcomes[:2] == [10, 20] and outcomes[3] == 40
    assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "item -3 is bad"
    assert sorted(recorder.groups[1]) == [-3, 2, 4]


def test_groups_are_at_most_max_size_and_every_item_is_recorded_once():
    recorder = Recorder()
    groups = GroupCommit(recorder, max_size=3)
    outcomes = submit_while_blocked(groups, recorder, 0, list(range(1, 11)))
    assert outcomes == [i * 10 for i in range(11)]
    assert all(len(group) <= 3 for group in recorder.groups)
    assert sorted(i for group in recorder.groups for i in group) == list(range(11))


def test_a_failed_record_reaches_every_caller_of_its_group_and_the_next_group_works():
    calls = []

    def record(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("database gone")
        return list(items)

    groups = GroupCommit(record)
    with pytest.raises(RuntimeError, match="database gone"):
        groups.submit("a")
    assert groups.submit("b") == "b"


def test_a_record_that_answers_for_the_wrong_number_of_items_is_an_error_for_all():
    groups = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError, match="a group of 1 recorded 0 results"):
        groups.submit("a")


def test_many_threads_each_get_their_own_result_and_every_item_is_recorded_once():
    recorded: list[int] = []

    def record(items):
        recorded.extend(items)
        time.sleep(random.random() / 5000)  # vary how much queues behind each group
        return [("done", item) for item in items]

    groups = GroupCommit(record, max_size=5)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(groups.submit, range(3000)))
    assert results == [("done", i) for i in range(3000)]
    assert sorted(recorded) == list(range(3000))
    assert groups.waiting == 0


def test_a_caller_that_asks_is_told_when_its_group_started_and_when_it_had_recorded():
    recorder = Recorder()
    groups = GroupCommit(recorder)
    first_times: list[float] = []
    second_times: list[float] = []
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(groups.submit, 1, first_times)
        assert recorder.entered.wait(10)
        submitted = time.perf_counter()
        second = pool.submit(groups.submit, 2, second_times)
        wait_for("the second to queue", lambda: groups.waiting == 1, 10)
        time.sleep(0.05)
        released = time.perf_counter()
        recorder.release.set()
        assert (first.result(), second.result()) == (10, 20)
    first_started, first_recorded = first_times
    second_started, second_recorded = second_times
    assert first_started < submitted < released <= first_recorded  # the first group held it up
    assert first_recorded <= second_started <= second_recorded  # then its own group ran
    assert groups.submit(3) == 30  # and a caller that does not ask is told nothing
