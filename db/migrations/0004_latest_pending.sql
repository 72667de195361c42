-- 0004: greeks_latest may trail greeks_history by a bounded interval under load.
--
-- Under load the writer commits a batch's history without its latest-state upsert and applies
-- the newest row of every position of those batches at most LATEST_INTERVAL_MS later, in one
-- statement (db.copy.FLUSH_LATEST). A batch committed that way is marked here until then, so that
-- an engine that dies in between leaves a trace: the next writer to connect rebuilds those rows
-- of greeks_latest from greeks_history (db.copy.REPAIR_LATEST) and clears the marks.
ALTER TABLE ingest_batches ADD COLUMN latest_pending boolean NOT NULL DEFAULT false;
CREATE INDEX ingest_batches_latest_pending ON ingest_batches (batch_id) WHERE latest_pending;

-- The repair reads history by receive time (the ledger's receive-time range of the marked
-- batches): a BRIN costs a few kB a day and next to nothing per row.
CREATE INDEX greeks_history_received_ts_brin ON greeks_history USING brin (received_ts);
