//! Hardware TEE backends: the same enclave process run inside an AMD SEV-SNP
//! or Intel TDX confidential VM or an AWS Nitro Enclave, attaching its TEE's
//! evidence to every report.
//!
//! [`HardwareBackend`] keeps this boot's [`BootKeys`] as the software backend
//! does (in a confidential VM or Nitro Enclave the process's memory is the
//! TEE's) and adds an [`EvidenceSource`]: for each report it computes the
//! report data — [`attestation::evidence_binding`] over the mode, both public
//! keys, the requester's nonce and the runtime — and asks the TEE to sign it.
//! Devices recompute that commitment from the report they hold, so the
//! evidence cannot be replayed for other keys or another request.
//!
//! | `--tee`   | cargo feature | where the evidence comes from                      | what the sandbox lets through afterwards |
//! |-----------|---------------|----------------------------------------------------|------------------------------------------|
//! | `sev-snp` | `sev-snp`     | `/dev/sev-guest` (the `sev` crate's guest API)      | the two report ioctls                    |
//! | `tdx`     | `tdx`         | configfs-tsm, through a helper process ([`tsm`])    | nothing new (pipes)                      |
//! | `nitro`   | `nitro`       | `/dev/nsm` (AWS's `aws-nitro-enclaves-nsm-api`)     | the NSM ioctl, on that descriptor only   |
//!
//! All three are built by default (they add two small crates); a build
//! without them answers `--tee` with which feature it lacks. Devices are
//! opened before the sandbox closes; configfs-tsm wants a directory made,
//! written, read and removed per request, which the enclave's own sandbox
//! cannot allow without letting it open files, hence the helper.
//!
//! Start-up asks the TEE once, so a missing or misconfigured TEE stops the
//! process with a message before it serves anything, and reads the launch
//! measurement from that first evidence (reports state it; verifiers hold it
//! to the value the hardware signed).

use std::path::PathBuf;
use std::sync::Mutex;

use qflare_protocol::attestation::hardware::{self, AttestError, Evidence, TeeKind};
use qflare_protocol::attestation::{
    self, AttestationMode, AttestationReport, EnclaveRuntime, MEASUREMENT_LEN, ReportBody,
};
use qflare_protocol::envelope::{OpenedUpdate, UpdateEnvelope};
use qflare_protocol::kem::KemPublicKey;
use qflare_protocol::model::ModelCertificate;
use qflare_protocol::sig::VerifyingKey;
use qflare_protocol::{KemSuite, ProtocolError, SignatureSuite};
use rand_core::CryptoRng;

use crate::backend::{BootKeys, EnclaveBackend};
use crate::sandbox::DeviceIoctl;

#[cfg(feature = "nitro")]
mod nitro;
#[cfg(feature = "sev-snp")]
mod sev_snp;
#[cfg(feature = "tdx")]
pub mod tsm;

/// Length of the report data every TEE signs.
pub const REPORT_DATA_LEN: usize = hardware::REPORT_DATA_LEN;

/// Where the kernel's configfs-tsm report interface is mounted.
pub const DEFAULT_TSM_ROOT: &str = "/sys/kernel/config/tsm/report";

/// What `--tee` and its companion options asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeeOptions {
    /// The TEE the process runs in.
    pub kind: TeeKind,
    /// SEV-SNP: the VCEK certificate (DER or PEM) for this chip and TCB,
    /// when the host does not supply it in the extended report.
    pub vcek: Option<PathBuf>,
    /// TDX: Intel's collateral for this platform (the JSON a PCCS serves,
    /// as `qflare attest verify` reads it), which travels with every quote
    /// so that verifiers need no network.
    pub tdx_collateral: Option<PathBuf>,
    /// TDX: the configfs-tsm report directory.
    pub tsm_root: PathBuf,
}

impl TeeOptions {
    /// Options for `kind` with every path at its default.
    pub fn new(kind: TeeKind) -> Self {
        Self {
            kind,
            vcek: None,
            tdx_collateral: None,
            tsm_root: PathBuf::from(DEFAULT_TSM_ROOT),
        }
    }
}

/// Why a TEE gave no evidence.
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    /// `--tee` named a kind this build has no code for.
    #[error("this qflare-enclave was built without {0} support (cargo feature `{0}`)")]
    NotBuilt(TeeKind),
    /// The TEE's device or interface refused or is missing.
    #[error("{kind}: {message}")]
    Device {
        /// Which TEE.
        kind: TeeKind,
        /// What failed, with the path or request involved.
        message: String,
    },
    /// The TEE answered with something QFLARE cannot use.
    #[error("{kind}: unusable evidence: {source}")]
    Evidence {
        /// Which TEE.
        kind: TeeKind,
        /// What is wrong with it.
        source: AttestError,
    },
    /// Generating this boot's keys failed.
    #[error("generating the enclave keys: {0}")]
    Keys(ProtocolError),
}

impl TeeError {
    pub(crate) fn device(kind: TeeKind, message: impl std::fmt::Display) -> Self {
        Self::Device {
            kind,
            message: message.to_string(),
        }
    }
}

/// One TEE's way of producing signed evidence.
pub trait EvidenceSource: Send {
    /// Which TEE this is.
    fn kind(&self) -> TeeKind;
    /// Evidence whose report data is `report_data`, with what a verifier
    /// needs beside it (the VCEK, Intel's collateral).
    fn evidence(&mut self, report_data: &[u8; REPORT_DATA_LEN]) -> Result<Evidence, TeeError>;
    /// The device requests the sandbox must still allow once it is closed.
    fn device_ioctls(&self) -> Vec<DeviceIoctl>;
}

/// Opens the evidence source `options` name. Runs before the sandbox
/// closes: it opens devices, reads files and may start the TSM helper,
/// which it launches as `helper_program helper_args... tsm-report ...`.
pub fn open_source(
    options: &TeeOptions,
    helper: &HelperCommand,
) -> Result<Box<dyn EvidenceSource>, TeeError> {
    // Without every feature some arguments go unused.
    let _ = helper;
    match options.kind {
        #[cfg(feature = "sev-snp")]
        TeeKind::SevSnp => Ok(Box::new(sev_snp::SnpSource::open(options)?)),
        #[cfg(feature = "tdx")]
        TeeKind::Tdx => Ok(Box::new(tsm::TdxSource::open(options, helper)?)),
        #[cfg(feature = "nitro")]
        TeeKind::Nitro => Ok(Box::new(nitro::NitroSource::open()?)),
        #[allow(unreachable_patterns)]
        kind => Err(TeeError::NotBuilt(kind)),
    }
}

/// How to start this executable again as a helper: the program and the
/// arguments that lead to the enclave's own command line (empty for
/// `qflare-enclave`, `["enclave"]` for `qflare enclave`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperCommand {
    /// This executable.
    pub program: PathBuf,
    /// Arguments before the enclave's own.
    pub prefix: Vec<String>,
}

/// The hardware backend: [`BootKeys`] plus an [`EvidenceSource`].
pub struct HardwareBackend {
    keys: BootKeys,
    runtime: EnclaveRuntime,
    mode: AttestationMode,
    measurement: [u8; MEASUREMENT_LEN],
    // `attest` takes `&self`; the request loop is single-threaded, so the
    // lock is never contended.
    source: Mutex<Box<dyn EvidenceSource>>,
}

impl std::fmt::Debug for HardwareBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HardwareBackend")
            .field("mode", &self.mode)
            .field("measurement", &hex::encode(self.measurement))
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl HardwareBackend {
    /// Generates this boot's keys and asks `source` for a first piece of
    /// evidence bound to them, which proves the TEE answers and gives the
    /// launch measurement.
    pub fn start<R: CryptoRng + ?Sized>(
        mut source: Box<dyn EvidenceSource>,
        kem_suite: KemSuite,
        signature_suite: SignatureSuite,
        rng: &mut R,
    ) -> Result<Self, TeeError> {
        let keys = BootKeys::generate(kem_suite, signature_suite, rng).map_err(TeeError::Keys)?;
        let mode = AttestationMode::of_tee(source.kind());
        let runtime = EnclaveRuntime::unhardened();
        let binding = attestation::evidence_binding(
            mode,
            keys.kem_public_key(),
            keys.verifying_key(),
            &[0; 32],
            Some(&runtime),
        );
        let evidence = bound_evidence(source.as_mut(), &binding)?;
        let measurement =
            evidence
                .claimed_measurement()
                .map_err(|source_error| TeeError::Evidence {
                    kind: evidence.kind(),
                    source: source_error,
                })?;
        Ok(Self {
            keys,
            runtime,
            mode,
            measurement,
            source: Mutex::new(source),
        })
    }

    /// The ioctls the sandbox must allow for this backend's TEE.
    pub fn device_ioctls(&self) -> Vec<DeviceIoctl> {
        self.source
            .lock()
            .map(|source| source.device_ioctls())
            .unwrap_or_default()
    }
}

/// Asks `source` for evidence and checks that it carries `binding`: a TEE
/// (or helper) answering for other report data would make every report this
/// enclave sends fail at the device, so it is refused here, at its cause.
fn bound_evidence(
    source: &mut dyn EvidenceSource,
    binding: &[u8; REPORT_DATA_LEN],
) -> Result<Evidence, TeeError> {
    let kind = source.kind();
    let evidence = source.evidence(binding)?;
    if evidence.kind() != kind {
        return Err(TeeError::device(
            kind,
            format!("answered with {} evidence", evidence.kind()),
        ));
    }
    let evidence_error = |source| TeeError::Evidence { kind, source };
    let claimed = evidence.claimed_report_data().map_err(evidence_error)?;
    if claimed != *binding {
        return Err(evidence_error(AttestError::BindingMismatch));
    }
    Ok(evidence)
}

impl EnclaveBackend for HardwareBackend {
    fn mode(&self) -> AttestationMode {
        self.mode
    }

    fn measurement(&self) -> [u8; MEASUREMENT_LEN] {
        self.measurement
    }

    fn kem_public_key(&self) -> &KemPublicKey {
        self.keys.kem_public_key()
    }

    fn verifying_key(&self) -> &VerifyingKey {
        self.keys.verifying_key()
    }

    fn set_runtime(&mut self, runtime: EnclaveRuntime) {
        self.runtime = runtime;
    }

    fn attest(&self, nonce: [u8; 32], now: u64) -> Result<AttestationReport, ProtocolError> {
        let binding = attestation::evidence_binding(
            self.mode,
            self.keys.kem_public_key(),
            self.keys.verifying_key(),
            &nonce,
            Some(&self.runtime),
        );
        let mut source = self
            .source
            .lock()
            .map_err(|_| ProtocolError::Backend("the TEE evidence source failed earlier"))?;
        let evidence = bound_evidence(source.as_mut(), &binding).map_err(|err| {
            tracing::error!(%err, "the TEE gave no evidence");
            ProtocolError::Backend("the TEE gave no evidence")
        })?;
        self.keys.sign_report(&ReportBody {
            mode: self.mode,
            measurement: self.measurement,
            kem_public_key: self.keys.kem_public_key().clone(),
            verifying_key: self.keys.verifying_key().clone(),
            nonce,
            issued_at: now,
            evidence: evidence.to_bytes(),
            runtime: Some(self.runtime.clone()),
        })
    }

    fn open(
        &self,
        envelope: &UpdateEnvelope,
        device_key: &VerifyingKey,
    ) -> Result<OpenedUpdate, ProtocolError> {
        self.keys.open(envelope, device_key)
    }

    fn certify(
        &self,
        architecture: &str,
        model_version: u64,
        round_id: u64,
        model: &[u8],
    ) -> Result<ModelCertificate, ProtocolError> {
        self.keys
            .certify(architecture, model_version, round_id, model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers with published evidence from real hardware, whatever it is
    /// asked: what a TEE (or a tampered helper) answering for other report
    /// data looks like to the backend.
    struct Replaying(Evidence);

    impl EvidenceSource for Replaying {
        fn kind(&self) -> TeeKind {
            self.0.kind()
        }
        fn evidence(&mut self, _: &[u8; REPORT_DATA_LEN]) -> Result<Evidence, TeeError> {
            Ok(self.0.clone())
        }
        fn device_ioctls(&self) -> Vec<DeviceIoctl> {
            Vec::new()
        }
    }

    #[test]
    fn evidence_for_other_report_data_stops_the_start() {
        let Some(root) = std::env::var_os("QFLARE_VECTORS_DIR") else {
            let required = std::env::var("QFLARE_REQUIRE_VECTORS").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "QFLARE_REQUIRE_VECTORS=1 but QFLARE_VECTORS_DIR is not set"
            );
            eprintln!("SKIP: QFLARE_VECTORS_DIR is not set");
            return;
        };
        let document = std::fs::read(
            PathBuf::from(root).join("attestation/nitro/beta-valid-attestation-doc-bytes"),
        )
        .expect("the published Nitro document");
        let source = Box::new(Replaying(Evidence::Nitro(hardware::NitroEvidence {
            document,
        })));
        let started = HardwareBackend::start(
            source,
            KemSuite::MlKem768,
            SignatureSuite::MlDsa65,
            &mut rand::rng(),
        );
        assert!(
            matches!(
                started,
                Err(TeeError::Evidence {
                    kind: TeeKind::Nitro,
                    source: AttestError::BindingMismatch
                })
            ),
            "{started:?}"
        );
    }

    #[test]
    fn a_build_names_what_it_lacks() {
        assert_eq!(
            TeeError::NotBuilt(TeeKind::Tdx).to_string(),
            "this qflare-enclave was built without tdx support (cargo feature `tdx`)"
        );
    }
}
