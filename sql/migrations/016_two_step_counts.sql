-- A job's predictions_expected now counts every prediction it runs: `count` in step 1 and
-- one more for a second step (`then`), as job_facts in sql/fold.sql derives it. Rows folded
-- before counted step 1 only; this brings them to what a replay of their events gives.
UPDATE jobs SET predictions_expected = predictions_expected + 1 WHERE next_step IS NOT NULL;
