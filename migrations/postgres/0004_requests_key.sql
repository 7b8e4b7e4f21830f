-- The console and GET /api/requests filter the log by the key that made the calls: newest
-- first through this index, like the model and status filters. (0003 is the shared limits'.)
CREATE INDEX requests_key_ts ON requests (key_id, ts_ms, id);
