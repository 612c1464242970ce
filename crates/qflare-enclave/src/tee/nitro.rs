//! Nitro evidence from the Nitro Secure Module (`/dev/nsm`), through AWS's
//! `aws-nitro-enclaves-nsm-api`. The 64-byte report data goes in the
//! document's `user_data`, which is where the verifier looks for it; `nonce`
//! and `public_key` stay empty because the report data already commits to
//! the nonce and both keys.

use qflare_protocol::attestation::hardware::{Evidence, NitroEvidence, TeeKind};

use aws_nitro_enclaves_nsm_api::api::{Request, Response};
use aws_nitro_enclaves_nsm_api::driver;

use super::{EvidenceSource, REPORT_DATA_LEN, TeeError};
use crate::sandbox::{DeviceIoctl, ioctl_write_read};

const KIND: TeeKind = TeeKind::Nitro;

/// `struct nsm_message` (the driver's uapi header): two `struct iovec`s.
const NSM_MESSAGE_SIZE: u32 = 32;
/// The driver's one request, `_IOWR(0x0A, 0, struct nsm_message)`.
pub(crate) const NSM_IOCTL_REQUEST: u32 = ioctl_write_read(0x0A, 0, NSM_MESSAGE_SIZE);

/// The open NSM device.
pub(crate) struct NitroSource {
    fd: i32,
}

impl NitroSource {
    pub(crate) fn open() -> Result<Self, TeeError> {
        let fd = driver::nsm_init();
        if fd < 0 {
            return Err(TeeError::device(
                KIND,
                "cannot open /dev/nsm (not inside a Nitro Enclave)",
            ));
        }
        Ok(Self { fd })
    }
}

impl Drop for NitroSource {
    fn drop(&mut self) {
        driver::nsm_exit(self.fd);
    }
}

impl EvidenceSource for NitroSource {
    fn kind(&self) -> TeeKind {
        KIND
    }

    fn evidence(&mut self, report_data: &[u8; REPORT_DATA_LEN]) -> Result<Evidence, TeeError> {
        let request = Request::Attestation {
            user_data: Some(serde_bytes::ByteBuf::from(report_data.to_vec())),
            nonce: None,
            public_key: None,
        };
        match driver::nsm_process_request(self.fd, request) {
            Response::Attestation { document } => Ok(Evidence::Nitro(NitroEvidence { document })),
            Response::Error(code) => Err(TeeError::device(
                KIND,
                format!("the NSM refused the attestation request: {code:?}"),
            )),
            other => Err(TeeError::device(
                KIND,
                format!("the NSM answered an attestation request with {other:?}"),
            )),
        }
    }

    fn device_ioctls(&self) -> Vec<DeviceIoctl> {
        vec![DeviceIoctl {
            fd: Some(self.fd),
            request: NSM_IOCTL_REQUEST,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_number_is_the_drivers() {
        assert_eq!(NSM_IOCTL_REQUEST, 0xC020_0A00);
    }

    #[test]
    fn outside_an_enclave_opening_says_so() {
        if std::path::Path::new("/dev/nsm").exists() {
            return;
        }
        let err = NitroSource::open().err().expect("no NSM here");
        assert!(err.to_string().contains("/dev/nsm"), "{err}");
    }
}
