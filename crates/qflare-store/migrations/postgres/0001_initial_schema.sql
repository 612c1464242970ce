-- QFLARE schema version 1 (PostgreSQL): the tables the store created by hand before it used sqlx
-- migrations. A database created then is baselined at this migration (see src/migrate.rs).

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    label       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,
    used_by     TEXT,
    revoked_at  BIGINT
);

CREATE TABLE devices (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    kem_suite       TEXT NOT NULL,
    kem_public_key  BYTEA NOT NULL,
    signature_suite TEXT NOT NULL,
    verifying_key   BYTEA NOT NULL,
    enrolled_at     BIGINT NOT NULL,
    revoked_at      BIGINT,
    last_seen_at    BIGINT,
    key_version     BIGINT NOT NULL,
    token_id        TEXT REFERENCES tokens (id)
);
CREATE INDEX devices_by_enrolled_at ON devices (enrolled_at, id);

CREATE TABLE sessions (
    id               TEXT PRIMARY KEY,
    device_id        TEXT NOT NULL REFERENCES devices (id),
    state            TEXT NOT NULL,
    client_nonce     BYTEA NOT NULL,
    sealed_state     BYTEA NOT NULL,
    created_at       BIGINT NOT NULL,
    confirm_deadline BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL,
    last_seq         BIGINT NOT NULL,
    UNIQUE (device_id, client_nonce)
);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);

CREATE TABLE rounds (
    id                 BIGINT PRIMARY KEY,
    state              TEXT NOT NULL,
    base_model_version BIGINT NOT NULL,
    config_json        TEXT NOT NULL,
    min_updates        BIGINT NOT NULL,
    target_updates     BIGINT NOT NULL,
    opened_at          BIGINT NOT NULL,
    deadline           BIGINT NOT NULL,
    closed_at          BIGINT,
    attempt            BIGINT NOT NULL,
    outcome_json       TEXT
);

CREATE TABLE participants (
    round_id     BIGINT NOT NULL REFERENCES rounds (id),
    device_id    TEXT NOT NULL REFERENCES devices (id),
    submitted_at BIGINT,
    envelope     BYTEA,
    verdict      TEXT,
    reason       TEXT,
    PRIMARY KEY (round_id, device_id)
);

CREATE TABLE models (
    version          BIGINT PRIMARY KEY,
    round_id         BIGINT NOT NULL,
    architecture     TEXT NOT NULL,
    bytes            BYTEA NOT NULL,
    certificate_json TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    accuracy         DOUBLE PRECISION,
    loss             DOUBLE PRECISION
);

CREATE TABLE audit_log (
    seq         BIGINT PRIMARY KEY,
    at          BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    subject     TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);

CREATE TABLE audit_head (
    id   BIGINT PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);

CREATE TABLE checkpoints (
    seq        BIGINT PRIMARY KEY REFERENCES audit_log (seq),
    head_hash  TEXT NOT NULL,
    signature  BYTEA NOT NULL,
    signer_key BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
