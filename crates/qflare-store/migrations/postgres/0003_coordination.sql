-- Coordination between server replicas sharing this database.
--
-- coordinator_lease: at most one row (id = 1). The replica named by `holder` runs the round
-- controller and the enclave until `expires_at` (Unix seconds, the holder's clock); it renews
-- well before then, and any replica may take the lease once it has expired. `epoch` grows by one
-- each time the lease changes hands, so a log line or audit entry can say which tenure did what.
-- `address` is where the other replicas reach the holder (host:port of its HTTPS listener).
--
-- training_control: at most one row (id = 1): the admin's last start or pause, so that it holds
-- whichever replica coordinates now and after a restart. No row: the configuration decides.

CREATE TABLE coordinator_lease (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    holder     TEXT NOT NULL,
    address    TEXT NOT NULL,
    epoch      BIGINT NOT NULL CHECK (epoch > 0),
    acquired_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE training_control (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    training   TEXT NOT NULL CHECK (training IN ('started', 'paused')),
    updated_at BIGINT NOT NULL
);
