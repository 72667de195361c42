-- 0001: snapshot history (daily partitions), latest state, positions, stream sessions,
-- ingest batches, portfolio views. Applied by db/migrate.py inside one transaction.

-- Every persisted GreeksSnapshot, partitioned by broker event time (UTC days).
-- No primary key on purpose: rows arrive by COPY and exactly-once is enforced per batch through
-- ingest_batches; batch_id ties every row to the batch (and commit) that wrote it.
CREATE TABLE greeks_history (
    batch_id         uuid             NOT NULL,
    broker           text             NOT NULL,
    account          text             NOT NULL,
    instrument       text             NOT NULL,
    underlying       text             NOT NULL,
    asset_class      text             NOT NULL,
    option_right     text,
    strike           double precision,
    expiry           date,
    multiplier       double precision NOT NULL,
    quantity         double precision NOT NULL,
    event_ts         timestamptz      NOT NULL,
    received_ts      timestamptz      NOT NULL,
    bid              double precision,
    ask              double precision,
    last             double precision,
    mark             double precision,
    underlying_price double precision,
    iv               double precision,
    delta            double precision,
    gamma            double precision,
    theta            double precision,
    vega             double precision,
    rho              double precision,
    pos_delta        double precision,
    pos_gamma        double precision,
    pos_theta        double precision,
    pos_vega         double precision,
    seq              bigint
) PARTITION BY RANGE (event_ts);

-- One index only, for "one instrument over time": every btree entry costs COPY dearly on this
-- wide row (measured on PG 18, 5000-row COPY batches: no index ~5.4 us/row server time,
-- (instrument, event_ts) ~8.4, (broker, account, instrument, event_ts) ~11). The instrument key
-- (an OCC symbol or ticker) is selective on its own; add broker/account as filters.
CREATE INDEX greeks_history_instrument_ts ON greeks_history (instrument, event_ts);

-- Latest snapshot per position, upserted once per batch (newest event_ts wins).
CREATE TABLE greeks_latest (
    batch_id         uuid             NOT NULL,
    broker           text             NOT NULL,
    account          text             NOT NULL,
    instrument       text             NOT NULL,
    underlying       text             NOT NULL,
    asset_class      text             NOT NULL,
    option_right     text,
    strike           double precision,
    expiry           date,
    multiplier       double precision NOT NULL,
    quantity         double precision NOT NULL,
    event_ts         timestamptz      NOT NULL,
    received_ts      timestamptz      NOT NULL,
    bid              double precision,
    ask              double precision,
    last             double precision,
    mark             double precision,
    underlying_price double precision,
    iv               double precision,
    delta            double precision,
    gamma            double precision,
    theta            double precision,
    vega             double precision,
    rho              double precision,
    pos_delta        double precision,
    pos_gamma        double precision,
    pos_theta        double precision,
    pos_vega         double precision,
    seq              bigint,
    updated_at       timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (broker, account, instrument)
);

-- Current positions per broker account (replaced as a set per account by db.queries).
CREATE TABLE positions (
    broker       text             NOT NULL,
    account      text             NOT NULL,
    instrument   text             NOT NULL,
    underlying   text             NOT NULL,
    asset_class  text             NOT NULL,
    option_right text,
    strike       double precision,
    expiry       date,
    multiplier   double precision NOT NULL,
    quantity     double precision NOT NULL,
    avg_cost     double precision,
    updated_at   timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (broker, account, instrument)
);

-- One row per broker connection (websocket session).
CREATE TABLE stream_sessions (
    session_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    broker      text        NOT NULL,
    account     text,
    host        text        NOT NULL DEFAULT '',
    pid         integer,
    mode        text        NOT NULL DEFAULT 'live',
    started_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    end_reason  text,
    events      bigint      NOT NULL DEFAULT 0
);
CREATE INDEX stream_sessions_broker_started ON stream_sessions (broker, started_at);

-- One row per committed writer batch: the exactly-once ledger for spool replay.
CREATE TABLE ingest_batches (
    batch_id        uuid        PRIMARY KEY,
    row_count       integer     NOT NULL,
    min_event_ts    timestamptz,
    max_event_ts    timestamptz,
    min_received_ts timestamptz,
    max_received_ts timestamptz,
    replayed        boolean     NOT NULL DEFAULT false,
    committed_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ingest_batches_committed_at ON ingest_batches (committed_at);

-- Partition management: idempotent and safe when several engines race.
CREATE FUNCTION greeks_history_partition_name(day date) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'greeks_history_p' || to_char(day, 'YYYYMMDD') $$;

CREATE FUNCTION ensure_greeks_history_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := greeks_history_partition_name(day);
    lo timestamptz := (day::timestamp AT TIME ZONE 'UTC');
    hi timestamptz := ((day + 1)::timestamp AT TIME ZONE 'UTC');
BEGIN
    IF to_regclass(quote_ident(part)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF greeks_history FOR VALUES FROM (%L) TO (%L)',
                   part, lo, hi);
    RETURN true;
EXCEPTION WHEN duplicate_table OR unique_violation THEN
    RETURN false;  -- another engine created it concurrently
END $$;

-- Drops daily partitions whose whole day lies before cutoff; returns how many were dropped.
CREATE FUNCTION drop_greeks_history_partitions_before(cutoff date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = 'greeks_history'
          AND c.relname ~ '^greeks_history_p[0-9]{8}$'
          AND to_date(substr(c.relname, 17), 'YYYYMMDD') < cutoff
    LOOP
        EXECUTE format('DROP TABLE IF EXISTS %I', r.relname);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

-- Positions that count: latest rows of instruments still held. An account that has a positions
-- snapshot counts only its listed, non-zero positions; an account without one counts every
-- latest row with a non-zero quantity.
CREATE VIEW greeks_current AS
SELECT l.*
FROM greeks_latest l
WHERE l.quantity <> 0
  AND (
    EXISTS (SELECT 1 FROM positions p
            WHERE p.broker = l.broker AND p.account = l.account AND p.instrument = l.instrument
              AND p.quantity <> 0)
    OR NOT EXISTS (SELECT 1 FROM positions p WHERE p.broker = l.broker AND p.account = l.account)
  );

-- Portfolio Greeks now, per underlying. dollar_delta = delta x underlying price.
CREATE VIEW portfolio_greeks_now AS
SELECT underlying,
       count(*)                                  AS positions,
       sum(pos_delta)                            AS delta,
       sum(pos_delta * underlying_price)         AS dollar_delta,
       sum(pos_gamma)                            AS gamma,
       sum(pos_theta)                            AS theta,
       sum(pos_vega)                             AS vega,
       max(event_ts)                             AS as_of
FROM greeks_current
GROUP BY underlying;

-- Portfolio Greeks now, whole book (one row).
CREATE VIEW portfolio_greeks_total AS
SELECT count(*)                                  AS positions,
       sum(pos_delta)                            AS delta,
       sum(pos_delta * underlying_price)         AS dollar_delta,
       sum(pos_gamma)                            AS gamma,
       sum(pos_theta)                            AS theta,
       sum(pos_vega)                             AS vega,
       max(event_ts)                             AS as_of
FROM greeks_current;

-- Portfolio Greeks over time, per underlying and minute: the last snapshot of each position in
-- each minute, summed. Positions that did not tick in a minute are absent from that minute
-- (filter on bucket to keep the scan to the partitions you need).
CREATE VIEW portfolio_greeks_minutely AS
WITH last_per_minute AS (
    SELECT DISTINCT ON (broker, account, instrument, date_trunc('minute', event_ts))
           date_trunc('minute', event_ts) AS bucket,
           underlying, pos_delta, underlying_price, pos_gamma, pos_theta, pos_vega
    FROM greeks_history
    ORDER BY broker, account, instrument, date_trunc('minute', event_ts), event_ts DESC
)
SELECT bucket,
       underlying,
       count(*)                                  AS positions,
       sum(pos_delta)                            AS delta,
       sum(pos_delta * underlying_price)         AS dollar_delta,
       sum(pos_gamma)                            AS gamma,
       sum(pos_theta)                            AS theta,
       sum(pos_vega)                             AS vega
FROM last_per_minute
GROUP BY bucket, underlying;
