-- 0002: where each row's Greeks came from: 'broker' (all of delta, gamma, theta, vega sent by the
-- broker), 'model' (at least one computed by the engine), NULL (no Greeks).
ALTER TABLE greeks_history ADD COLUMN greeks_source text;
ALTER TABLE greeks_latest ADD COLUMN greeks_source text;
