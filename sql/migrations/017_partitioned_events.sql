-- events, range-partitioned by position; idempotency keys in a table of their own.
--
-- A table that only grows, on a disk that does not: partitions of a fixed number of
-- positions (event_partition_size() in sql/store.sql, a million) let an index or a scan
-- touch only the partitions it needs, and keep each partition's indexes small. A UNIQUE
-- constraint on a partitioned table must include the partition key, so event_key can no
-- longer be unique in events itself: event_keys holds every key with its position,
-- written by append_event in the same transaction as the event (sql/store.sql). A key
-- is refused forever, whichever partition its first event sits in.
--
-- Partitions live in the schema store_partitions, apart from public: Supabase's API
-- exposes public, and a query of the partitions themselves would bypass events'
-- row-level security and triggers. events_default catches an event whose position has no
-- partition yet (maintenance has not run); maintain_event_partitions() moves such rows
-- into partitions of their own and creates the next ones ahead of need.
--
-- Upgrade in place: the rows are copied into the new table, in position order, and the old
-- table is dropped. This holds an ACCESS EXCLUSIVE lock on events for the whole copy, so
-- webhooks wait (or fail after the pool's timeout, and Replicate retries them); docs/deploy.md
-- says how long per million events and how to run it.

CREATE SCHEMA IF NOT EXISTS store_partitions;
REVOKE ALL ON SCHEMA store_partitions FROM PUBLIC;
COMMENT ON SCHEMA store_partitions IS
    'Partitions of events (and of the delivery log). Read them through their parent tables.';

LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
ALTER TABLE events RENAME TO events_unpartitioned;
ALTER SEQUENCE events_position_seq RENAME TO events_unpartitioned_position_seq;
ALTER TABLE events_unpartitioned RENAME CONSTRAINT events_pkey TO events_unpartitioned_pkey;
ALTER INDEX events_stream_position RENAME TO events_unpartitioned_stream_position;
ALTER INDEX events_recorded_at_brin RENAME TO events_unpartitioned_recorded_at_brin;
ALTER TABLE events_unpartitioned
    RENAME CONSTRAINT events_event_key_unique TO events_unpartitioned_event_key_unique;

-- The same columns, in the same order, with the same constraint names (a later migration
-- may replace events_type_known by name to admit a new type).
CREATE TABLE events (
    position    bigint GENERATED ALWAYS AS IDENTITY,
    event_key   text        NOT NULL,
    stream      text        NOT NULL,
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT events_pkey PRIMARY KEY (position),
    CONSTRAINT events_type_known CHECK (is_event_type(type)),
    CONSTRAINT events_data_is_object CHECK (is_object(data)),
    CONSTRAINT events_metadata_is_object CHECK (is_object(metadata)),
    CONSTRAINT events_stream_nonempty CHECK (is_nonempty(stream)),
    CONSTRAINT events_key_nonempty CHECK (is_nonempty(event_key))
) PARTITION BY RANGE (position);

CREATE INDEX events_stream_position ON events (stream, position);
CREATE INDEX events_recorded_at_brin ON events USING brin (recorded_at)
    WITH (pages_per_range = 32, autosummarize = on);

COMMENT ON TABLE events IS
    'Append-only log of every webhook and service event. UPDATE, DELETE and TRUNCATE raise. '
    'Range-partitioned by position (store_partitions.events_*); keys are unique through event_keys.';

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE events ALTER COLUMN data SET COMPRESSION lz4;
    END IF;
END $$;

ALTER TABLE events ENABLE ROW LEVEL SECURITY;

CREATE TABLE store_partitions.events_default PARTITION OF events DEFAULT;

-- The partitions the rows already there need, and the next one. Partition n holds the
-- positions [n * 1,000,000, (n + 1) * 1,000,000): the size event_partition_size() gives
-- (sql/store.sql defines it, after this file runs; maintenance creates the later ones).
DO $$
DECLARE
    v_size constant bigint := 1000000;
    v_last bigint := (SELECT coalesce(max(position), 0) FROM events_unpartitioned) / v_size + 1;
BEGIN
    FOR n IN 0 .. v_last LOOP
        EXECUTE format('CREATE TABLE store_partitions.%I PARTITION OF events FOR VALUES FROM (%s) TO (%s)',
                       'events_' || lpad(n::text, 6, '0'), n * v_size, (n + 1) * v_size);
    END LOOP;
END $$;

INSERT INTO events (position, event_key, stream, type, data, metadata, recorded_at)
OVERRIDING SYSTEM VALUE
SELECT position, event_key, stream, type, data, metadata, recorded_at
FROM events_unpartitioned ORDER BY position;

SELECT setval(pg_get_serial_sequence('events', 'position'),
              greatest((SELECT max(position) FROM events), 1),
              (SELECT max(position) FROM events) IS NOT NULL);

CREATE TABLE event_keys (
    event_key text   NOT NULL,
    position  bigint NOT NULL,
    CONSTRAINT event_keys_pkey PRIMARY KEY (event_key)
);
COMMENT ON TABLE event_keys IS
    'The idempotency key of every event and its position: a key is recorded once, forever. '
    'Written by append_event in the same transaction as the event.';
ALTER TABLE event_keys ENABLE ROW LEVEL SECURITY;

INSERT INTO event_keys (event_key, position) SELECT event_key, position FROM events_unpartitioned;

-- The functions and views over events name its row type: they go with the old table, and
-- every repeatable file is applied again after this migration (forgetting their records
-- makes migrate apply them all), recreating them over the new one.
DROP TABLE events_unpartitioned CASCADE;
DELETE FROM schema_repeatables;

ANALYZE events;
ANALYZE event_keys;
