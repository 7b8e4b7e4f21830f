-- An admission whose answer never reached its instance (the connection broke after the commit)
-- held an in-flight slot that no settle freed while that instance lived: the instance never
-- learnt the admission's id. Each admission now also carries a ticket its instance chose
-- (unique within the instance), so an instance that lost an answer can release that
-- admission's slot by the ticket once the database answers again.
ALTER TABLE limit_admissions ADD COLUMN ticket BIGINT;

-- syncgate_admit (0003) with the caller's ticket written on the admission it records. The
-- three-argument function stays: it does the work, and an instance not yet upgraded calls it.
-- The admission's commit does not wait for the WAL to reach the disk: the key's row lock is
-- held until the commit, so a flush per admission capped a hot key at one admission per disk
-- flush, cluster-wide; and what the commit makes durable is little, since limit_admissions is
-- UNLOGGED (a crash of the server forgets the window anyway). Revocation is not affected: it
-- is its own transaction.
CREATE FUNCTION syncgate_admit(
    p_key BIGINT, p_instance TEXT, p_tokens BIGINT, p_ticket BIGINT,
    OUT outcome TEXT, OUT admission BIGINT,
    OUT rpm BIGINT, OUT requests_used BIGINT, OUT requests_reset_ms BIGINT,
    OUT tpm BIGINT, OUT tokens_charged BIGINT, OUT tokens_reset_ms BIGINT,
    OUT wait_ms BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT a.outcome, a.admission, a.rpm, a.requests_used, a.requests_reset_ms, a.tpm,
           a.tokens_charged, a.tokens_reset_ms, a.wait_ms
      INTO outcome, admission, rpm, requests_used, requests_reset_ms, tpm,
           tokens_charged, tokens_reset_ms, wait_ms
      FROM syncgate_admit(p_key, p_instance, p_tokens) a;
    IF admission IS NOT NULL THEN
        UPDATE limit_admissions SET ticket = p_ticket WHERE id = admission;
    END IF;
END
$$;
