//! Who may send an update body, and how much memory all of them may hold.
//!
//! An update body is as large as the model (hundreds of megabytes for a big
//! one), and the server reads it whole before it can check anything inside.
//! So everything that can be decided before the body is read is, in
//! [`UploadGate::admit`], called by the sealed-request extractor once the
//! session is authenticated and before a byte of the body is read:
//!
//! 1. a round is open and this device is one of its participants that has
//!    not submitted yet (one indexed row; otherwise the answer is the code
//!    the submission itself would have got: `round_closed`, `not_selected`,
//!    `duplicate`);
//! 2. this device has no other upload in flight (`429`, with `Retry-After`:
//!    a device retrying before its first attempt was answered waits);
//! 3. the upload's bytes fit the global budget
//!    (`limits.uploads_in_memory_bytes`), charged at its declared length or,
//!    without one, the route's limit (`503 busy`, with `Retry-After`).
//!
//! The [`UploadTicket`] holds the device's place and the bytes until the
//! request is answered.
//!
//! **Admission before the body.** A body refused for the budget has been
//! sent anyway (HTTP/1.1 gives a client no way to stop once it started, and
//! the server must read it to keep the connection): at 10,000 devices that
//! was 1.5 times the round's real traffic, and for a large model a refused
//! device sends hundreds of megabytes for nothing. So a device first asks
//! `POST /v1/updates/admission` with its sealed length; [`UploadGate::reserve`]
//! runs the same checks and, when they pass, holds the ticket for
//! [`RESERVATION`] under the device's name. The upload that follows within it
//! takes the held ticket ([`UploadGate::admit`]) instead of asking the budget
//! again. A refused admission costs one small request; a reservation never
//! used gives its bytes back when it expires (swept whenever the budget
//! would refuse someone). Devices that do not ask are admitted as before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use qflare_store::{RoundState, Store};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::budget::{DeviceSlot, DeviceSlots, MemoryBudget};
use crate::error::{ApiError, ErrorCode};

/// Seconds a refused upload is told to wait before trying again.
const RETRY_AFTER_SECS: u64 = 2;

/// How long an admitted device's place and bytes wait for its upload.
pub const RESERVATION: Duration = Duration::from_secs(30);

/// See the module documentation.
#[derive(Debug)]
pub struct UploadGate {
    in_flight: DeviceSlots,
    budget: MemoryBudget,
    /// Tickets admitted ahead of their uploads, by device.
    reserved: Mutex<HashMap<String, Reservation>>,
}

#[derive(Debug)]
struct Reservation {
    ticket: UploadTicket,
    /// The sealed length admitted; a larger upload is admitted afresh.
    bytes: usize,
    expires: Instant,
}

/// One admitted upload: its device's place and its share of the budget,
/// both released when dropped.
#[derive(Debug)]
pub struct UploadTicket {
    /// Held, never read: dropping them gives the place and bytes back.
    _slot: DeviceSlot,
    _bytes: OwnedSemaphorePermit,
}

impl UploadGate {
    /// A gate holding at most `budget_bytes` of update bodies at once.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            in_flight: DeviceSlots::default(),
            budget: MemoryBudget::new(budget_bytes),
            reserved: Mutex::new(HashMap::new()),
        }
    }

    /// Admits an upload of `bytes` for round `round_id` from `device_id`
    /// ahead of its body and holds the ticket for [`RESERVATION`]; a
    /// device's earlier reservation is replaced. Answers as
    /// [`UploadGate::admit`] would, and `round_closed` for another round
    /// than the open one.
    pub async fn reserve(
        &self,
        store: &dyn Store,
        device_id: &str,
        round_id: u64,
        bytes: usize,
    ) -> Result<Duration, ApiError> {
        // An earlier reservation of this device holds its place; give it up
        // first so the new one can take it.
        drop(self.reservations().remove(device_id));
        if self.check_round(store, device_id).await? != round_id {
            return Err(
                ApiError::new(ErrorCode::RoundClosed).detail("that round is not the open one")
            );
        }
        let ticket = self.take_place_and_bytes(device_id, bytes)?;
        self.reservations().insert(
            device_id.to_owned(),
            Reservation {
                ticket,
                bytes,
                expires: Instant::now() + RESERVATION,
            },
        );
        Ok(RESERVATION)
    }

    fn reservations(&self) -> std::sync::MutexGuard<'_, HashMap<String, Reservation>> {
        // A panic while holding the lock leaves the map as it was: the
        // operations on it cannot be interrupted half-way.
        self.reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The device's unexpired reservation for at least `bytes`, taken out.
    fn take_reservation(&self, device_id: &str, bytes: usize) -> Option<UploadTicket> {
        let reservation = self.reservations().remove(device_id)?;
        (reservation.expires > Instant::now() && bytes <= reservation.bytes)
            .then_some(reservation.ticket)
    }

    /// Drops every expired reservation, giving back its place and bytes.
    fn sweep_expired(&self) {
        let now = Instant::now();
        self.reservations()
            .retain(|_, reservation| reservation.expires > now);
    }

    /// Moves every reservation's expiry `by` into the past (tests, which
    /// would otherwise wait out [`RESERVATION`]).
    #[cfg(test)]
    fn age_reservations(&self, by: Duration) {
        for reservation in self.reservations().values_mut() {
            if let Some(earlier) = reservation.expires.checked_sub(by) {
                reservation.expires = earlier;
            }
        }
    }

    /// Reservations held now.
    pub fn reserved(&self) -> usize {
        self.reservations().len()
    }

    /// Admits an upload of `bytes` (its declared length, or the route's
    /// limit) from `device_id`, or says why not; see the module
    /// documentation for the order of the checks. A reservation the device
    /// holds for at least `bytes` stands in for the place and the budget.
    pub async fn admit(
        &self,
        store: &dyn Store,
        device_id: &str,
        bytes: usize,
    ) -> Result<UploadTicket, ApiError> {
        self.check_round(store, device_id).await?;
        if let Some(ticket) = self.take_reservation(device_id, bytes) {
            return Ok(ticket);
        }
        self.take_place_and_bytes(device_id, bytes)
    }

    /// Check 1: a round is open and waits for this device; its id.
    async fn check_round(&self, store: &dyn Store, device_id: &str) -> Result<u64, ApiError> {
        let round = store
            .latest_round()
            .await?
            .filter(|round| round.state == RoundState::Open)
            .ok_or_else(|| ApiError::new(ErrorCode::RoundClosed))?;
        match store.participant_state(round.id, device_id).await? {
            None => return Err(ApiError::new(ErrorCode::NotSelected)),
            Some(participant) if participant.submitted_at.is_some() => {
                return Err(ApiError::new(ErrorCode::Duplicate));
            }
            Some(_) => {}
        }
        Ok(round.id)
    }

    /// Checks 2 and 3: the device's one place, and the bytes.
    fn take_place_and_bytes(
        &self,
        device_id: &str,
        bytes: usize,
    ) -> Result<UploadTicket, ApiError> {
        let Some(slot) = self.in_flight.take(device_id) else {
            return Err(ApiError::rate_limited(RETRY_AFTER_SECS)
                .detail("an upload from this device is already in progress"));
        };
        // A body larger than the whole budget is charged the whole budget:
        // it is admitted alone rather than never. Refused here, the slot
        // goes back as it is dropped.
        let permit = self.budget.try_take(bytes).or_else(|| {
            // Reservations nobody used may be what fills the budget.
            self.sweep_expired();
            self.budget.try_take(bytes)
        });
        let Some(bytes) = permit else {
            return Err(ApiError::new(ErrorCode::Busy)
                .detail("update uploads are using the memory budget")
                .retry_after(RETRY_AFTER_SECS));
        };
        Ok(UploadTicket {
            _slot: slot,
            _bytes: bytes,
        })
    }

    /// Devices with an upload in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use qflare_store::{DeviceKeys, NewDevice, RoundRecord, TokenRecord};

    use super::*;

    /// The budget's unit of account.
    const UNIT: usize = 1024;

    async fn enrolled(store: &Arc<dyn Store>, id: &str) {
        let hash = format!("hash-{id}");
        store
            .create_token(&TokenRecord {
                id: format!("token-{id}"),
                hash: hash.clone(),
                label: "test".into(),
                created_at: 0,
                expires_at: 1_000_000,
                used_at: None,
                used_by: None,
                revoked_at: None,
            })
            .await
            .unwrap();
        let keys = DeviceKeys {
            kem_suite: "ML-KEM-768".into(),
            kem_public_key: vec![1; 1184],
            signature_suite: "ML-DSA-65".into(),
            verifying_key: vec![2; 1952],
        };
        let device = NewDevice {
            id: id.into(),
            name: id.into(),
            keys,
        };
        store.enroll_with_token(&hash, 1, &device).await.unwrap();
    }

    /// Opens round 1 with devices `a` and `b` selected.
    async fn open_round_for_a_and_b(store: &Arc<dyn Store>) {
        let round = RoundRecord {
            id: 1,
            state: RoundState::Open,
            base_model_version: 0,
            config_json: "{}".into(),
            min_updates: 1,
            target_updates: 2,
            opened_at: 1,
            deadline: 1_000_000,
            closed_at: None,
            attempt: 1,
            outcome_json: None,
        };
        store
            .create_round(&round, &["a".into(), "b".into()])
            .await
            .unwrap();
    }

    fn code(result: Result<UploadTicket, ApiError>) -> &'static str {
        result.unwrap_err().code.as_str()
    }

    /// Every refusal an upload can get before its body is read, and that
    /// places and bytes come back when an upload ends.
    #[tokio::test]
    async fn uploads_are_admitted_only_for_awaited_devices_one_at_a_time_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let store = qflare_store::open(&url).await.unwrap();
        for id in ["a", "b", "outsider"] {
            enrolled(&store, id).await;
        }
        let gate = UploadGate::new(10 * UNIT);
        assert_eq!(
            code(gate.admit(store.as_ref(), "a", 1).await),
            "round_closed"
        );

        open_round_for_a_and_b(&store).await;
        assert_eq!(
            code(gate.admit(store.as_ref(), "outsider", 1).await),
            "not_selected"
        );

        let first = gate.admit(store.as_ref(), "a", 8 * UNIT).await.unwrap();
        // The same device again while its first upload is in flight.
        let second = gate.admit(store.as_ref(), "a", 1).await.unwrap_err();
        assert_eq!(second.code.as_str(), "rate_limited");
        // Another device, over what is left of the budget.
        let busy = gate.admit(store.as_ref(), "b", 8 * UNIT).await.unwrap_err();
        assert_eq!((busy.code.as_str(), busy.status().as_u16()), ("busy", 503));
        assert_eq!(gate.in_flight(), 1, "a refused upload holds no place");
        drop(first);
        assert_eq!(gate.in_flight(), 0);
        // Bytes and places are back; a body larger than the whole budget is
        // admitted alone rather than never.
        let whole = gate.admit(store.as_ref(), "b", 100 * UNIT).await.unwrap();
        assert_eq!(code(gate.admit(store.as_ref(), "a", 1).await), "busy");
        drop(whole);

        assert!(matches!(
            store.record_submission(1, "a", b"sealed", 2).await.unwrap(),
            qflare_store::SubmissionOutcome::Stored
        ));
        assert_eq!(code(gate.admit(store.as_ref(), "a", 1).await), "duplicate");
        assert!(gate.admit(store.as_ref(), "b", 1).await.is_ok());
    }

    /// An admission holds the device's place and bytes for its upload,
    /// which then needs nothing more from the budget; an unused one gives
    /// them back when it expires.
    #[tokio::test]
    async fn an_admission_holds_place_and_bytes_until_its_upload_or_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let store = qflare_store::open(&url).await.unwrap();
        for id in ["a", "b"] {
            enrolled(&store, id).await;
        }
        let gate = UploadGate::new(10 * UNIT);
        let err = gate
            .reserve(store.as_ref(), "a", 1, UNIT)
            .await
            .unwrap_err();
        assert_eq!(err.code.as_str(), "round_closed");
        open_round_for_a_and_b(&store).await;
        let err = gate
            .reserve(store.as_ref(), "a", 2, UNIT)
            .await
            .unwrap_err();
        assert_eq!(
            err.code.as_str(),
            "round_closed",
            "another round than the open one"
        );

        assert_eq!(
            gate.reserve(store.as_ref(), "a", 1, 8 * UNIT)
                .await
                .unwrap(),
            RESERVATION
        );
        assert_eq!((gate.reserved(), gate.in_flight()), (1, 1));
        // Asking again replaces the reservation rather than being refused
        // for the place the first one holds.
        gate.reserve(store.as_ref(), "a", 1, 8 * UNIT)
            .await
            .unwrap();
        assert_eq!((gate.reserved(), gate.in_flight()), (1, 1));
        // b finds the bytes taken.
        let busy = gate
            .reserve(store.as_ref(), "b", 1, 8 * UNIT)
            .await
            .unwrap_err();
        assert_eq!(busy.code.as_str(), "busy");
        assert_eq!(
            code(gate.admit(store.as_ref(), "b", 8 * UNIT).await),
            "busy"
        );
        // a's upload takes the held ticket: no second charge.
        let upload = gate.admit(store.as_ref(), "a", 8 * UNIT).await.unwrap();
        assert_eq!((gate.reserved(), gate.in_flight()), (0, 1));
        drop(upload);
        assert_eq!(gate.in_flight(), 0);

        // An admission never used: once it expires, its bytes serve others.
        gate.reserve(store.as_ref(), "a", 1, 8 * UNIT)
            .await
            .unwrap();
        assert_eq!(
            code(gate.admit(store.as_ref(), "b", 8 * UNIT).await),
            "busy"
        );
        gate.age_reservations(RESERVATION + Duration::from_secs(1));
        let b = gate.admit(store.as_ref(), "b", 8 * UNIT).await.unwrap();
        assert_eq!((gate.reserved(), gate.in_flight()), (0, 1));
        drop(b);
        // An expired or too small admission is not a ticket: the upload
        // is admitted afresh.
        gate.reserve(store.as_ref(), "a", 1, UNIT).await.unwrap();
        let larger = gate.admit(store.as_ref(), "a", 2 * UNIT).await.unwrap();
        assert_eq!((gate.reserved(), gate.in_flight()), (0, 1));
        drop(larger);
    }
}
