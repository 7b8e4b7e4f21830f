-- Several instances on one database (issue 15): who is serving, and per-key limits that hold
-- across all of them.

-- Each `syncgate serve` registers itself here at start and renews its lease every few seconds,
-- timed by the database clock. An instance whose lease ran out is dead to the others: its row
-- is deleted and the in-flight slots it held are released by whichever instance notices.
CREATE TABLE instances (
    id          TEXT        PRIMARY KEY,
    host        TEXT        NOT NULL,
    listen      TEXT        NOT NULL,
    version     TEXT        NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    renewed_at  TIMESTAMPTZ NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL
);

-- One row per admitted request of a key with limits: its instant and token charge (the
-- sliding 60 s window of rpm and tpm) and whether it is still in flight, attributed to the
-- instance that admitted it. Rows leave once they are out of the window and no longer in
-- flight. UNLOGGED: a crash of the database server empties it, which forgets at most a minute
-- of admissions; in exchange no admission writes WAL. Many short-lived rows: vacuum early.
CREATE UNLOGGED TABLE limit_admissions (
    id        BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id    BIGINT      NOT NULL,
    instance  TEXT        NOT NULL,
    at        TIMESTAMPTZ NOT NULL,
    tokens    BIGINT      NOT NULL,
    -- Counted in the window (the key has rpm or tpm); else the row exists only for in flight.
    windowed  BOOLEAN     NOT NULL,
    in_flight BOOLEAN     NOT NULL
) WITH (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
CREATE INDEX limit_admissions_window ON limit_admissions (key_id, at);
CREATE INDEX limit_admissions_in_flight ON limit_admissions (key_id) WHERE in_flight;

-- Milliseconds from `now_` until `until`, rounded up, never negative.
CREATE FUNCTION syncgate_ms_until(until TIMESTAMPTZ, now_ TIMESTAMPTZ) RETURNS BIGINT
LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(0, ceil(extract(epoch FROM (until - now_)) * 1000))::BIGINT
$$;

-- Admits one request of key `p_key` estimated at `p_tokens`, for instance `p_instance`: the
-- one round trip of a keyed request. It locks the key's row (so admissions of one key run one
-- at a time, on every instance), checks the key is neither revoked nor expired and the
-- instance holds a lease, expires old window entries, checks rpm, tpm and max_in_flight with
-- the limits stored on the key, records the admission and returns what the x-ratelimit-*
-- headers and Retry-After need. It must be PL/pgSQL, not one SQL statement: each statement
-- after the lock takes a fresh snapshot and sees admissions committed while it waited for the
-- lock; a single statement would count with the snapshot it took before the lock.
--
-- outcome: admitted, requests, tokens, in_flight (refused by that limit: the longest wait;
-- on a tie the first in this order), revoked, expired, unknown, unregistered.
CREATE FUNCTION syncgate_admit(
    p_key BIGINT, p_instance TEXT, p_tokens BIGINT,
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
        INSERT INTO limit_admissions (key_id, instance, at, tokens, windowed, in_flight)
        VALUES (p_key, p_instance, t, charge, k.rpm IS NOT NULL OR k.tpm IS NOT NULL, true)
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

-- Forgets instances whose lease ran out, releases the in-flight slots of every instance
-- without a live lease, and deletes window rows no longer needed (of keys not called for a
-- minute). Rows another call has locked are left for the next run, so two instances reaping
-- at once, or an admission expiring the same rows, never deadlock.
CREATE FUNCTION syncgate_reap(OUT instances_gone BIGINT, OUT slots_released BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM instances WHERE lease_until < now();
    GET DIAGNOSTICS instances_gone = ROW_COUNT;
    UPDATE limit_admissions a SET in_flight = false WHERE a.id IN (
        SELECT o.id FROM limit_admissions o
        WHERE o.in_flight
          AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = o.instance)
        FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS slots_released = ROW_COUNT;
    DELETE FROM limit_admissions a WHERE a.id IN (
        SELECT o.id FROM limit_admissions o
        WHERE NOT o.in_flight AND o.at < now() - interval '60 seconds'
        FOR UPDATE SKIP LOCKED LIMIT 10000);
END
$$;
