//! Intel TDX: a DCAP quote (version 4 or 5) over the trust domain's report,
//! signed by the quoting enclave's attestation key, which the quoting
//! enclave's report binds to; that report is signed by the platform's PCK,
//! whose certificate chains to Intel's SGX root. Whether the platform is up
//! to date is decided by Intel's signed collateral (TCB info, QE identity,
//! CRLs), which expires within about a month of issue.
//!
//! The whole DCAP verification is Phala Network's `dcap-qvl` (pure Rust,
//! audited, Intel's root built in), with its network-fetching features off
//! and its RustCrypto backend. It is called with debug TDs allowed so that
//! debug mode is refused here, by policy, with a clear message; every other
//! attribute check of `dcap-qvl` (migratable TDs, `SEPT_VE_DISABLE`, service
//! TDs) stays in force and reads as the vendor not vouching for the quote.

use dcap_qvl::configs::RustCryptoConfig;
use dcap_qvl::quote::{Quote, Report, TDAttributes};
use dcap_qvl::verify::{QuoteVerifier, VerifiedReport};

use crate::error::{AttestError, Result};
use crate::evidence::{TdxEvidence, TeeKind};
use crate::policy::TdxPolicy;
use crate::{Checked, MEASUREMENT_LEN, REPORT_DATA_LEN};

const KIND: TeeKind = TeeKind::Tdx;

/// `TUD` bits of `TDATTRIBUTES`: bit 0 is `DEBUG`, bits 4..6 are the
/// performance-monitoring ones that also expose the TD to its host.
const TUD_UNTRUSTED: u8 = 0x71;

/// The report data as the quote states it, unverified.
pub fn claimed_report_data(quote: &[u8]) -> Result<[u8; REPORT_DATA_LEN]> {
    let parsed = Quote::parse(quote).map_err(|e| AttestError::malformed("DCAP quote", e))?;
    match (parsed.report.as_td10(), parsed.report.as_sgx()) {
        (Some(td), _) => Ok(td.report_data),
        (None, Some(enclave)) => Ok(enclave.report_data),
        (None, None) => Err(AttestError::malformed("DCAP quote", "no report body")),
    }
}

/// The TD's MRTD as the quote states it, unverified (see
/// [`crate::sev_snp::claimed_measurement`] for why that is wanted).
pub fn claimed_measurement(quote: &[u8]) -> Result<[u8; MEASUREMENT_LEN]> {
    let parsed = Quote::parse(quote).map_err(|e| AttestError::malformed("DCAP quote", e))?;
    parsed
        .report
        .as_td10()
        .map(|td| td.mr_td)
        .ok_or_else(|| AttestError::malformed("DCAP quote", "not a TD quote"))
}

/// Checks that Intel vouches for `quote` at `now` given `collateral`:
/// every signature, certificate, CRL and collateral validity window, and the
/// platform's TCB status (returned, not judged). Debug mode is not judged
/// here either; [`verify`] does both by policy.
pub fn verify_quote(
    quote: &[u8],
    collateral: &dcap_qvl::QuoteCollateralV3,
    now: u64,
) -> Result<VerifiedReport> {
    QuoteVerifier::new_prod()
        .with_config::<RustCryptoConfig>()
        .allow_debug(true)
        .verify(quote, collateral, now)
        .map_err(|e| AttestError::chain(KIND, format!("{e:#}")))
}

/// Verifies TDX evidence at `now` against `policy` (the report data is
/// compared by [`crate::verify`]).
pub fn verify(evidence: &TdxEvidence, policy: &TdxPolicy, now: u64) -> Result<Checked> {
    judge(
        &verify_quote(&evidence.quote, &evidence.collateral, now)?,
        policy,
    )
}

/// Compares a quote that Intel vouches for with `policy`.
fn judge(verified: &VerifiedReport, policy: &TdxPolicy) -> Result<Checked> {
    let Some(td) = verified.report.as_td10() else {
        return Err(AttestError::policy(
            KIND,
            "the quote is from an SGX enclave, not a TDX trust domain",
        ));
    };
    let attributes = TDAttributes::parse(td.td_attributes)
        .map_err(|e| AttestError::malformed("TD attributes", e))?;
    if attributes.tud & TUD_UNTRUSTED != 0 {
        return Err(AttestError::policy(
            KIND,
            "the TD is in debug mode (TDATTRIBUTES.TUD is set)",
        ));
    }
    if !policy.accepted_tcb_statuses.contains(&verified.status) {
        return Err(AttestError::policy(
            KIND,
            format!(
                "TCB status {} (advisories: {}) is not accepted (accepted: {})",
                verified.status,
                advisories(verified),
                policy.accepted_tcb_statuses.join(", ")
            ),
        ));
    }
    if !policy.mr_td.iter().any(|m| m.0 == td.mr_td) {
        return Err(AttestError::policy(
            KIND,
            format!("MRTD {} is not on the allow-list", hex::encode(td.mr_td)),
        ));
    }
    let rtmrs = [&td.rt_mr0, &td.rt_mr1, &td.rt_mr2, &td.rt_mr3];
    for (index, (allowed, value)) in policy.rtmr.iter().zip(rtmrs).enumerate() {
        if !allowed.is_empty() && !allowed.iter().any(|m| m.0 == *value) {
            return Err(AttestError::policy(
                KIND,
                format!(
                    "RTMR{index} {} is not on the allow-list",
                    hex::encode(value)
                ),
            ));
        }
    }
    let generation = match verified.report {
        Report::TD10(_) => "TDX 1.0",
        _ => "TDX 1.5",
    };
    Ok(Checked {
        measurement: td.mr_td,
        platform: format!(
            "Intel {generation} TD, TCB status {}, advisories: {}",
            verified.status,
            advisories(verified)
        ),
    })
}

fn advisories(verified: &VerifiedReport) -> String {
    if verified.advisory_ids.is_empty() {
        "none".to_owned()
    } else {
        verified.advisory_ids.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Digest48;
    use crate::vectors;

    /// A quote and its collateral (Phala's dcap-qvl sample data), and a time
    /// inside the collateral's validity (TCB info and QE identity issued on
    /// the first date, next update a month later).
    fn sample(test: &str, quote: &str) -> Option<(TdxEvidence, u64)> {
        let dir = vectors::dir(test, "tdx-sgx")?;
        let collateral = vectors::read(&dir, &format!("{quote}_collateral.json"));
        let when = if quote == "tdx_quote_outdated" {
            "2026-02-25T00:00:00Z"
        } else {
            "2025-06-25T00:00:00Z"
        };
        Some((
            TdxEvidence {
                quote: vectors::read(&dir, quote),
                collateral: serde_json::from_slice(&collateral).unwrap(),
            },
            vectors::unix(when),
        ))
    }

    fn mr_td(evidence: &TdxEvidence) -> Digest48 {
        Digest48(
            Quote::parse(&evidence.quote)
                .unwrap()
                .report
                .as_td10()
                .unwrap()
                .mr_td,
        )
    }

    #[test]
    fn the_known_answers_hold() {
        let test = "the_known_answers_hold";
        let Some((tdx, now)) = sample(test, "tdx_quote") else {
            return;
        };
        let report = verify_quote(&tdx.quote, &tdx.collateral, now).unwrap();
        assert_eq!(report.status, "UpToDate");
        assert!(report.advisory_ids.is_empty());

        let (sgx, now) = sample(test, "sgx_quote").unwrap();
        let report = verify_quote(&sgx.quote, &sgx.collateral, now).unwrap();
        assert_eq!(report.status, "ConfigurationAndSWHardeningNeeded");
        assert_eq!(report.advisory_ids, ["INTEL-SA-00289", "INTEL-SA-00615"]);

        // The outdated sample's platform is below every TCB level of its
        // TCB info (dcap-qvl's own tests pass it only by overriding that
        // info), so no status can be given and Intel does not vouch for it.
        let (outdated, now) = sample(test, "tdx_quote_outdated").unwrap();
        assert!(matches!(
            verify_quote(&outdated.quote, &outdated.collateral, now),
            Err(AttestError::Chain { detail, .. }) if detail.contains("No matching TCB level")
        ));
    }

    #[test]
    fn the_genuine_td_quote_verifies_and_policy_judges_it() {
        let Some((evidence, now)) = sample("the_genuine_td_quote_verifies", "tdx_quote") else {
            return;
        };
        let policy = TdxPolicy::trusting(vec![mr_td(&evidence)]);
        let checked = verify(&evidence, &policy, now).unwrap();
        assert_eq!(checked.measurement, mr_td(&evidence).0);
        assert_eq!(
            claimed_measurement(&evidence.quote).unwrap(),
            mr_td(&evidence).0
        );
        assert!(
            checked.platform.contains("UpToDate"),
            "{}",
            checked.platform
        );

        let mut unlisted = policy.clone();
        unlisted.mr_td = vec![Digest48([0x5a; 48])];
        assert!(matches!(
            verify(&evidence, &unlisted, now),
            Err(AttestError::Policy { rule, .. }) if rule.starts_with("MRTD")
        ));
        let mut pinned_rtmr = policy.clone();
        pinned_rtmr.rtmr[2] = vec![Digest48([0x5a; 48])];
        assert!(matches!(
            verify(&evidence, &pinned_rtmr, now),
            Err(AttestError::Policy { rule, .. }) if rule.starts_with("RTMR2")
        ));
    }

    #[test]
    fn unaccepted_tcb_statuses_outdated_platforms_and_sgx_quotes_are_refused() {
        let test = "unaccepted_tcb_statuses_outdated_platforms_and_sgx_quotes_are_refused";
        let Some((evidence, now)) = sample(test, "tdx_quote") else {
            return;
        };
        let mut policy = TdxPolicy::trusting(vec![mr_td(&evidence)]);
        policy.accepted_tcb_statuses = vec!["SWHardeningNeeded".to_owned()];
        assert!(matches!(
            verify(&evidence, &policy, now),
            Err(AttestError::Policy { rule, .. }) if rule.starts_with("TCB status UpToDate")
        ));

        let (outdated, now) = sample(test, "tdx_quote_outdated").unwrap();
        let mut lenient = TdxPolicy::trusting(vec![mr_td(&outdated)]);
        lenient.accepted_tcb_statuses = ["UpToDate", "OutOfDate", "OutOfDateConfigurationNeeded"]
            .map(str::to_owned)
            .to_vec();
        assert!(matches!(
            verify(&outdated, &lenient, now),
            Err(AttestError::Chain { .. })
        ));

        let (sgx, now) = sample(test, "sgx_quote").unwrap();
        assert!(matches!(
            verify(&sgx, &TdxPolicy::trusting(vec![]), now),
            Err(AttestError::Policy { rule, .. }) if rule.contains("SGX enclave")
        ));
        assert!(matches!(
            claimed_measurement(&sgx.quote),
            Err(AttestError::Malformed { .. })
        ));
    }

    #[test]
    fn a_flipped_byte_in_the_signed_quote_fails() {
        let Some((evidence, now)) = sample("a_flipped_byte_in_the_signed_quote_fails", "tdx_quote")
        else {
            return;
        };
        let policy = TdxPolicy::trusting(vec![mr_td(&evidence)]);
        // Header (48 bytes) and TD report body (584) are what the attestation
        // key signs; the signature, the key and the QE report follow.
        for offset in (0..632).step_by(5).chain([8, 47, 48, 631, 640, 700, 1000]) {
            let mut tampered = evidence.clone();
            tampered.quote[offset] ^= 0x01;
            assert!(
                verify(&tampered, &policy, now).is_err(),
                "a flip at {offset} was accepted"
            );
        }
    }

    #[test]
    fn a_missing_or_wrong_intermediate_fails() {
        let Some((evidence, now)) = sample("a_missing_or_wrong_intermediate_fails", "tdx_quote")
        else {
            return;
        };
        let policy = TdxPolicy::trusting(vec![mr_td(&evidence)]);
        let end = "-----END CERTIFICATE-----";
        let chain = &evidence.collateral.tcb_info_issuer_chain;
        let root_only = chain[chain.find(end).unwrap() + end.len()..]
            .trim_start()
            .to_owned();
        let mut missing = evidence.clone();
        missing.collateral.tcb_info_issuer_chain = root_only.clone();
        assert!(matches!(
            verify(&missing, &policy, now),
            Err(AttestError::Chain { .. })
        ));

        // A genuine Intel intermediate, but not the one that signed the TCB
        // info (the PCK platform CA, which issues PCK certificates).
        let mut wrong = evidence.clone();
        wrong.collateral.tcb_info_issuer_chain = evidence.collateral.pck_crl_issuer_chain.clone();
        assert!(matches!(
            verify(&wrong, &policy, now),
            Err(AttestError::Chain { .. })
        ));

        // Intel's signature covers the TCB info it judges the platform by.
        let mut tampered = evidence.clone();
        tampered.collateral.tcb_info =
            evidence
                .collateral
                .tcb_info
                .replacen("OutOfDate", "UpToDate", 1);
        assert_ne!(
            tampered, evidence,
            "the sample's TCB info lists an OutOfDate level"
        );
        assert!(matches!(
            verify(&tampered, &policy, now),
            Err(AttestError::Chain { .. })
        ));
    }

    #[test]
    fn outside_the_collaterals_validity_fails() {
        let Some((evidence, _)) = sample("outside_the_collaterals_validity_fails", "tdx_quote")
        else {
            return;
        };
        let policy = TdxPolicy::trusting(vec![mr_td(&evidence)]);
        for when in ["2025-08-01T00:00:00Z", "2017-01-01T00:00:00Z"] {
            assert!(
                matches!(
                    verify(&evidence, &policy, vectors::unix(when)),
                    Err(AttestError::Chain { .. })
                ),
                "{when}"
            );
        }
    }

    #[test]
    fn debug_tds_are_refused() {
        let Some((evidence, now)) = sample("debug_tds_are_refused", "tdx_quote") else {
            return;
        };
        // No published quote of a debug TD exists; the rule is applied to
        // the genuine verified report with the bit set (in the quote the bit
        // is signed, see the flipped-byte test).
        let policy = TdxPolicy::trusting(vec![mr_td(&evidence)]);
        let mut verified = verify_quote(&evidence.quote, &evidence.collateral, now).unwrap();
        assert!(judge(&verified, &policy).is_ok());
        let Report::TD10(td) = &mut verified.report else {
            panic!("the sample is a TDX 1.0 quote");
        };
        td.td_attributes[0] |= 0x01;
        assert!(matches!(
            judge(&verified, &policy),
            Err(AttestError::Policy { rule, .. }) if rule.contains("debug")
        ));
    }
}
