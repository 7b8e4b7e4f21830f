-- An admission whose answer never reached its instance (the connection broke after the commit)
-- held an in-flight slot that no settle freed while that instance lived: the instance never
-- learnt the admission's id. Each admission now also carries a ticket its instance chose
-- (unique within the instance), so an instance that lost an answer can release that
-- admission's slot by the ticket once the database answers again.
ALTER TABLE limit_admissions ADD COLUMN ticket BIGINT;

-- syncgate_admit as in 0003 (its comment there says what it does and why it is PL/pgSQL),
-- with two changes. It writes the caller's ticket on the admission it records. And its commit
-- does not wait for the WAL to reach the disk: the key's row lock is held until the commit, so
-- a flush per admission capped a hot key at one admission per disk flush, cluster-wide, while
-- what the commit makes durable is little, since limit_admissions is UNLOGGED (a crash of the
-- server forgets the window anyway). Revocation is its own transaction and keeps its flush.
CREATE FUNCTION syncgate_admit(
    p_key BIGINT, p_instance TEXT, p_tokens BIGINT, p_ticket BIGINT,
    OUT outcome TEXT, OUT admission BIGINT,
    OUT rpm BIGINT, OUT requests_used BIGINT, OUT requests_reset_ms BIGINT,
    OUT tpm BIGINT, OUT tokens_charged BIGINT, OUT tokens_reset_ms BIGINT,
    OUT wait_ms BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    k           api_keys%ROWTYPE;
    t           TIMESTAMPTZ;
    win_start   TIMESTAMPTZ;
    latest      TIMESTAMPTZ;
    latest_tok  TIMESTAMPTZ;
    charge      BIGINT;
    most        BIGINT;
    wait        BIGINT;
    flying      BIGINT;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT * INTO k FROM api_keys WHERE id = p_key FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'unknown';
        RETURN;
    END IF;
    IF k.revoked_ms IS NOT NULL THEN
        outcome := 'revoked';
        RETURN;
    END IF;
    -- Read after the lock: the instant of this admission is never before one that held it.
    t := clock_timestamp();
    IF k.expires_ms IS NOT NULL AND k.expires_ms <= (extract(epoch FROM t) * 1000)::BIGINT THEN
        outcome := 'expired';
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = p_instance AND i.lease_until > t) THEN
        outcome := 'unregistered';
        RETURN;
    END IF;
    rpm := k.rpm;
    tpm := k.tpm;
    IF k.rpm IS NULL AND k.tpm IS NULL AND k.max_in_flight IS NULL THEN
        outcome := 'admitted';
        RETURN;
    END IF;
    win_start := t - interval '60 seconds';
    DELETE FROM limit_admissions a WHERE a.id IN (
        SELECT o.id FROM limit_admissions o
        WHERE o.key_id = p_key AND o.at <= win_start AND NOT o.in_flight
        FOR UPDATE SKIP LOCKED);
    SELECT count(*), coalesce(sum(a.tokens), 0), max(a.at), max(a.at) FILTER (WHERE a.tokens > 0)
      INTO requests_used, tokens_charged, latest, latest_tok
      FROM limit_admissions a
     WHERE a.key_id = p_key AND a.windowed AND a.at > win_start;
    charge := CASE WHEN k.tpm IS NULL THEN 0 ELSE greatest(p_tokens, 0) END;

    IF k.rpm IS NOT NULL AND requests_used >= k.rpm THEN
        IF k.rpm = 0 THEN
            wait := 60000;
        ELSE
            -- One more fits once only rpm - 1 remain: when the (used - rpm)-th oldest expires.
            SELECT syncgate_ms_until(a.at + interval '60 seconds', t) INTO wait
              FROM limit_admissions a
             WHERE a.key_id = p_key AND a.windowed AND a.at > win_start
             ORDER BY a.at, a.id OFFSET requests_used - k.rpm LIMIT 1;
        END IF;
        outcome := 'requests';
        wait_ms := wait;
    END IF;
    IF k.tpm IS NOT NULL THEN
        wait := NULL;
        most := k.tpm - charge;
        IF most < 0 THEN
            wait := 60000;
        ELSIF tokens_charged > most THEN
            SELECT syncgate_ms_until(s.at + interval '60 seconds', t) INTO wait
              FROM (SELECT a.at, a.id, sum(a.tokens) OVER (ORDER BY a.at, a.id) AS freed
                      FROM limit_admissions a
                     WHERE a.key_id = p_key AND a.windowed AND a.at > win_start) s
             WHERE tokens_charged - s.freed <= most
             ORDER BY s.at, s.id LIMIT 1;
            wait := coalesce(wait, 60000);
        END IF;
        IF wait IS NOT NULL AND (wait_ms IS NULL OR wait > wait_ms) THEN
            outcome := 'tokens';
            wait_ms := wait;
        END IF;
    END IF;
    IF k.max_in_flight IS NOT NULL THEN
        SELECT count(*) INTO flying FROM limit_admissions a WHERE a.key_id = p_key AND a.in_flight;
        IF flying >= k.max_in_flight AND (wait_ms IS NULL OR 1000 > wait_ms) THEN
            outcome := 'in_flight';
            wait_ms := 1000;
        END IF;
    END IF;

    IF outcome IS NULL THEN
        INSERT INTO limit_admissions (key_id, instance, at, tokens, windowed, in_flight, ticket)
        VALUES (p_key, p_instance, t, charge, k.rpm IS NOT NULL OR k.tpm IS NOT NULL, true,
                p_ticket)
        RETURNING id INTO admission;
        outcome := 'admitted';
        IF k.rpm IS NOT NULL OR k.tpm IS NOT NULL THEN
            requests_used := requests_used + 1;
            tokens_charged := tokens_charged + charge;
            latest := t;
            IF charge > 0 THEN
                latest_tok := t;
            END IF;
        END IF;
    END IF;
    requests_reset_ms := coalesce(syncgate_ms_until(latest + interval '60 seconds', t), 0);
    tokens_reset_ms := coalesce(syncgate_ms_until(latest_tok + interval '60 seconds', t), 0);
END
$$;

-- The three-argument form, for an instance not yet upgraded during a rolling upgrade: the same
-- admission without a ticket.
CREATE OR REPLACE FUNCTION syncgate_admit(
    p_key BIGINT, p_instance TEXT, p_tokens BIGINT,
    OUT outcome TEXT, OUT admission BIGINT,
    OUT rpm BIGINT, OUT requests_used BIGINT, OUT requests_reset_ms BIGINT,
    OUT tpm BIGINT, OUT tokens_charged BIGINT, OUT tokens_reset_ms BIGINT,
    OUT wait_ms BIGINT)
LANGUAGE sql AS $$
    SELECT * FROM syncgate_admit(p_key, p_instance, p_tokens, NULL)
$$;
