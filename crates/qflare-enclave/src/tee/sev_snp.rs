//! SEV-SNP evidence from `/dev/sev-guest`, through the `sev` crate's guest
//! API (the same crate whose pure-Rust chain checks the verifier uses).
//!
//! The VCEK comes from the operator's file when given (`--vcek`: AMD's KDS
//! serves it per chip and TCB), else from the certificate table of the
//! extended report, which the host fills where the cloud provides it. A
//! table holding a VLEK instead is refused at start: the verifier does not
//! accept VLEK-signed reports yet (docs/enclave.md §5.5).
//!
//! Reports are requested at VMPL 0, the level a guest without an SVSM runs at.

use std::path::Path;

use qflare_protocol::attestation::hardware::{Evidence, SevSnpEvidence, TeeKind};
use sev::firmware::guest::Firmware;
use sev::firmware::host::{CertTableEntry, CertType};

use super::{EvidenceSource, REPORT_DATA_LEN, TeeError, TeeOptions};
use crate::sandbox::{DeviceIoctl, ioctl_write_read};

const KIND: TeeKind = TeeKind::SevSnp;
const DEVICE: &str = "/dev/sev-guest";

/// `struct snp_guest_request_ioctl` (linux/sev-guest.h): a byte, padding,
/// three 64-bit fields: 32 bytes.
const GUEST_REQUEST_SIZE: u32 = 32;
/// `SNP_GET_REPORT`, `_IOWR('S', 0x0, struct snp_guest_request_ioctl)`.
pub(crate) const SNP_GET_REPORT: u32 = ioctl_write_read(b'S', 0x0, GUEST_REQUEST_SIZE);
/// `SNP_GET_EXT_REPORT`, `_IOWR('S', 0x2, struct snp_guest_request_ioctl)`.
pub(crate) const SNP_GET_EXT_REPORT: u32 = ioctl_write_read(b'S', 0x2, GUEST_REQUEST_SIZE);

/// The guest device and where the VCEK comes from.
pub(crate) struct SnpSource {
    firmware: Firmware,
    /// The operator's VCEK (DER); `None`: read it from each extended report.
    vcek: Option<Vec<u8>>,
}

impl SnpSource {
    pub(crate) fn open(options: &TeeOptions) -> Result<Self, TeeError> {
        let vcek = match &options.vcek {
            Some(path) => Some(read_certificate(path)?),
            None => None,
        };
        let firmware = Firmware::open().map_err(|err| {
            TeeError::device(
                KIND,
                format!(
                    "cannot open {DEVICE}: {err} (not an SEV-SNP guest, or no sev-guest driver)"
                ),
            )
        })?;
        Ok(Self { firmware, vcek })
    }
}

/// A certificate file, DER or PEM.
fn read_certificate(path: &Path) -> Result<Vec<u8>, TeeError> {
    let bytes = std::fs::read(path).map_err(|err| {
        TeeError::device(
            KIND,
            format!("cannot read the VCEK {}: {err}", path.display()),
        )
    })?;
    if !bytes.starts_with(b"-----BEGIN") {
        return Ok(bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let body: String = text
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|err| TeeError::device(KIND, format!("{} is not PEM: {err}", path.display())))
}

fn vcek_from_table(table: Option<Vec<CertTableEntry>>) -> Result<Vec<u8>, TeeError> {
    let table = table.unwrap_or_default();
    if let Some(entry) = table.iter().find(|e| e.cert_type == CertType::VCEK) {
        return Ok(entry.data.clone());
    }
    let message = if table.iter().any(|e| e.cert_type == CertType::VLEK) {
        "the host supplies a VLEK, which QFLARE's verifier does not accept yet; give the chip's VCEK with --vcek"
    } else {
        "the host supplies no VCEK in the extended report; download it from AMD's KDS for this chip and TCB and give it with --vcek"
    };
    Err(TeeError::device(KIND, message))
}

impl EvidenceSource for SnpSource {
    fn kind(&self) -> TeeKind {
        KIND
    }

    fn evidence(&mut self, report_data: &[u8; REPORT_DATA_LEN]) -> Result<Evidence, TeeError> {
        let failed = |err: sev::error::UserApiError| {
            TeeError::device(KIND, format!("the guest report request failed: {err}"))
        };
        let (report, vcek) = match &self.vcek {
            Some(vcek) => (
                self.firmware
                    .get_report(None, Some(*report_data), Some(0))
                    .map_err(failed)?,
                vcek.clone(),
            ),
            None => {
                let (report, table) = self
                    .firmware
                    .get_ext_report(None, Some(*report_data), Some(0))
                    .map_err(failed)?;
                (report, vcek_from_table(table)?)
            }
        };
        Ok(Evidence::SevSnp(SevSnpEvidence { report, vcek }))
    }

    fn device_ioctls(&self) -> Vec<DeviceIoctl> {
        // `sev` keeps the device's descriptor private, so these are allowed
        // on any descriptor; after the sandbox closes the process can open
        // no other device to aim them at.
        [SNP_GET_REPORT, SNP_GET_EXT_REPORT]
            .map(|request| DeviceIoctl { fd: None, request })
            .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_numbers_are_the_kernels() {
        // Values from linux/sev-guest.h as the kernel computes them.
        assert_eq!(SNP_GET_REPORT, 0xC020_5300);
        assert_eq!(SNP_GET_EXT_REPORT, 0xC020_5302);
    }

    #[test]
    fn a_vlek_or_an_empty_table_says_what_to_do() {
        let vlek = vec![CertTableEntry {
            cert_type: CertType::VLEK,
            data: vec![1, 2, 3],
        }];
        let message = vcek_from_table(Some(vlek)).unwrap_err().to_string();
        assert!(
            message.contains("VLEK") && message.contains("--vcek"),
            "{message}"
        );
        let message = vcek_from_table(None).unwrap_err().to_string();
        assert!(message.contains("KDS"), "{message}");
        let vcek = vec![CertTableEntry {
            cert_type: CertType::VCEK,
            data: vec![7; 4],
        }];
        assert_eq!(vcek_from_table(Some(vcek)).unwrap(), vec![7; 4]);
    }
}
