"""Compare the projections of two databases that recorded the same events in different orders.

What may differ is only where and when each database saw an event: recording times
(jobs.created_at, updated_at, canceled_at; predictions.first_seen_at, updated_at;
outputs.recorded_at), positions (jobs.last_position), and the position suffix that breaks
ties in fold keys (sql/fold.sql). Every other column must be equal, row for row.
"""

from __future__ import annotations

from service import db

TABLES = {  # table -> (key columns, columns that record when or where an event was seen)
    "jobs": (("id",), ("created_at", "updated_at", "canceled_at", "last_position")),
    "predictions": (("id",), ("first_seen_at", "updated_at")),
    "outputs": (("prediction_id", "index"), ("recorded_at",)),
}
FOLD_KEYS = ("state_key", "logs_key", "output_key", "fold_key")
POSITION_SUFFIX = 19  # fold_key_position(): the last 19 characters


def projection(url: str) -> dict[str, dict[tuple, dict]]:
    """Each table's rows by key, without the recording columns and fold-key positions."""
    out: dict[str, dict[tuple, dict]] = {}
    with db.connect(url) as conn:
        for table, (keys, recording) in TABLES.items():
            rows = conn.execute(f"SELECT to_jsonb(t) - %s::text[] AS row FROM {table} t",
                                (list(recording),)).fetchall()
            out[table] = {tuple(r["row"][k] for k in keys): _without_positions(r["row"]) for r in rows}
    return out


def _without_positions(row: dict) -> dict:
    for name in FOLD_KEYS:
        if row.get(name):
            row[name] = row[name][:-POSITION_SUFFIX]
    return row


def differences(a: dict[str, dict[tuple, dict]], b: dict[str, dict[tuple, dict]]) -> list[str]:
    """One line per row that is missing on either side or differs, naming the columns."""
    found = []
    for table in TABLES:
        left, right = a[table], b[table]
        for key in sorted(left.keys() | right.keys(), key=str):
            if key not in left or key not in right:
                found.append(f"{table} {key}: only in {'the second' if key not in left else 'the first'}")
            elif left[key] != right[key]:
                columns = sorted(c for c in left[key] if left[key][c] != right[key].get(c))
                found.append(f"{table} {key}: {', '.join(columns)}")
    return found
