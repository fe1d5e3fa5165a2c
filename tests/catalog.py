"""What a schema is made of, to compare two databases: tables and their columns (position,
type, default, compression), constraints, indexes, functions with their definitions and
privileges, views, triggers, policies, privileges on tables and columns, comments,
composite types, and the Realtime publication's members."""

from __future__ import annotations

import re

import psycopg

CATALOG = """
WITH rel AS (
    SELECT c.oid, c.relname, c.relkind FROM pg_class c
    WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'c', 'p', 'S', 'i')
)
SELECT 'relation' AS kind, rel.relname || ' ' || c.relkind::text || ' ' || c.relpersistence::text || ' '
    || c.relreplident::text || ' rls=' || c.relrowsecurity || ' ' || coalesce(c.reloptions::text, '') AS item
FROM rel JOIN pg_class c USING (oid)
UNION ALL SELECT 'column', rel.relname || '.' || a.attname || ' #' || a.attnum || ' '
    || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull || ' '
    || coalesce(pg_get_expr(d.adbin, d.adrelid), '') || ' ' || a.attcompression::text || ' '
    || coalesce(co.collname, '')
FROM rel JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 100
WHERE rel.relkind <> 'i'
UNION ALL SELECT 'column privilege', rel.relname || '.' || a.attname || ' ' || a.attacl::text
FROM rel JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attacl IS NOT NULL
UNION ALL SELECT 'privilege', rel.relname || ' ' || coalesce(c.relacl::text, '')
FROM rel JOIN pg_class c USING (oid)
UNION ALL SELECT 'constraint', conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL SELECT 'function', p.oid::regprocedure || ' ' || pg_get_functiondef(p.oid)
FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.prokind IN ('f', 'p')
UNION ALL SELECT 'function privilege', p.oid::regprocedure || ' ' || coalesce(p.proacl::text, '')
FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
UNION ALL SELECT 'view', rel.relname || ' ' || pg_get_viewdef(rel.oid)
FROM rel WHERE rel.relkind IN ('v', 'm')
UNION ALL SELECT 'trigger', tgrelid::regclass || ' ' || pg_get_triggerdef(oid)
FROM pg_trigger WHERE NOT tgisinternal AND tgparentid = 0  -- a partition's are its parent's
UNION ALL SELECT 'policy', schemaname || '.' || tablename || ' ' || policyname || ' ' || permissive::text
    || ' ' || cmd || ' ' || array_to_string(roles, ',') || ' ' || coalesce(qual, '') || ' '
    || coalesce(with_check, '')
FROM pg_policies
UNION ALL SELECT 'comment', rel.relname || coalesce('.' || a.attname, '') || ' ' || d.description
FROM rel JOIN pg_description d ON d.objoid = rel.oid AND d.classoid = 'pg_class'::regclass
LEFT JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attnum = d.objsubid AND d.objsubid > 0
UNION ALL SELECT 'function comment', p.oid::regprocedure || ' ' || d.description
FROM pg_proc p JOIN pg_description d ON d.objoid = p.oid AND d.classoid = 'pg_proc'::regclass
WHERE p.pronamespace = 'public'::regnamespace
UNION ALL SELECT 'published', schemaname || '.' || tablename
FROM pg_publication_tables WHERE pubname = 'supabase_realtime'
ORDER BY 1, 2
"""

# The records of what was applied: they differ by design between two databases.
BOOKKEEPING = ("schema_migrations", "schema_repeatables")


def catalog(conn: psycopg.Connection) -> list[tuple[str, str]]:
    return [(row["kind"], row["item"]) for row in conn.execute(CATALOG)]


# Functions and views whose definitions changed on purpose since the last release with the
# old layout (abbdd43), left out when its catalog is compared with today's. Every other
# object keeps the definition it had there.
CHANGED_SINCE_LEGACY = {
    # online replay (issue 15): the rebuild takes a set of streams, not one
    "rebuild_predictions", "rebuild_outputs", "rebuild_jobs", "clear_projections",
    "stream_filter", "job_filter", "stream_job_ids",
    # online replay: the step rollups read through functions, so that a replay's scratch
    # tables shadow the live ones (sql/fold.sql)
    "job_step_rollups", "job_step_output_rollups", "job_step_rollups_rows",
    "job_step_output_rollups_rows",
    # issue 21: a refused submission's prediction has its step, and a job's
    # predictions_expected counts a second step's prediction too (sql/fold.sql, sql/queue.sql)
    "prediction_step", "job_facts", "touch_job", "apply_event", "on_event_applied",
    # issue 21: job.created's timeline line names a second step (sql/history_views.sql)
    "history_event_summary",
    # issue 20: a fair queue with owner limits (sql/queue.sql)
    "enqueue_task", "claim_task", "task_owner_key", "owner_wait", "release_held_task",
    # issue 20 (deadlines, retries): a prediction can be superseded by a retry, a job has a
    # deadline and fails with 'deadline exceeded' (sql/fold.sql, sql/rebuild.sql); job_history
    # shows the deadline, retries and owner (sql/history_views.sql)
    "prediction_facts", "apply_prediction_event", "job_derived_values", "job_history",
    "job_stream_stats",
    # issue 19: the key goes in event_keys first (migration 017); partitions and their upkeep
    "append_event", "event_partition_size", "job_first_position", "maintain_event_partitions",
    # issue 19 (migration 018): a webhook's event keeps its facts, the delivery log its body
    # (sql/store.sql); the fold reads the logs' whole length where the event kept only their tail
    "webhook_facts", "append_webhooks", "maintain_delivery_partitions", "prune_deliveries",
    # issue 19 (append speed): PL/pgSQL where a SQL function's body was planned at every call
    "append_webhook",
    # issue 19: pg_partman keeps events' partitions where the server has it (sql/store.sql)
    "pg_partman_schema", "events_table_name", "event_partitions_keeper", "secure_event_partitions",
    "maintain_event_partitions_partman", "event_partitions_to_partman",
    "event_partitions_from_partman", "manage_event_partitions",
    "events_default_partition", "detach_caught_events", "restore_caught_events",
    # issue 19: a read of one job's events bounded above too (sql/store.sql)
    "job_last_position",
    # issue 19: a full rebuild reads the store a window of positions at a time, once for
    # every table it groups (sql/rebuild.sql)
    "rebuild_window", "rebuild_windowed", "rebuild_scan",
    # issue 19: a replay's scratch copy keeps a digest of each log tail, and the tails it
    # reads again are compressed as the rebuild's are (sql/rebuild.sql)
    "scratch_digest", "prefer_lz4_compression",
}

# Data shape added or changed on purpose by migrations since that release, left out the same
# way: each a pattern searched for in a catalog item (of any kind).
SHAPE_CHANGED_SINCE_LEGACY = (
    # issue 20 (020_fair_queue.sql): the fair queue's owner, rank and hold
    r"\btasks\.(owner_key|fair_rank|held_by)\b", r"\btasks_(fair|owner_queued|owner_submits|held_by_known)\b",
    # issue 20 (021_deadlines_retries.sql): jobs.deadline, predictions.superseded, the
    # job.retried event type and its index; job_history's new columns; the compute views
    r"^jobs\.deadline ", r"^predictions\.superseded ", r"^events events_type_known ",
    r"^CREATE INDEX events_job_retried ", r"^events_job_retried\b",
    r"^job_history\.(deadline|retries|owner_id) ", r"^job_stream_stats\.retried_at ",
    r"^(owner_compute|model_compute)\b", r"^cancel_after_seconds\(",
    r"^is_known_event_type\(", r"^is_event_type\(",
    # issue 19 (append speed, 023_held_tasks_index.sql and sql/fold.sql): the held
    # submissions' own index; the deadline probe out of job_derived_values' inlined body
    r"\btasks_held_running\b", r"^job_stopped_by_deadline\(",
    # issue 19 (024_job_activity_first_position.sql): a job's first position in job_activity
    r"^job_activity\.first_position ",
)

# issue 19 (migration 017): events is rebuilt as a partitioned table, and its keys are unique
# through a table of their own. What the partitioned table is as a relation (kind p), its
# comment, its indexes (each now ON ONLY the parent), the unique constraint and index on
# event_key it can no longer have, and the sequence's grant (append_event now calls nextval)
# changed on purpose; event_keys and the event_partitions view are new, and so are (migration
# 018) the delivery log (deliveries, delivery_partitions) and the record of retention
# (store_upkeep). events' columns, its other constraints (events_type_known...), triggers and
# policies compare as before.
_NEW_TABLES = {"event_keys", "deliveries", "store_upkeep", "store_upkeep_id_seq"}
_NEW_VIEWS = {"event_partitions", "delivery_partitions"}
_NEW_INDEXES = {"event_keys_pkey", "deliveries_position", "store_upkeep_pkey"}
_EVENTS_INDEXES = {"events_pkey", "events_event_key_unique", "events_recorded_at_brin",
                   "events_stream_position"}
PARTITIONED_STORE = {
    "relation": {"events"} | _EVENTS_INDEXES | _NEW_TABLES | _NEW_VIEWS | _NEW_INDEXES,
    "comment": {"events", "event_keys", "deliveries", "store_upkeep"},
    "constraint": {"events_event_key_unique", "event_keys_pkey", "store_upkeep_pkey"},
    "index": _EVENTS_INDEXES | _NEW_INDEXES,
    "privilege": {"events_position_seq"} | _EVENTS_INDEXES | _NEW_TABLES | _NEW_VIEWS | _NEW_INDEXES,
    "column": _NEW_TABLES | _NEW_VIEWS,
    "policy": {"event_keys", "deliveries"},
    "trigger": {"event_keys"},
    "view": _NEW_VIEWS,
}


def _partitioned_store(kind: str, item: str) -> bool:
    if kind == "index":
        name = re.search(r"INDEX (\S+) ON", item).group(1)
    elif kind == "constraint":
        name = item.split()[1]
    else:
        name = re.split(r"[ .(]", item.removeprefix("public."), maxsplit=1)[0]
    return name in PARTITIONED_STORE.get(kind, ())


def _changed_since_legacy(kind: str, item: str) -> bool:
    name = re.split(r"[ (]", item, maxsplit=1)[0]
    if any(re.search(pattern, item) for pattern in SHAPE_CHANGED_SINCE_LEGACY):
        return True
    return kind in ("function", "function privilege", "view") and name in CHANGED_SINCE_LEGACY


def without_comments(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The catalog with function bodies compared as code: `--` comments and the layout of
    whitespace left out, and the migrate command's own tables and the objects changed on
    purpose since the old layout (CHANGED_SINCE_LEGACY) left out."""
    out = []
    for kind, item in items:
        if (any(re.search(rf"\b{name}", item) for name in BOOKKEEPING) or _changed_since_legacy(kind, item)
                or _partitioned_store(kind, item)):
            continue
        if kind == "function":
            item = " ".join(re.sub(r"--[^\n]*", "", item).split())
        out.append((kind, item))
    return sorted(out)
