-- One chunk of benchmark events: jobs lo .. hi-1, each recorded as the service records a
-- job (job.created, prediction.submitted, Replicate's webhooks, output.processed), with
-- bodies made from real payloads (the template parameters). Jobs start 0.4 s apart and
-- last about 17 s, so ~40 are in flight at once and their events interleave by time.
-- 1 job in 20 fails, 1 in 20 is canceled; 1 succeeded job in 4 also reports more logs.
-- At most max_rows rows are written (the jobs cut off are in flight).
INSERT INTO events (event_key, stream, type, data, metadata, recorded_at)
SELECT e.event_key, j.job, e.type, e.data, e.metadata, j.t0 + s.after
FROM (
    SELECT i,
           md5('job' || i)::uuid::text AS job,
           substr(md5('prediction' || i), 1, 26) AS pid,
           CASE mod(i, 20) WHEN 0 THEN 'failed' WHEN 1 THEN 'canceled' ELSE 'succeeded' END AS outcome,
           mod(i, 4) = 2 AS more_logs,
           timestamptz '2025-01-01 00:00:00+00' + i * interval '400 ms' AS t0,
           mod(i * 7919, 100000) AS seed,
           (%(prompts)s::text[])[1 + mod(i, cardinality(%(prompts)s::text[]))] AS prompt
    FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS i
) j
JOIN (VALUES (0, interval '0 s'), (1, interval '0.2 s'), (2, interval '5 s'),
             (3, interval '9 s'), (4, interval '14 s'), (5, interval '17 s')) AS s (slot, after)
  ON CASE s.slot
       WHEN 2 THEN j.outcome <> 'canceled'
       WHEN 3 THEN j.outcome = 'succeeded' AND j.more_logs
       WHEN 5 THEN j.outcome = 'succeeded'
       ELSE true END
CROSS JOIN LATERAL (
    SELECT jsonb_build_object(
               'id', j.pid,
               'input', jsonb_build_object('prompt', j.prompt, 'seed', j.seed,
                                           'width', 1024, 'height', 1024),
               'created_at', j.t0 + interval '0.1 s',
               'urls', jsonb_build_object(
                   'cancel', 'https://api.replicate.com/v1/predictions/' || j.pid || '/cancel',
                   'get', 'https://api.replicate.com/v1/predictions/' || j.pid),
               'webhook', 'https://jobs.example.com/webhooks/replicate?job=' || j.job || '&step=1',
               'webhook_events_filter', '["start", "output", "logs", "completed"]'::jsonb) AS base,
           jsonb_build_object('started_at', j.t0 + interval '3 s',
                              'completed_at', j.t0 + interval '13.5 s') AS times,
           'https://replicate.delivery/pbxt/' || md5('output' || j.i) || '/out-0.png' AS output_url
) b
CROSS JOIN LATERAL (
    SELECT CASE s.slot
               WHEN 0 THEN 'created:' || j.job
               WHEN 1 THEN 'submitted:' || j.job || ':1:0'
               WHEN 5 THEN 'processed:' || j.pid || ':0'
               ELSE 'msg_' || substr(md5(j.pid || s.slot), 1, 27) END AS event_key,
           CASE s.slot
               WHEN 0 THEN 'job.created'
               WHEN 1 THEN 'prediction.submitted'
               WHEN 5 THEN 'output.processed'
               ELSE 'replicate.webhook' END AS type,
           CASE WHEN s.slot IN (2, 3, 4)
                THEN jsonb_build_object('query', jsonb_build_object('job', j.job, 'step', '1'))
                ELSE '{}'::jsonb END AS metadata,
           CASE s.slot
               WHEN 0 THEN jsonb_build_object(
                   'model', 'stability-ai/sdxl', 'input', b.base -> 'input',
                   'aspect_ratio', '1:1', 'count', 1)
               WHEN 1 THEN jsonb_build_object(
                   'step', 1, 'index', 0, 'prediction', %(starting)s::jsonb || b.base)
               WHEN 2 THEN %(processing)s::jsonb || b.base || (b.times - 'completed_at')
                   || jsonb_build_object('logs', replace(replace(%(processing)s::jsonb ->> 'logs',
                        'seed: 7117', 'seed: ' || j.seed), %(template_prompt)s, j.prompt))
               WHEN 3 THEN %(more_logs)s::jsonb || b.base || (b.times - 'completed_at')
                   || jsonb_build_object('logs', replace(replace(%(more_logs)s::jsonb ->> 'logs',
                        'seed: 7117', 'seed: ' || j.seed), %(template_prompt)s, j.prompt))
               WHEN 4 THEN CASE j.outcome
                   WHEN 'succeeded' THEN %(succeeded)s::jsonb || b.base || b.times
                       || jsonb_build_object(
                            'logs', replace(replace(%(succeeded)s::jsonb ->> 'logs',
                                'seed: 7117', 'seed: ' || j.seed), %(template_prompt)s, j.prompt),
                            'output', jsonb_build_array(b.output_url),
                            'metrics', jsonb_build_object('predict_time', 9 + mod(j.i, 500) / 100.0))
                   WHEN 'failed' THEN %(failed)s::jsonb || b.base || b.times
                   ELSE %(canceled)s::jsonb || b.base || b.times END
               ELSE jsonb_build_object(
                   'prediction_id', j.pid, 'index', 0, 'source_url', b.output_url,
                   'url', 'https://example.supabase.co/storage/v1/object/public/outputs/'
                          || j.job || '/' || j.pid || '-0.webp',
                   'width', 1024, 'height', 1024, 'bytes', 900000 + mod(j.i * 31, 400000))
           END AS data
) e
ORDER BY j.t0 + s.after, s.slot
LIMIT %(max_rows)s
