-- QFLARE schema version 1 (SQLite): the tables the store created by hand before it used sqlx
-- migrations. A database created then is baselined at this migration (see src/migrate.rs).

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    label       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_by     TEXT,
    revoked_at  INTEGER
);

CREATE TABLE devices (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    kem_suite       TEXT NOT NULL,
    kem_public_key  BLOB NOT NULL,
    signature_suite TEXT NOT NULL,
    verifying_key   BLOB NOT NULL,
    enrolled_at     INTEGER NOT NULL,
    revoked_at      INTEGER,
    last_seen_at    INTEGER,
    key_version     INTEGER NOT NULL,
    token_id        TEXT REFERENCES tokens (id)
);
CREATE INDEX devices_by_enrolled_at ON devices (enrolled_at, id);

CREATE TABLE sessions (
    id               TEXT PRIMARY KEY,
    device_id        TEXT NOT NULL REFERENCES devices (id),
    state            TEXT NOT NULL,
    client_nonce     BLOB NOT NULL,
    sealed_state     BLOB NOT NULL,
    created_at       INTEGER NOT NULL,
    confirm_deadline INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    last_seq         INTEGER NOT NULL,
    UNIQUE (device_id, client_nonce)
);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);

CREATE TABLE rounds (
    id                 INTEGER PRIMARY KEY,
    state              TEXT NOT NULL,
    base_model_version INTEGER NOT NULL,
    config_json        TEXT NOT NULL,
    min_updates        INTEGER NOT NULL,
    target_updates     INTEGER NOT NULL,
    opened_at          INTEGER NOT NULL,
    deadline           INTEGER NOT NULL,
    closed_at          INTEGER,
    attempt            INTEGER NOT NULL,
    outcome_json       TEXT
);

CREATE TABLE participants (
    round_id     INTEGER NOT NULL REFERENCES rounds (id),
    device_id    TEXT NOT NULL REFERENCES devices (id),
    submitted_at INTEGER,
    envelope     BLOB,
    verdict      TEXT,
    reason       TEXT,
    PRIMARY KEY (round_id, device_id)
);

CREATE TABLE models (
    version          INTEGER PRIMARY KEY,
    round_id         INTEGER NOT NULL,
    architecture     TEXT NOT NULL,
    bytes            BLOB NOT NULL,
    certificate_json TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    accuracy         REAL,
    loss             REAL
);

CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    subject     TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);

CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);

CREATE TABLE checkpoints (
    seq        INTEGER PRIMARY KEY REFERENCES audit_log (seq),
    head_hash  TEXT NOT NULL,
    signature  BLOB NOT NULL,
    signer_key BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
