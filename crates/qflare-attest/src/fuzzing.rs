//! The entry point for `cargo fuzz` (see `fuzz/`): arbitrary bytes as the
//! host could put them in a report's `evidence` must be refused or accepted,
//! never panic, whatever parser they reach (JSON, the SNP report layout,
//! DCAP's quote codec, COSE and CBOR, X.509 and the chain builders).

use crate::policy::{HardwarePolicy, NitroPolicy, SevSnpPolicy, TdxPolicy};
use crate::{Evidence, nitro, sev_snp, tdx};

/// Decodes `data` as evidence and, when it decodes, re-encodes it and runs
/// the whole verifier on it with a policy that accepts every kind (and no
/// measurement), committing to whatever report data it claims so that the
/// vendor checks run; also feeds the raw bytes to each kind's own parser.
pub fn evidence(data: &[u8]) {
    let _ = sev_snp::claimed_report_data(data);
    let _ = tdx::claimed_report_data(data);
    let _ = nitro::claimed_report_data(data);
    let _ = nitro::parse_payload(data);
    let Ok(evidence) = Evidence::from_bytes(data) else {
        return;
    };
    let encoded = evidence.to_bytes();
    assert!(
        Evidence::from_bytes(&encoded).is_ok_and(|again| again == evidence),
        "evidence that decodes re-encodes to the same evidence"
    );
    let Ok(claimed) = evidence.claimed_report_data() else {
        return;
    };
    let policy = HardwarePolicy {
        sev_snp: Some(SevSnpPolicy::trusting(Vec::new())),
        tdx: Some(TdxPolicy::trusting(Vec::new())),
        nitro: Some(NitroPolicy::trusting(Vec::new())),
    };
    // A time inside every published sample's validity window would let the
    // fuzzer reach the policy checks from a mutated genuine file; any fixed
    // time exercises the chain code.
    let _ = crate::verify(&encoded, &policy, &claimed, 1_700_000_000);
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// The fuzz target's seeds (written by `fuzz/seeds.py`) start inside
    /// every format: each JSON seed decodes as evidence, and the entry point
    /// refuses every seed without panicking.
    #[test]
    fn the_seed_corpus_decodes_and_is_refused_cleanly() {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/hardware_evidence");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            if path.extension().is_some_and(|e| e == "json") {
                let evidence = crate::Evidence::from_bytes(&data);
                assert!(evidence.is_ok(), "{}: {evidence:?}", path.display());
            }
            super::evidence(&data);
            seeds += 1;
        }
        assert!(seeds >= 7, "{seeds} seeds in {}", dir.display());
    }
}
