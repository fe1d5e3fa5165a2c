-- The submissions an owner limit holds for a free slot (held_by = 'running'), in the order
-- release_held_task (sql/queue.sql) takes them. Every webhook that ends a prediction asks
-- for its owner's first one; without this index that walked the owner's whole queue of
-- submissions (tasks_owner_queued) to find, almost always, none: ~180 us a finished
-- prediction with 500 submissions queued, and more as the queue grows.
CREATE INDEX tasks_held_running ON tasks (owner_key, fair_rank, id)
    WHERE status = 'queued' AND held_by = 'running' AND kind = 'submit_prediction';
