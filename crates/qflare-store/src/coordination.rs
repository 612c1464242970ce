//! The SQL of coordination between replicas (the coordinator lease and the admin's training
//! control). Both backends run these same statements: SQLite and PostgreSQL share the upsert
//! syntax and the `$n` placeholders, and each statement is atomic on its own, so neither needs a
//! transaction or backend-specific locking.

use crate::row::Col;
use crate::{CoordinatorLease, StoreError};

/// Takes the lease when it is free, already ours, or expired (`$3` is now); else changes nothing.
/// The epoch moves only when the holder changes, so renewals keep it.
pub(crate) const ACQUIRE_LEASE: &str = "
    INSERT INTO coordinator_lease (id, holder, address, epoch, acquired_at, expires_at)
    VALUES (1, $1, $2, 1, $3, $4)
    ON CONFLICT (id) DO UPDATE SET
        holder = excluded.holder,
        address = excluded.address,
        epoch = CASE WHEN coordinator_lease.holder = excluded.holder
                     THEN coordinator_lease.epoch ELSE coordinator_lease.epoch + 1 END,
        acquired_at = CASE WHEN coordinator_lease.holder = excluded.holder
                           THEN coordinator_lease.acquired_at ELSE excluded.acquired_at END,
        expires_at = excluded.expires_at
    WHERE coordinator_lease.holder = excluded.holder OR coordinator_lease.expires_at <= $3";

/// The lease row, whoever holds it.
pub(crate) const READ_LEASE: &str = "SELECT * FROM coordinator_lease WHERE id = 1";

/// Lets the lease lapse now (the row stays, so the next holder's epoch still grows).
pub(crate) const RELEASE_LEASE: &str =
    "UPDATE coordinator_lease SET expires_at = 0 WHERE id = 1 AND holder = $1 AND expires_at > 0";

/// Records the admin's start or pause.
pub(crate) const SET_TRAINING_CONTROL: &str = "
    INSERT INTO training_control (id, training, updated_at) VALUES (1, $1, $2)
    ON CONFLICT (id) DO UPDATE SET training = excluded.training, updated_at = excluded.updated_at";

/// The admin's last start or pause.
pub(crate) const READ_TRAINING_CONTROL: &str = "SELECT training FROM training_control WHERE id = 1";

pub(crate) fn lease(row: &impl Col) -> Result<CoordinatorLease, StoreError> {
    Ok(CoordinatorLease {
        holder: row.text("holder")?,
        address: row.text("address")?,
        epoch: row.u64("epoch")?,
        acquired_at: row.i64("acquired_at")?,
        expires_at: row.i64("expires_at")?,
    })
}
