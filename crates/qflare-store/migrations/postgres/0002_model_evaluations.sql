-- Federated evaluation: devices evaluate a global model version on their own held-out data and
-- report named scalar metrics with the number of examples they evaluated on. One row per metric,
-- so the example-weighted mean per version and metric is a single GROUP BY.
--
-- device_id names the device by id only, without a foreign key, as models.round_id and
-- rounds.base_model_version name theirs.

CREATE TABLE model_evaluations (
    model_version BIGINT NOT NULL REFERENCES models (version),
    device_id     TEXT NOT NULL,
    metric        TEXT NOT NULL,
    value         DOUBLE PRECISION NOT NULL,
    examples      BIGINT NOT NULL CHECK (examples > 0),
    round_id      BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (model_version, device_id, metric)
);
