"""The delivery log (migration 018) and its retention: a webhook's whole body and headers are
kept apart from its event, which keeps what the projections read; dropping the log's expired
days changes no projection, and a replay after it gives the rows it gave before."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from psycopg.types.json import Jsonb

from service import create_app, replay, store
from tests.conftest import PAYLOADS, new_job_id, payload
from tests.signing import SECRET, signed
from tests.test_migrations import rows
from tests.workload import CANCELED, FAILED, LIFECYCLE, LOGS_KEPT, bodies, create_job, facts, submit


@pytest.fixture
def app(db_url):
    app = create_app({"TESTING": True, "DATABASE_URL": db_url, "REPLICATE_WEBHOOK_SECRET": SECRET})
    yield app
    app.extensions["db_pool"].close()


def deliver(client, body: dict, job: str | None) -> dict:
    raw, headers = signed(body)
    response = client.post(f"/webhooks/replicate?job={job}&step=1" if job else "/webhooks/replicate",
                           data=raw, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def long_logs(body: dict) -> dict:
    """A real body whose logs ran on: its own logs, repeated past what the event keeps."""
    return dict(body, logs="\n".join([body["logs"]] * (2 * LOGS_KEPT // len(body["logs"]) + 2)))


def count(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]


def load(conn, client) -> list[dict]:
    """Real payloads through the webhook endpoint: jobs that succeed, fail and are canceled,
    one whose logs run past what an event keeps, and an orphan. Returns the bodies sent."""
    sent = []
    for n, kind in enumerate([LIFECYCLE, FAILED, CANCELED, LIFECYCLE]):
        job = new_job_id()
        create_job(conn, job)
        states = bodies(kind, f"pred{n}")
        submit(conn, job, states[0])
        for body in states[1:]:
            body = long_logs(body) if n == 3 and body.get("logs") else body
            deliver(client, body, job)
            sent.append(body)
    orphan = bodies(["succeeded_sdxl_polled_list_output"], "orphan")[0]
    deliver(client, orphan, None)
    return [*sent, orphan]


def test_a_webhook_is_kept_whole_in_the_delivery_log_and_its_event_keeps_the_facts(conn, client):
    sent = load(conn, client)
    events = conn.execute("SELECT e.data, d.body FROM events e JOIN deliveries d USING (position) "
                          "WHERE e.type = 'replicate.webhook' ORDER BY position").fetchall()
    assert [e["body"] for e in events] == sent
    assert [e["data"] for e in events] == [facts(b) for b in sent]
    cut = [b for b in sent if len(b.get("logs") or "") > LOGS_KEPT]
    assert cut, "the long logs were not long enough to be cut"
    prediction = conn.execute("SELECT logs_tail, logs_length FROM predictions WHERE id = %s",
                              (cut[-1]["id"],)).fetchone()
    assert prediction == {"logs_tail": cut[-1]["logs"][-LOGS_KEPT:], "logs_length": len(cut[-1]["logs"])}
    stored = conn.execute("SELECT sum(pg_column_size(data)) AS facts, sum(pg_column_size(body)) AS whole "
                          "FROM events JOIN deliveries USING (position)").fetchone()
    assert stored["facts"] < stored["whole"]


def test_a_replay_after_prune_equals_the_projection_before_it(conn, client):
    load(conn, client)
    before = rows(conn)
    shown = client.get(f"/api/jobs/{before['jobs'][0]['id']}/events").get_json()
    assert count(conn, "deliveries") == len([e for e in before["events"] if e["type"] == "replicate.webhook"])
    later = (datetime.now(UTC) + timedelta(days=31)).date()

    listed = store.prune(conn, 30, dry_run=True, today=later)
    today = f"store_partitions.deliveries_{datetime.now(UTC):%Y%m%d}"
    assert [p.partition for p in listed] == [today] and listed[0].bytes > 0
    assert count(conn, "deliveries") > 0 and count(conn, "store_upkeep") == 0  # a dry run drops nothing
    assert store.prune(conn, 30, today=later - timedelta(days=1)) == []  # not yet expired

    dropped = store.prune(conn, 30, today=later)
    assert [p.partition for p in dropped] == [today]
    assert count(conn, "deliveries") == 0
    ran = conn.execute("SELECT dropped, freed_bytes FROM store_upkeep ORDER BY id DESC LIMIT 1").fetchone()
    assert ran == {"dropped": [today], "freed_bytes": listed[0].bytes}
    assert rows(conn) == before  # retention touched no event and no projection row

    assert replay.replay(conn, check=True).differences == 0
    conn.execute("TRUNCATE jobs, predictions, outputs, job_activity")
    replay.replay(conn)
    assert rows(conn) == before
    # what people read still reads: a job's events, and a raw event without its delivery
    assert client.get(f"/api/jobs/{before['jobs'][0]['id']}/events").get_json() == shown
    webhook_at = next(e["position"] for e in before["events"] if e["type"] == "replicate.webhook")
    raw = client.get(f"/api/dashboard/events/{webhook_at}").get_json()
    assert raw["delivery"] is None and raw["data"]["id"]
    kept = client.get("/api/dashboard/health").get_json()["store"]
    assert kept["deliveries_oldest"] is None and kept["pruned_bytes"] == listed[0].bytes
    assert kept["pruned_at"][:10] == f"{datetime.now(UTC):%Y-%m-%d}"


def test_a_delivery_on_a_day_without_a_partition_is_kept_and_moved_by_maintenance(conn, client):
    job = new_job_id()
    create_job(conn, job)
    submit(conn, job, bodies(LIFECYCLE, "p1")[0])
    conn.execute("DROP TABLE store_partitions.deliveries_" + f"{datetime.now(UTC):%Y%m%d}")
    deliver(client, bodies(LIFECYCLE, "p1")[1], job)
    assert count(conn, "store_partitions.deliveries_default") == 1
    created = store.maintain_partitions(conn)
    assert f"store_partitions.deliveries_{datetime.now(UTC):%Y%m%d}" in created
    assert count(conn, "store_partitions.deliveries_default") == 0 and count(conn, "deliveries") == 1


def test_retention_zero_keeps_everything_and_a_negative_one_is_refused(conn, client):
    load(conn, client)
    assert store.prune(conn, 0, today=(datetime.now(UTC) + timedelta(days=3650)).date()) == []
    assert count(conn, "deliveries") > 0
    with pytest.raises(Exception, match="retention must be 0"):
        store.prune(conn, -1)


def test_the_prune_command_says_what_it_would_drop_and_what_it_freed(app, conn, client):
    load(conn, client)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["prune", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "nothing to drop: no day of the delivery log is older than 30 days"
    # a day of deliveries 40 days ago, as the log would hold it had the service run then
    old = (datetime.now(UTC) - timedelta(days=40)).date()
    name = f"store_partitions.deliveries_{old:%Y%m%d}"
    conn.execute(f"CREATE TABLE {name} PARTITION OF deliveries "
                 f"FOR VALUES FROM ('{old} 00:00+00') TO ('{old + timedelta(days=1)} 00:00+00')")
    conn.execute("INSERT INTO deliveries (received_at, position, webhook_id, body) "
                 "SELECT %s::timestamptz + interval '1 h', position, 'old', body FROM deliveries",
                 (f"{old} 00:00+00",))
    result = runner.invoke(args=["prune", "--dry-run"])
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"would drop {name} ({old}, ") and lines[0].endswith(" kB)"), lines
    assert lines[1].startswith("would drop 1 day of the delivery log older than 30 days: ") and \
        lines[1].endswith(" would be freed"), lines
    assert conn.execute("SELECT to_regclass(%s) AS t", (name,)).fetchone()["t"] is not None
    result = runner.invoke(args=["prune"])
    assert result.output.startswith(f"dropped {name} ({old}, ") and "freed" in result.output, result.output
    assert conn.execute("SELECT to_regclass(%s) AS t", (name,)).fetchone()["t"] is None
    app.config["EVENTS_RAW_RETENTION_DAYS"] = 0
    result = runner.invoke(args=["prune"])
    assert "kept forever" in result.output and count(conn, "deliveries") > 0


def test_the_facts_of_every_real_payload_are_what_the_fold_reads(conn):
    """Each real body folded whole and as its facts gives the same prediction row (the fold
    keys aside: they are hashes of what was kept, tie-breakers only)."""
    row = ("SELECT to_jsonb(p) - 'state_key' - 'logs_key' - 'output_key' AS r "
           "FROM prediction_facts('s', 'replicate.webhook', {}, '{{}}', 1, '2024-01-01Z') p")
    bodies_ = [payload(path.stem) for path in sorted(PAYLOADS.glob("*.json"))]
    assert len(bodies_) > 20
    for body in bodies_:
        whole = conn.execute(row.format("%s"), (Jsonb(body),)).fetchone()
        kept = conn.execute(row.format("webhook_facts(%s)"), (Jsonb(body),)).fetchone()
        assert kept == whole, body.get("id")


@pytest.mark.parametrize("change", [
    pytest.param({"deployment": "acme/sdxl", "hardware": {"gpu": "a40"}}, id="keys-replicate-may-add"),
    pytest.param({"webhook": "https://x/y", "webhook_events_filter": ["completed"], "stream": "https://s"},
                 id="keys-no-projection-reads"),
    pytest.param({"logs": "é" * 3000}, id="6000-bytes-of-logs-are-3000-characters-kept-whole"),
    pytest.param({"logs": "é" * 4001 + "!"}, id="4002-characters-of-logs-are-cut"),
    pytest.param({"logs": "x" * 4000}, id="4000-characters-are-kept-whole"),
    pytest.param({"logs": None, "output": None}, id="no-logs"),
])
def test_a_webhook_s_facts_keep_the_read_keys_and_the_logs_tail_whatever_else_the_body_holds(conn, change):
    """webhook_facts takes the keys Replicate sends that no projection reads out by name, and
    reads a body's keys only when it holds one it does not know; it counts the logs'
    characters only when their bytes could pass the tail's length. Each way gives what the
    definition says (tests/workload.py's facts)."""
    body = dict(payload("succeeded_sdxl_polled_list_output"), **change)
    kept = conn.execute("SELECT webhook_facts(%s) AS f", (Jsonb(body),)).fetchone()["f"]
    assert kept == facts(body)
    assert not (set(change) - {"logs", "output"}) & set(kept)  # the unread keys are gone
    assert conn.execute("SELECT webhook_facts('[1, 2]') AS f").fetchone()["f"] == [1, 2]
