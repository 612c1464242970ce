//! What a verifier accepts: per TEE kind, the measurements it trusts and the
//! lowest security versions it tolerates. A kind with no policy is refused,
//! and an empty allow-list trusts nothing, so a policy has to name what it
//! trusts. Debug-mode guests are refused for every kind with no knob to
//! allow them: a debuggable enclave's memory is readable by its host.
//!
//! The structures deserialize from the YAML or JSON an operator writes
//! (measurements as 96 hex characters) and refuse unknown keys.

use serde::{Deserialize, Serialize};

use crate::MEASUREMENT_LEN;
use crate::evidence::TeeKind;

/// A 48-byte measurement written as 96 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest48(pub [u8; MEASUREMENT_LEN]);

impl std::fmt::Debug for Digest48 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Display for Digest48 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for Digest48 {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let mut out = [0u8; MEASUREMENT_LEN];
        hex::decode_to_slice(text.trim(), &mut out).map_err(|_| {
            format!(
                "expected {} hex characters (a SHA-384 measurement), got {text:?}",
                2 * MEASUREMENT_LEN
            )
        })?;
        Ok(Self(out))
    }
}

impl Serialize for Digest48 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Digest48 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which TEE kinds are accepted, and on what terms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwarePolicy {
    /// AMD SEV-SNP; absent refuses SNP evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sev_snp: Option<SevSnpPolicy>,
    /// Intel TDX; absent refuses TDX evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tdx: Option<TdxPolicy>,
    /// AWS Nitro Enclaves; absent refuses Nitro evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nitro: Option<NitroPolicy>,
}

impl HardwarePolicy {
    /// The first kind this policy accepts whose measurement allow-list is
    /// empty (so that no evidence of it can pass): a configuration mistake.
    pub fn first_trusting_nothing(&self) -> Option<TeeKind> {
        [
            (
                TeeKind::SevSnp,
                self.sev_snp.as_ref().map(|p| p.measurements.is_empty()),
            ),
            (TeeKind::Tdx, self.tdx.as_ref().map(|p| p.mr_td.is_empty())),
            (
                TeeKind::Nitro,
                self.nitro.as_ref().map(|p| p.pcr0.is_empty()),
            ),
        ]
        .into_iter()
        .find_map(|(kind, empty)| empty.unwrap_or(false).then_some(kind))
    }

    /// Whether evidence of `kind` can be accepted at all.
    pub const fn accepts(&self, kind: TeeKind) -> bool {
        match kind {
            TeeKind::SevSnp => self.sev_snp.is_some(),
            TeeKind::Tdx => self.tdx.is_some(),
            TeeKind::Nitro => self.nitro.is_some(),
        }
    }
}

/// The AMD EPYC generations whose roots are built in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnpProduct {
    /// EPYC 7003.
    Milan,
    /// EPYC 9004.
    Genoa,
    /// EPYC 9005.
    Turin,
}

impl SnpProduct {
    /// Every product, oldest first.
    pub const ALL: [Self; 3] = [Self::Milan, Self::Genoa, Self::Turin];

    /// AMD's name for the generation.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Milan => "Milan",
            Self::Genoa => "Genoa",
            Self::Turin => "Turin",
        }
    }
}

/// Lowest acceptable security patch levels of an SNP platform, compared
/// field by field with the report's `REPORTED_TCB` (which the VCEK was
/// derived for, so it is what the signature vouches for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpTcbFloor {
    /// PSP bootloader SVN.
    #[serde(default)]
    pub bootloader: u8,
    /// PSP OS (TEE) SVN.
    #[serde(default)]
    pub tee: u8,
    /// SNP firmware SVN.
    #[serde(default)]
    pub snp: u8,
    /// Microcode patch level.
    #[serde(default)]
    pub microcode: u8,
    /// FMC SVN (Turin and later; ignored for earlier products).
    #[serde(default)]
    pub fmc: u8,
}

/// Rules for AMD SEV-SNP reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevSnpPolicy {
    /// Launch measurements (`MEASUREMENT`) that are trusted.
    pub measurements: Vec<Digest48>,
    /// Generations whose VCEKs are accepted; all built-in ones by default.
    #[serde(default = "all_snp_products")]
    pub products: Vec<SnpProduct>,
    /// Lowest acceptable `REPORTED_TCB`.
    #[serde(default)]
    pub min_tcb: SnpTcbFloor,
    /// Lowest acceptable guest SVN (set by the guest's ID block).
    #[serde(default)]
    pub min_guest_svn: u32,
    /// Accept guests whose policy allows a migration agent (which can move
    /// the guest's memory to another machine). Off by default.
    #[serde(default)]
    pub allow_migration_agent: bool,
}

fn all_snp_products() -> Vec<SnpProduct> {
    SnpProduct::ALL.to_vec()
}

impl SevSnpPolicy {
    /// Trusts `measurements` on any built-in product, any TCB.
    pub fn trusting(measurements: Vec<Digest48>) -> Self {
        Self {
            measurements,
            products: all_snp_products(),
            min_tcb: SnpTcbFloor::default(),
            min_guest_svn: 0,
            allow_migration_agent: false,
        }
    }
}

/// Rules for Intel TDX quotes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TdxPolicy {
    /// TD firmware measurements (`MRTD`) that are trusted.
    pub mr_td: Vec<Digest48>,
    /// Allowed `RTMR0`..`RTMR3` values, each list empty for "any". The
    /// kernel, its command line and the workload are extended into these,
    /// so a deployment that pins its workload lists them.
    #[serde(default)]
    pub rtmr: [Vec<Digest48>; 4],
    /// TCB statuses accepted (Intel's words: `UpToDate`, `SWHardeningNeeded`,
    /// `ConfigurationNeeded`, `ConfigurationAndSWHardeningNeeded`,
    /// `OutOfDate`, ...). `UpToDate` only by default.
    #[serde(default = "up_to_date_only")]
    pub accepted_tcb_statuses: Vec<String>,
}

fn up_to_date_only() -> Vec<String> {
    vec!["UpToDate".to_owned()]
}

impl TdxPolicy {
    /// Trusts `mr_td` with any RTMRs, up-to-date platforms only.
    pub fn trusting(mr_td: Vec<Digest48>) -> Self {
        Self {
            mr_td,
            rtmr: Default::default(),
            accepted_tcb_statuses: up_to_date_only(),
        }
    }
}

/// Rules for AWS Nitro Enclaves attestation documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NitroPolicy {
    /// Enclave image measurements (`PCR0`) that are trusted.
    pub pcr0: Vec<Digest48>,
    /// Allowed `PCR1` (kernel and boot ramfs); empty for any.
    #[serde(default)]
    pub pcr1: Vec<Digest48>,
    /// Allowed `PCR2` (the application); empty for any.
    #[serde(default)]
    pub pcr2: Vec<Digest48>,
}

impl NitroPolicy {
    /// Trusts `pcr0`, any `PCR1`/`PCR2`.
    pub fn trusting(pcr0: Vec<Digest48>) -> Self {
        Self {
            pcr0,
            pcr1: Vec::new(),
            pcr2: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_read_from_what_an_operator_writes() {
        let measurement = "ab".repeat(48);
        let json = format!(
            r#"{{"sev_snp": {{"measurements": ["{measurement}"], "min_tcb": {{"snp": 8}}}},
                "nitro": {{"pcr0": ["{measurement}"]}}}}"#
        );
        let policy: HardwarePolicy = serde_json::from_str(&json).unwrap();
        let snp = policy.sev_snp.unwrap();
        assert_eq!(snp.measurements, vec![Digest48([0xab; 48])]);
        assert_eq!(snp.products, SnpProduct::ALL.to_vec());
        assert_eq!(snp.min_tcb.snp, 8);
        assert!(!snp.allow_migration_agent);
        assert!(policy.tdx.is_none());
        assert!(policy.nitro.unwrap().pcr1.is_empty());

        let tdx: TdxPolicy =
            serde_json::from_str(&format!(r#"{{"mr_td": ["{measurement}"]}}"#)).unwrap();
        assert_eq!(tdx.accepted_tcb_statuses, ["UpToDate"]);

        for bad in [
            r#"{"nitro": {"pcr0": ["abcd"]}}"#.to_owned(),
            format!(r#"{{"nitro": {{"pcr0": ["{measurement}"], "debug": true}}}}"#),
            r#"{"sgx": {}}"#.to_owned(),
        ] {
            assert!(
                serde_json::from_str::<HardwarePolicy>(&bad).is_err(),
                "{bad}"
            );
        }
    }
}
