//! A round's inputs: [`RoundSpec`], as the caller hands it over, and the
//! reference directions (previous global update, FLTrust's trusted update)
//! that [`RoundAggregator::new`](super::RoundAggregator::new) checks out of
//! it for the streaming and buffered modes to compare against.

use qflare_protocol::tensor::TensorMap;

use super::Layout;
use crate::config::AggregationConfig;
use crate::error::{ConfigError, Result};
use crate::validate::scan_update;

/// Everything a round needs, handed over by the caller (the enclave's frame
/// protocol).
#[derive(Debug)]
pub struct RoundSpec {
    /// The round being aggregated.
    pub round_id: u64,
    /// The version of `global`; updates must have been trained from it.
    pub base_model_version: u64,
    /// The global model the devices started from.
    pub global: TensorMap,
    /// The previous round's aggregated update (the last change to the global
    /// model), if there was one: a reference direction for the defense.
    pub previous_global_update: Option<TensorMap>,
    /// FLTrust's root-of-trust update g₀, trained by the server on a small
    /// clean data set from `global`. Required by FLTrust, ignored otherwise.
    pub trusted_reference: Option<TensorMap>,
    /// The settings.
    pub config: AggregationConfig,
    /// Under central DP (`config.privacy`), the fixed denominator: the
    /// sampling rate times the devices it was applied to. Required then,
    /// ignored otherwise.
    pub expected_participants: Option<f64>,
}

/// A reference direction and its norm, checked against the round's layout.
pub(super) struct Reference {
    pub(super) map: TensorMap,
    pub(super) norm: f64,
}

/// `map` as a reference, or why it cannot be one (another layout, not finite).
pub(super) fn check_reference(
    map: TensorMap,
    layout: &Layout,
    what: &'static str,
) -> Result<Reference, ConfigError> {
    if !layout.matches(&map) {
        return Err(ConfigError::ReferenceLayout { what });
    }
    let norm = scan_update(&map, None, None)
        .map_err(|_| ConfigError::ReferenceNonFinite { what })?
        .norm();
    Ok(Reference { map, norm })
}
