"""events' partitions kept by pg_partman (manage_event_partitions, sql/store.sql): migrate hands
them over where the server has it (EVENT_PARTITIONS=auto or partman) and back (builtin); the
worker's maintenance runs pg_partman's; nothing of the store changes on the way.

On the local PostgreSQL 15 with postgresql-15-partman (scripts/setup_pg_tools.sh installs it,
4.7.2 on Debian 12); pg_partman 5.x (recent Supabase projects) is not tested here. The
embedded server never has it: there only the refusal and the fallback are tested."""

from __future__ import annotations

import os

import psycopg
import pytest

from service import db, events, migrations, replay, store
from service.db import queries
from tests.conftest import new_job_id
from tests.test_migrations import rows
from tests.test_partitions import jump_to, partitions, where
from tests.workload import LIFECYCLE, bodies, create_job, submit, webhook

SIZE = 1_000_000


def has_partman(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT EXISTS (SELECT FROM pg_available_extensions "
                        "WHERE name = 'pg_partman') AS ok").fetchone()["ok"]


@pytest.fixture
def partman_conn(conn):
    """The test's database, events' partitions not yet handed to pg_partman (the template was
    migrated without EVENT_PARTITIONS, so with the built-in upkeep)."""
    if not os.environ.get("DATABASE_URL"):
        pytest.skip("the embedded PostgreSQL has no pg_partman: run with DATABASE_URL (PostgreSQL 15)")
    if not has_partman(conn):
        pytest.skip("this server has no pg_partman: run scripts/setup_pg_tools.sh "
                    "(postgresql-15-partman)")
    return conn


def hand_over(conn, mode: str = "auto") -> None:
    migrations.migrate(conn, event_partitions=mode)


def part_config(conn) -> list[dict]:
    return conn.execute("SELECT parent_table, partition_type, partition_interval, premake, "
                        "automatic_maintenance FROM partman.part_config").fetchall()


def bounds(conn) -> list[tuple]:
    return [(p["from_position"], p["to_position"]) for p in partitions(conn)]


def lifecycle(conn, job: str, prefix: str) -> list:
    states = bodies(LIFECYCLE, f"pred_{prefix}")
    submit(conn, job, states[0])
    return [webhook(conn, job, body, key=f"{prefix}_{n}") for n, body in enumerate(states[1:])]


def test_migrate_hands_the_partitions_to_pg_partman_and_keeps_every_row(partman_conn):
    conn = partman_conn
    job = new_job_id()
    create_job(conn, job)
    lifecycle(conn, job, "early")
    jump_to(conn, 2 * SIZE + 1)
    later = new_job_id()
    create_job(conn, later)
    before, held = rows(conn), bounds(conn)
    assert migrations.event_partitions_keeper(conn) == "builtin"

    hand_over(conn)
    assert migrations.event_partitions_keeper(conn) == "pg_partman"
    assert part_config(conn) == [{"parent_table": "public.events", "partition_type": "native",
                                  "partition_interval": "1000000", "premake": 4,
                                  "automatic_maintenance": "off"}]
    names = [p["partition"] for p in partitions(conn)]
    # the three partitions already made, renamed as pg_partman names them, and its premake ahead
    assert names == [f"events_p{n * SIZE}" for n in range(7)] + ["events_default"]
    assert bounds(conn)[:3] == held[:3]
    assert rows(conn) == before  # every event and projection row, same positions and keys
    assert where(conn, before["events"][0]["position"]) == "events_p0"
    assert where(conn, 2 * SIZE + 1) == "events_p2000000"
    store_panel = conn.execute(queries["dashboard_store"]).fetchone()  # the health panel's
    assert store_panel["event_partitions"] == 7 and store_panel["events_bytes"] > 0
    assert not conn.execute("SELECT count(*) AS n FROM pg_class WHERE relnamespace = "
                            "'store_partitions'::regnamespace AND relname LIKE 'events%'").fetchone()["n"]
    hand_over(conn)  # again: nothing to do
    assert [p["partition"] for p in partitions(conn)] == names


def test_an_append_past_the_last_partition_is_kept_and_maintenance_moves_it(partman_conn, client):
    conn = partman_conn
    hand_over(conn, "partman")
    last = max(p["to_position"] for p in partitions(conn) if p["to_position"])
    job = new_job_id()
    create_job(conn, job)
    states = bodies(LIFECYCLE, "p1")
    submit(conn, job, states[0])
    jump_to(conn, last + 2 * SIZE + 5)  # past pg_partman's premade partitions; no maintenance yet
    late = [webhook(conn, job, body, key=f"late_{n}") for n, body in enumerate(states[1:])]
    assert {where(conn, a.position) for a in late} == {"events_default"}
    before = rows(conn)
    listed = client.get(f"/api/jobs/{job}/events").get_json()["events"]
    assert [e["position"] for e in listed][-len(late):] == [a.position for a in late]

    created = store.maintain_partitions(conn)
    landed = (last + 2 * SIZE) // SIZE * SIZE
    # every partition up to the caught rows' and two ahead of them, by pg_partman, then its premake
    assert created[:5] == [f"events_p{last + n * SIZE}" for n in range(5)]
    assert created[-1] == f"events_p{landed + 4 * SIZE}"
    assert {where(conn, a.position) for a in late} == {f"events_p{landed}"}
    assert conn.execute("SELECT count(*) AS n FROM events_default").fetchone()["n"] == 0
    assert rows(conn) == before  # same events, same positions and keys, same projections
    assert client.get(f"/api/jobs/{job}/events").get_json()["events"] == listed
    after = webhook(conn, job, states[-1], key="after")
    assert where(conn, after.position) == f"events_p{landed}"
    assert webhook(conn, job, states[1], key="late_0").duplicate
    assert store.maintain_partitions(conn) == []  # ahead already


def test_maintenance_makes_the_next_partitions_as_the_appends_reach_them(partman_conn):
    conn = partman_conn
    hand_over(conn)
    jump_to(conn, 4 * SIZE + 1)  # into the last partition pg_partman premade
    create_job(conn, new_job_id())
    assert where(conn, 4 * SIZE + 1) == "events_p4000000"
    # two ahead of the newest position (5 and 6 million), then pg_partman's premake: four
    # partitions past the one the newest event is in
    assert store.maintain_partitions(conn) == [f"events_p{n * SIZE}" for n in range(5, 9)]
    assert store.maintain_partitions(conn) == []


def test_a_duplicate_whose_first_copy_sits_in_an_old_partition_is_still_a_duplicate(partman_conn):
    conn = partman_conn
    hand_over(conn)
    job = new_job_id()
    create_job(conn, job)
    states = bodies(LIFECYCLE, "p1")
    submit(conn, job, states[0])
    first = webhook(conn, job, states[1], key="msg_old")
    assert where(conn, first.position) == "events_p0"
    jump_to(conn, 5 * SIZE + 10)
    store.maintain_partitions(conn)
    later = webhook(conn, job, states[2], key="msg_new")
    assert where(conn, later.position) == "events_p5000000"
    before = rows(conn)
    again = webhook(conn, job, dict(states[1], status="succeeded"), key="msg_old")
    assert (again.position, again.duplicate) == (first.position, True)
    assert rows(conn) == before
    group = conn.execute("SELECT * FROM append_webhooks(%s::jsonb)", (psycopg.types.json.Jsonb([
        {"webhook_id": "msg_old", "job": job, "body": states[1], "metadata": {}},
        {"webhook_id": "msg_newer", "job": job, "body": states[3], "metadata": {}}]),)).fetchall()
    assert [(r["n"], r["duplicate"], r["event_position"] == first.position) for r in group] == [
        (1, True, True), (2, False, False)]


def test_a_replay_reads_pg_partmans_partitions_in_order(partman_conn):
    conn = partman_conn
    hand_over(conn)
    for n in range(3):  # a job in each of three partitions, the last one's webhooks in a fourth
        jump_to(conn, n * 3 * SIZE + 1)
        job = new_job_id()
        create_job(conn, job)
        if n == 2:
            jump_to(conn, 9 * SIZE + 1)  # past the partitions made: the default one catches them
        lifecycle(conn, job, f"msg_{n}")
        if n < 2:
            store.maintain_partitions(conn)
    before = rows(conn)
    assert replay.replay(conn, check=True).differences == 0
    assert store.maintain_partitions(conn)  # moves the caught webhooks out
    held = conn.execute("SELECT DISTINCT tableoid::regclass::text AS p FROM events ORDER BY 1").fetchall()
    assert [r["p"] for r in held] == ["events_p0", "events_p3000000", "events_p6000000", "events_p9000000"]
    assert replay.replay(conn, check=True).differences == 0
    conn.execute("TRUNCATE jobs, predictions, outputs, job_activity")
    result = replay.replay(conn)
    assert result.events == len(before["events"]) and len(before["jobs"]) == 3
    assert rows(conn) == before


def test_one_jobs_events_are_read_from_its_partitions_only(partman_conn):
    conn = partman_conn
    hand_over(conn)
    create_job(conn, new_job_id())
    jump_to(conn, 2 * SIZE + 1)
    job = new_job_id()
    create_job(conn, job)
    plan = str(conn.execute("EXPLAIN (ANALYZE, COSTS OFF, FORMAT JSON) " + queries["job_events"],
                            events.job_stream(conn, job)).fetchone()["QUERY PLAN"])
    assert "events_p2000000" in plan
    assert "events_p0" not in plan and "events_p1000000" not in plan


def test_pg_partmans_partitions_in_public_are_closed_to_every_role_but_the_owner(partman_conn, db_url):
    conn = partman_conn
    # as a Supabase project does: every new table in public granted to its API roles
    conn.execute("DROP ROLE IF EXISTS rjs_partman_api")
    conn.execute("CREATE ROLE rjs_partman_api")
    try:
        conn.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO rjs_partman_api")
        conn.execute("GRANT USAGE ON SCHEMA public TO rjs_partman_api")
        hand_over(conn)
        jump_to(conn, 4 * SIZE + 1)
        create_job(conn, new_job_id())
        assert store.maintain_partitions(conn)  # made after the default privileges, too
        names = [p["partition"] for p in partitions(conn)]
        with db.connect(db_url, autocommit=True) as api:
            api.execute("SET ROLE rjs_partman_api")
            for name in names:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    api.execute(f"SELECT count(*) FROM {name}")
        secured = conn.execute(
            "SELECT bool_and(c.relrowsecurity) AS rls, bool_and(c.relacl IS NULL OR NOT EXISTS ("
            "  SELECT FROM aclexplode(c.relacl) a WHERE a.grantee <> c.relowner)) AS closed "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'events'::regclass").fetchone()
        assert secured == {"rls": True, "closed": True}
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("UPDATE events_p4000000 SET type = 'job.canceled'")  # the triggers hold there too
    finally:
        conn.execute("DROP OWNED BY rjs_partman_api")
        conn.execute("DROP ROLE rjs_partman_api")


def test_builtin_keeps_the_own_upkeep_where_pg_partman_is_there_and_takes_events_back(partman_conn):
    conn = partman_conn
    hand_over(conn, "builtin")
    assert migrations.event_partitions_keeper(conn) == "builtin"
    assert not conn.execute("SELECT count(*) AS n FROM pg_extension WHERE extname = 'pg_partman'"
                            ).fetchone()["n"]
    assert [p["partition"] for p in partitions(conn)][-1] == "store_partitions.events_default"

    job = new_job_id()
    create_job(conn, job)
    hand_over(conn, "partman")
    jump_to(conn, 9 * SIZE + 3)
    caught = create_job(conn, new_job_id())
    assert where(conn, caught.position) == "events_default"  # pg_partman's, past its premake
    before = rows(conn)

    hand_over(conn, "builtin")  # back: partitions and the row the default one holds kept
    assert migrations.event_partitions_keeper(conn) == "builtin"
    assert conn.execute("SELECT count(*) AS n FROM partman.part_config").fetchone()["n"] == 0
    assert all(p["partition"].startswith("store_partitions.") for p in partitions(conn))
    assert where(conn, caught.position) == "store_partitions.events_default"
    created = store.maintain_partitions(conn)
    assert created == [f"store_partitions.events_{n:06d}" for n in range(5, 12)]
    assert where(conn, caught.position) == "store_partitions.events_000009"
    assert rows(conn) == before


def test_partman_without_pg_partman_refuses_and_auto_keeps_the_own_upkeep(conn):
    if has_partman(conn):
        pytest.skip("this server has pg_partman: the refusal is for a server without it")
    with pytest.raises(migrations.MigrationError, match="EVENT_PARTITIONS=partman, but this server "
                                                        "has no pg_partman"):
        migrations.migrate(conn, event_partitions="partman")
    migrations.migrate(conn, event_partitions="auto")
    assert migrations.event_partitions_keeper(conn) == "builtin"
    assert [p["partition"] for p in partitions(conn)][0] == "store_partitions.events_000000"


def test_on_a_supabase_like_project_the_owner_hands_over_and_anon_reaches_no_partition(supabase_url):
    """Migrated by the project's owner, not a superuser; pg_partman installed the way a Supabase
    project lists it (its admin creates the extension, the owner may use it). The project's
    default privileges grant every new table in public to the API roles."""
    from tests.supabase import OWNER, acting_as

    with db.connect(supabase_url, autocommit=True) as admin:
        if not os.environ.get("DATABASE_URL") or not has_partman(admin):
            pytest.skip("needs pg_partman on the server (DATABASE_URL, scripts/setup_pg_tools.sh)")
        # a clone is owned by whoever made it; the project's database is the owner's
        admin.execute(f"ALTER DATABASE {supabase_url.rsplit('/', 1)[1]} OWNER TO {OWNER}")
        admin.execute(f"CREATE SCHEMA partman AUTHORIZATION {OWNER}")
        admin.execute("CREATE EXTENSION pg_partman SCHEMA partman")
        admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA partman TO {OWNER}")
        admin.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA partman TO {OWNER}")
    with db.connect(supabase_url, autocommit=True) as conn:
        conn.execute(f"SET ROLE {OWNER}")
        create_job(conn, new_job_id())
        migrations.migrate(conn, event_partitions="partman")
        assert migrations.event_partitions_keeper(conn) == "pg_partman"
        jump_to(conn, 5 * SIZE + 1)
        create_job(conn, new_job_id())
        assert store.maintain_partitions(conn)
        names = [p["partition"] for p in partitions(conn)]
        assert "events_p6000000" in names and "events_default" in names
        for name in names:
            for role in ("anon", "authenticated"):
                with acting_as(conn, role), pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(f"SELECT count(*) FROM {name}")
        granted = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'events'::regclass AND (has_table_privilege('anon', c.oid, 'SELECT') "
            "OR has_table_privilege('authenticated', c.oid, 'TRUNCATE') "
            "OR has_table_privilege('service_role', c.oid, 'DELETE') OR NOT c.relrowsecurity)").fetchall()
        assert granted == []


def test_the_setting_reaches_migrate_through_the_command(conn, db_url):
    from tests.test_cli import cli_env, flask

    def migrate(mode: str):
        return flask("migrate", env=cli_env(DATABASE_URL=db_url, EVENT_PARTITIONS=mode))

    kept = migrate("builtin")
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.splitlines() == ["database is up to date",
                                        "events' partitions: kept by the built-in upkeep"]
    if has_partman(conn):
        assert migrate("auto").stdout.splitlines()[1] == "events' partitions: kept by pg_partman"
        assert migrations.event_partitions_keeper(conn) == "pg_partman"
    else:
        refused = migrate("partman")
        assert refused.returncode != 0 and "EVENT_PARTITIONS=partman, but this server has no " \
                                           "pg_partman" in refused.stderr
        assert migrate("auto").stdout.splitlines()[1] == "events' partitions: kept by the built-in upkeep"
    bad = migrate("sometimes")
    assert bad.returncode == 2 and "EVENT_PARTITIONS must be auto, partman or builtin" in bad.stderr


def test_the_setting_is_one_of_three():
    from service.config import Settings
    from service.errors import ConfigError

    assert Settings.from_env({}).EVENT_PARTITIONS == "auto"
    assert Settings.from_env({"EVENT_PARTITIONS": " Builtin "}).EVENT_PARTITIONS == "builtin"
    with pytest.raises(ConfigError, match="EVENT_PARTITIONS must be auto, partman or builtin"):
        Settings.from_env({"EVENT_PARTITIONS": "pg_partman"})


def test_a_role_that_may_not_create_pg_partman_keeps_the_own_upkeep_with_auto(supabase_url, caplog):
    """On a plain PostgreSQL only a superuser may create pg_partman 4.x: the project's owner,
    not one, migrating with auto keeps the built-in upkeep (all of the hand-over undone), and
    with partman is told why it cannot."""
    from tests.supabase import OWNER

    with db.connect(supabase_url, autocommit=True) as admin:
        if not os.environ.get("DATABASE_URL") or not has_partman(admin):
            pytest.skip("needs pg_partman on the server (DATABASE_URL, scripts/setup_pg_tools.sh)")
        admin.execute(f"ALTER DATABASE {supabase_url.rsplit('/', 1)[1]} OWNER TO {OWNER}")
    with db.connect(supabase_url, autocommit=True) as conn:
        conn.execute(f"SET ROLE {OWNER}")
        before = rows(conn), partitions(conn)
        with pytest.raises(migrations.MigrationError, match="may not install or use pg_partman"):
            migrations.migrate(conn, event_partitions="partman")
        migrations.migrate(conn, event_partitions="auto")
        assert migrations.event_partitions_keeper(conn) == "builtin"
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("could not be handed to it (42501: permission denied to create extension" in m
                   for m in said), said
        assert conn.execute("SELECT count(*) AS n FROM pg_namespace WHERE nspname = 'partman'"
                            ).fetchone()["n"] == 0
        assert (rows(conn), partitions(conn)) == before


def test_maintenance_gives_way_to_a_long_reader_with_pg_partman_too(partman_conn, db_url):
    conn = partman_conn
    hand_over(conn)
    jump_to(conn, 4 * SIZE + 1)  # the next partitions are due
    create_job(conn, new_job_id())
    with psycopg.connect(db_url) as reader:
        reader.execute("SELECT count(*) FROM events")  # a report, its transaction still open
        assert store.maintain_partitions(conn) == []  # gave up after the lock timeout
    assert store.maintain_partitions(conn) == [f"events_p{n * SIZE}" for n in range(5, 9)]
