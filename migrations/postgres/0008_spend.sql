-- What each call cost (issue 19): integer micro-dollars, from the usage its provider reported
-- and the price of the target that served it. NULL when it has no cost to tell: an unpriced
-- target (the built-in mock included), or no model call. `cost_estimated` marks a cost part
-- of whose usage syncgate estimated (a stream cut before its provider reported usage).
ALTER TABLE requests ADD COLUMN cost_micros BIGINT;
ALTER TABLE requests ADD COLUMN cost_estimated BOOLEAN NOT NULL DEFAULT false;
