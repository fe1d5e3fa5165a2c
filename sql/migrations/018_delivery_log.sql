-- The delivery log: each Replicate webhook as it was delivered (its whole body and the
-- headers kept), apart from the event, partitioned by the day it was received, and kept for
-- EVENTS_RAW_RETENTION_DAYS (default 30; 0 = forever). Retention drops whole partitions
-- (`flask --app service prune`), never rows.
--
-- The event a webhook becomes keeps only what a projection reads (webhook_facts in
-- sql/store.sql; docs/sql.md lists it): a replay after the log's partitions are dropped
-- gives the same rows as before. Written by append_webhooks in the same transaction as the
-- event; a duplicate delivery adds no row (the first is kept).
--
-- Partitions: store_partitions.deliveries_YYYYMMDD, one per UTC day, created ahead by
-- maintain_delivery_partitions (sql/store.sql; migrate and the worker run it); a delivery
-- on a day with no partition lands in deliveries_default, which prune never drops.

CREATE TABLE deliveries (
    received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    position    bigint      NOT NULL,   -- the event it became (events.position)
    webhook_id  text        NOT NULL,
    headers     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    body        jsonb       NOT NULL
) PARTITION BY RANGE (received_at);

CREATE INDEX deliveries_position ON deliveries (position);

COMMENT ON TABLE deliveries IS
    'Each recorded Replicate webhook as delivered (whole body, kept headers), by day received; '
    'kept EVENTS_RAW_RETENTION_DAYS, then its day''s partition is dropped. Not read by any projection.';

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE deliveries ALTER COLUMN body SET COMPRESSION lz4;
    END IF;
END $$;

ALTER TABLE deliveries ENABLE ROW LEVEL SECURITY;

CREATE TABLE store_partitions.deliveries_default PARTITION OF deliveries DEFAULT;

-- When retention last ran and what it dropped, for the dashboard's health panel.
CREATE TABLE store_upkeep (
    id            integer     PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
    ran_at        timestamptz NOT NULL DEFAULT now(),
    action        text        NOT NULL,   -- 'prune'
    dropped       text[]      NOT NULL,   -- partitions dropped
    freed_bytes   bigint      NOT NULL
);
COMMENT ON TABLE store_upkeep IS 'Each retention run: when, the partitions it dropped and the bytes freed.';
ALTER TABLE store_upkeep ENABLE ROW LEVEL SECURITY;
