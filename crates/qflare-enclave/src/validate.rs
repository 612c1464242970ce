//! Validation of one opened update against its round: the checks that need
//! no other update.
//!
//! In order, cheapest first: round id, base model version, one update per
//! device, example count, tensor layout, and finally every value finite (a
//! pass over the data, fused with the norm the defense needs).

use std::fmt;

use qflare_protocol::identity::DeviceId;
use qflare_protocol::tensor::TensorMap;
use zeroize::Zeroize;

use crate::kernels::{chunks_beside, scan_chunk};
use crate::verdict::VerdictReason;

/// An update opened from its envelope, with the metadata the device signed.
///
/// Its tensors are zeroized when it is dropped: they are a device's private
/// training result.
pub struct CandidateUpdate {
    /// The device that signed it (verified before it gets here).
    pub device_id: DeviceId,
    /// The round the device made it for.
    pub round_id: u64,
    /// The global model version it was trained from.
    pub base_model_version: u64,
    /// How many examples the device trained on (the FedAvg weight).
    pub example_count: u64,
    /// Trained weights minus the global model, tensor by tensor.
    pub delta: TensorMap,
}

impl fmt::Debug for CandidateUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Metadata only: never the weights.
        f.debug_struct("CandidateUpdate")
            .field("device_id", &self.device_id)
            .field("round_id", &self.round_id)
            .field("base_model_version", &self.base_model_version)
            .field("example_count", &self.example_count)
            .field("parameters", &self.delta.num_parameters())
            .finish()
    }
}

impl Drop for CandidateUpdate {
    fn drop(&mut self) {
        zeroize_map(&mut self.delta);
    }
}

impl CandidateUpdate {
    /// Moves the tensors out into a zeroize-on-drop holder.
    pub(crate) fn take_delta(&mut self) -> Plaintext {
        Plaintext(std::mem::take(&mut self.delta))
    }
}

/// Overwrites every value with zero. `Tensor` owns exact-length vectors
/// (built by the safetensors decoder from exact-size iterators), so this
/// reaches all of the plaintext.
pub(crate) fn zeroize_map(map: &mut TensorMap) {
    for (_, tensor) in map.iter_mut() {
        tensor.data_mut().zeroize();
    }
}

/// A device update held by the aggregator; zeroized on drop.
pub(crate) struct Plaintext(pub(crate) TensorMap);

impl Drop for Plaintext {
    fn drop(&mut self) {
        zeroize_map(&mut self.0);
    }
}

/// What a round expects of every update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundExpectations {
    /// The round being aggregated.
    pub round_id: u64,
    /// The global model version the round distributed.
    pub base_model_version: u64,
    /// Largest accepted example count.
    pub max_example_count: u64,
}

impl RoundExpectations {
    /// The metadata checks. `already_submitted` says whether the device has
    /// an update in this round already (the caller keeps that set).
    ///
    /// The round and version come first, so that a replayed update of another
    /// round is reported as such and does not use up the device's one
    /// submission in this round.
    pub fn check_metadata(
        &self,
        update: &CandidateUpdate,
        already_submitted: bool,
    ) -> Result<(), VerdictReason> {
        if update.round_id != self.round_id {
            return Err(VerdictReason::WrongRound);
        }
        if update.base_model_version != self.base_model_version {
            return Err(VerdictReason::WrongModelVersion);
        }
        if already_submitted {
            return Err(VerdictReason::Duplicate);
        }
        if update.example_count == 0 || update.example_count > self.max_example_count {
            return Err(VerdictReason::BadExampleCount);
        }
        Ok(())
    }
}

/// Tensor names and shapes must equal the global model's.
pub fn check_layout(delta: &TensorMap, global: &TensorMap) -> Result<(), VerdictReason> {
    if delta.same_layout(global) {
        Ok(())
    } else {
        Err(VerdictReason::WrongShape)
    }
}

/// Norm and dot products of an update, from one pass over its values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateScan {
    /// ‖Δ‖².
    pub norm_sq: f64,
    /// Δ · a, for the first reference passed (0 when none).
    pub dot_a: f64,
    /// Δ · b, for the second reference passed (0 when none).
    pub dot_b: f64,
}

impl UpdateScan {
    /// ‖Δ‖.
    pub fn norm(&self) -> f64 {
        self.norm_sq.sqrt()
    }

    pub(crate) fn add(&mut self, chunk: [f64; 3]) {
        self.norm_sq += chunk[0];
        self.dot_a += chunk[1];
        self.dot_b += chunk[2];
    }
}

/// Checks that every value is finite and computes the norm, plus dot
/// products with up to two references of the same layout (the caller has
/// checked the layouts). `Err(NonFinite)` on the first NaN or infinity.
pub fn scan_update(
    delta: &TensorMap,
    a: Option<&TensorMap>,
    b: Option<&TensorMap>,
) -> Result<UpdateScan, VerdictReason> {
    let mut scan = UpdateScan {
        norm_sq: 0.0,
        dot_a: 0.0,
        dot_b: 0.0,
    };
    for chunk in chunks_beside(delta, a, b) {
        let sums = scan_chunk(chunk.values, chunk.a, chunk.b).ok_or(VerdictReason::NonFinite)?;
        scan.add(sums);
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qflare_protocol::tensor::Tensor;

    fn map(values: &[f32]) -> TensorMap {
        let mut m = TensorMap::new();
        m.insert(
            "w",
            Tensor::new(vec![values.len()], values.to_vec()).unwrap(),
        )
        .unwrap();
        m
    }

    #[test]
    fn metadata_checks_in_order() {
        let expect = RoundExpectations {
            round_id: 5,
            base_model_version: 4,
            max_example_count: 100,
        };
        let mut update = CandidateUpdate {
            device_id: DeviceId::from_bytes([1; 16]),
            round_id: 4,
            base_model_version: 3,
            example_count: 0,
            delta: map(&[1.0]),
        };
        assert_eq!(
            expect.check_metadata(&update, true),
            Err(VerdictReason::WrongRound)
        );
        update.round_id = 5;
        assert_eq!(
            expect.check_metadata(&update, true),
            Err(VerdictReason::WrongModelVersion)
        );
        update.base_model_version = 4;
        assert_eq!(
            expect.check_metadata(&update, true),
            Err(VerdictReason::Duplicate)
        );
        assert_eq!(
            expect.check_metadata(&update, false),
            Err(VerdictReason::BadExampleCount)
        );
        update.example_count = 101;
        assert_eq!(
            expect.check_metadata(&update, false),
            Err(VerdictReason::BadExampleCount)
        );
        update.example_count = 100;
        assert_eq!(expect.check_metadata(&update, false), Ok(()));
        assert!(!format!("{update:?}").contains("1.0"));
    }

    #[test]
    fn scan_finds_non_finite_and_computes_dots() {
        let x = map(&[3.0, 4.0]);
        let r = map(&[1.0, 2.0]);
        let scan = scan_update(&x, Some(&r), Some(&x)).unwrap();
        assert_eq!(scan.norm(), 5.0);
        assert_eq!(scan.dot_a, 11.0);
        assert_eq!(scan.dot_b, 25.0);
        assert_eq!(
            scan_update(&map(&[1.0, f32::INFINITY]), None, None),
            Err(VerdictReason::NonFinite)
        );
        assert_eq!(
            check_layout(&x, &map(&[1.0])),
            Err(VerdictReason::WrongShape)
        );
    }

    #[test]
    fn plaintext_is_zeroized_on_drop_path() {
        let mut update = CandidateUpdate {
            device_id: DeviceId::from_bytes([2; 16]),
            round_id: 1,
            base_model_version: 0,
            example_count: 1,
            delta: map(&[7.0, 8.0]),
        };
        let mut held = update.take_delta();
        assert!(update.delta.is_empty());
        zeroize_map(&mut held.0);
        assert_eq!(held.0.to_flat(), vec![0.0, 0.0]);
    }
}
