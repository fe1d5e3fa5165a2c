-- What the dashboard needs beyond the projections: the webhook deliveries that never
-- became events (for the health panel), a change feed on `jobs` for live updates, and
-- indexes for the dashboard's time-window reads.

-- Webhook deliveries that were answered but not recorded as events: refused ones (bad
-- signature, not a prediction, too large, refused by the event store) and duplicates
-- (a webhook-id already recorded, acknowledged again). A refused body is never stored,
-- only why it was refused and by whom. Operational state like `tasks`: not a projection,
-- replay neither reads nor rebuilds it, and old rows may be deleted at will.
CREATE TABLE unrecorded_webhooks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    outcome     text        NOT NULL,
    http_status integer     NOT NULL,
    webhook_id  text,
    remote_addr text,
    detail      text,
    CONSTRAINT unrecorded_webhooks_outcome_known CHECK (outcome IN (
        'bad_signature', 'bad_webhook', 'body_too_large', 'invalid_event', 'duplicate')),
    -- header values come from anyone who can reach the endpoint: keep them short
    CONSTRAINT unrecorded_webhooks_short CHECK (
        char_length(webhook_id) <= 256 AND char_length(remote_addr) <= 64
        AND char_length(detail) <= 512)
);

CREATE INDEX unrecorded_webhooks_received_at ON unrecorded_webhooks (received_at);
-- "was this recorded webhook delivered again?", for the job timeline
CREATE INDEX unrecorded_webhooks_duplicates ON unrecorded_webhooks (webhook_id)
    WHERE outcome = 'duplicate';

COMMENT ON TABLE unrecorded_webhooks IS
    'Webhook deliveries answered without recording an event: refused (bad_signature 401, '
    'bad_webhook 400, body_too_large 413, invalid_event 400) or duplicate (webhook-id already '
    'recorded, answered 200). Bodies are never kept. Not a projection; safe to prune.';

-- The health panel counts webhooks per minute over a recent window. events is
-- append-only and recorded_at grows with position, the case BRIN is made for: a few
-- bytes per range of pages, next to nothing added to an append.
CREATE INDEX events_recorded_at_brin ON events USING brin (recorded_at)
    WITH (pages_per_range = 32, autosummarize = on);

-- The change feed's fallback where LISTEN is unavailable (a transaction-mode pooler):
-- "which jobs changed since t?".
CREATE INDEX jobs_updated_at ON jobs (updated_at);


-- Live updates without Supabase: NOTIFY jobs_changed with the job id when what the
-- dashboard shows of a job changes; GET /api/dashboard/stream LISTENs (service/changes.py).
--
-- Every notifying transaction takes a cluster-wide lock at commit, so notifying
-- transactions commit one at a time: measured with 16 connections appending webhooks,
-- notifying on each visible change cost 25-40% of the throughput. So the trigger notifies
-- only while someone listens (live updates are off on the page until a person turns them
-- on): an open stream keeps jobs_feed_listeners.listening_until a little ahead of now,
-- and otherwise a webhook pays one lookup of a one-row table. The functions and triggers
-- are in sql/dashboard.sql.
CREATE UNLOGGED TABLE jobs_feed_listeners (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    listening_until timestamptz NOT NULL
);

COMMENT ON TABLE jobs_feed_listeners IS
    'One row: until when a dashboard change feed listens on jobs_changed. Unlogged: after a '
    'crash it is empty, and the next stream to open writes it again.';
