-- Finished jobs are deleted some days after they finished ([jobs] retention_days), oldest
-- first, a few hundred at a time: this finds them without reading the queued and running ones
-- (which have no finish time and are left out of the index).
CREATE INDEX jobs_finished ON jobs (finished_ms) WHERE finished_ms IS NOT NULL;
