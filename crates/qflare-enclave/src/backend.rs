//! Where the enclave's keys live and how it proves what it is.
//!
//! [`EnclaveBackend`] is the seam for hardware: everything that touches the
//! per-boot private keys — producing attestation reports, opening sealed
//! update envelopes, certifying models — goes through it, so an SGX, TDX,
//! SEV-SNP or Nitro backend can keep the keys inside the TEE and add its
//! quote as report `evidence` without the frame protocol or the host
//! changing. Both implementations keep this boot's [`BootKeys`] in process
//! memory (zeroized on drop):
//! - [`SoftwareBackend`], a hardened OS process: measurement = SHA-384 of its
//!   own executable, self-signed reports in mode `software`;
//! - [`crate::tee::HardwareBackend`], the same process inside a confidential
//!   VM or Nitro Enclave: each report also carries the TEE's evidence, whose
//!   report data commits to the keys, the nonce and the runtime.

use qflare_protocol::attestation::{
    self, AttestationMode, AttestationReport, EnclaveRuntime, MEASUREMENT_LEN, ReportBody,
};
use qflare_protocol::envelope::{self, OpenedUpdate, UpdateEnvelope};
use qflare_protocol::kem::{KemKeyPair, KemPublicKey};
use qflare_protocol::model::{self, ModelCertificate};
use qflare_protocol::sig::{SigningKey, VerifyingKey};
use qflare_protocol::{KemSuite, ProtocolError, SignatureSuite};
use rand_core::CryptoRng;

/// Key custody and attestation.
pub trait EnclaveBackend: Send {
    /// How isolated this enclave is.
    fn mode(&self) -> AttestationMode;
    /// SHA-384 of the enclave's code (software), or the launch measurement
    /// its hardware signs (SEV-SNP `MEASUREMENT`, TDX `MRTD`, Nitro `PCR0`).
    fn measurement(&self) -> [u8; MEASUREMENT_LEN];
    /// The key devices seal updates to.
    fn kem_public_key(&self) -> &KemPublicKey;
    /// The key reports and certificates verify under.
    fn verifying_key(&self) -> &VerifyingKey;
    /// Sets what every later report says about the process's arguments
    /// and hardening; until then reports say it is unhardened. The process
    /// calls this once, after its sandbox is closed.
    fn set_runtime(&mut self, runtime: EnclaveRuntime);
    /// A signed report binding measurement, keys, `nonce` and `now`.
    fn attest(&self, nonce: [u8; 32], now: u64) -> Result<AttestationReport, ProtocolError>;
    /// Opens an envelope sealed to this enclave and checks both device signatures.
    fn open(
        &self,
        envelope: &UpdateEnvelope,
        device_key: &VerifyingKey,
    ) -> Result<OpenedUpdate, ProtocolError>;
    /// Signs a certificate for a model this enclave produced.
    fn certify(
        &self,
        architecture: &str,
        model_version: u64,
        round_id: u64,
        model: &[u8],
    ) -> Result<ModelCertificate, ProtocolError>;
}

/// The process chooses its backend at start (`--tee`), so it serves a boxed one.
impl<B: EnclaveBackend + ?Sized> EnclaveBackend for Box<B> {
    fn mode(&self) -> AttestationMode {
        (**self).mode()
    }
    fn measurement(&self) -> [u8; MEASUREMENT_LEN] {
        (**self).measurement()
    }
    fn kem_public_key(&self) -> &KemPublicKey {
        (**self).kem_public_key()
    }
    fn verifying_key(&self) -> &VerifyingKey {
        (**self).verifying_key()
    }
    fn set_runtime(&mut self, runtime: EnclaveRuntime) {
        (**self).set_runtime(runtime);
    }
    fn attest(&self, nonce: [u8; 32], now: u64) -> Result<AttestationReport, ProtocolError> {
        (**self).attest(nonce, now)
    }
    fn open(
        &self,
        envelope: &UpdateEnvelope,
        device_key: &VerifyingKey,
    ) -> Result<OpenedUpdate, ProtocolError> {
        (**self).open(envelope, device_key)
    }
    fn certify(
        &self,
        architecture: &str,
        model_version: u64,
        round_id: u64,
        model: &[u8],
    ) -> Result<ModelCertificate, ProtocolError> {
        (**self).certify(architecture, model_version, round_id, model)
    }
}

/// This boot's key pairs, whichever backend attests them: generated in the
/// process at start, zeroized on drop, never leaving it. In a confidential
/// VM or Nitro Enclave the process's memory is the TEE's, which is what
/// protects them from the host there.
pub struct BootKeys {
    kem: KemKeyPair,
    signing: SigningKey,
}

impl BootKeys {
    /// Generates both key pairs.
    pub fn generate<R: CryptoRng + ?Sized>(
        kem_suite: KemSuite,
        signature_suite: SignatureSuite,
        rng: &mut R,
    ) -> Result<Self, ProtocolError> {
        Ok(Self {
            kem: KemKeyPair::generate(kem_suite, rng)?,
            signing: SigningKey::generate(signature_suite, rng)?,
        })
    }

    /// The key devices seal updates to.
    pub fn kem_public_key(&self) -> &KemPublicKey {
        &self.kem.public
    }

    /// The key reports and certificates verify under.
    pub fn verifying_key(&self) -> &VerifyingKey {
        self.signing.verifying_key()
    }

    /// Signs a report about these keys; `body` must name them.
    pub fn sign_report(&self, body: &ReportBody) -> Result<AttestationReport, ProtocolError> {
        attestation::sign_report(body, &self.signing)
    }

    /// See [`EnclaveBackend::open`].
    pub fn open(
        &self,
        envelope: &UpdateEnvelope,
        device_key: &VerifyingKey,
    ) -> Result<OpenedUpdate, ProtocolError> {
        envelope::open(envelope, &self.kem.secret, &self.kem.public, device_key)
    }

    /// See [`EnclaveBackend::certify`].
    pub fn certify(
        &self,
        architecture: &str,
        model_version: u64,
        round_id: u64,
        model: &[u8],
    ) -> Result<ModelCertificate, ProtocolError> {
        model::certify(architecture, model_version, round_id, model, &self.signing)
    }
}

impl std::fmt::Debug for BootKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootKeys")
            .field("kem", &self.kem.public)
            .field("verifying_key", self.signing.verifying_key())
            .finish_non_exhaustive()
    }
}

/// The software backend: a hardened process, self-signed reports.
#[derive(Debug)]
pub struct SoftwareBackend {
    measurement: [u8; MEASUREMENT_LEN],
    keys: BootKeys,
    runtime: EnclaveRuntime,
}

impl SoftwareBackend {
    /// Generates this boot's key pairs.
    pub fn new<R: CryptoRng + ?Sized>(
        measurement: [u8; MEASUREMENT_LEN],
        kem_suite: KemSuite,
        signature_suite: SignatureSuite,
        rng: &mut R,
    ) -> Result<Self, ProtocolError> {
        Ok(Self {
            measurement,
            keys: BootKeys::generate(kem_suite, signature_suite, rng)?,
            runtime: EnclaveRuntime::unhardened(),
        })
    }
}

impl EnclaveBackend for SoftwareBackend {
    fn mode(&self) -> AttestationMode {
        AttestationMode::Software
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
        self.keys.sign_report(&ReportBody {
            mode: AttestationMode::Software,
            measurement: self.measurement,
            kem_public_key: self.keys.kem_public_key().clone(),
            verifying_key: self.keys.verifying_key().clone(),
            nonce,
            issued_at: now,
            evidence: Vec::new(),
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

/// SHA-384 of a file (the software measurement of an executable).
pub fn measure_file(path: &std::path::Path) -> std::io::Result<[u8; MEASUREMENT_LEN]> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA384);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
    }
    let mut out = [0u8; MEASUREMENT_LEN];
    out.copy_from_slice(context.finish().as_ref());
    Ok(out)
}
