//! What one enclave boot has done that it must never undo: the round ids it
//! began and the model it certified for each version.
//!
//! Without this a host could re-run an old round — begin its id again with
//! one selected device, replay that device's stored envelope and read the
//! device's update off the new model — or have two different models
//! certified as one version and serve each to different devices. The
//! rules, per boot (a new boot has new keys, so nothing sealed to an old
//! one can be replayed into it):
//!
//! * round ids only move forward: `BeginRound` refuses an id lower than the
//!   last one begun;
//! * the last id may be begun again only while nothing was submitted to it
//!   and it was not finalized — a host whose own bookkeeping failed right
//!   after `BeginRound` can retry it, but an aborted round that saw updates
//!   stays aborted (the host learned nothing from a round no update reached);
//! * one model version names one model: certifying (creating, importing,
//!   re-certifying or aggregating) a second, different model as a version
//!   this boot certified is refused, and so is beginning a round on version
//!   `v` once `v + 1` is certified (the round could only make a second one).

use std::collections::HashMap;

/// Why the history refuses a request; becomes a `refused` error frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// A round id lower than the last one begun.
    #[error("round {requested} is older than round {last}, begun already in this enclave boot")]
    OlderRound {
        /// The id asked for.
        requested: u64,
        /// The last id begun.
        last: u64,
    },
    /// The last round id again, after it received updates or was finalized.
    #[error(
        "round {0} received updates or was finalized in this enclave boot; it cannot be begun again"
    )]
    RoundUsed(u64),
    /// A second model for a version.
    #[error(
        "this enclave boot certified a different model as version {0}; a version names one model"
    )]
    VersionTaken(u64),
    /// A round whose result would be a second model for a version.
    #[error(
        "this enclave boot certified version {next} already; a round on version {base} would make a second"
    )]
    SuccessorExists {
        /// The round's base version.
        base: u64,
        /// The version already certified.
        next: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct LastRound {
    id: u64,
    /// Nothing was submitted to it and it was not finalized.
    unused: bool,
}

/// One boot's round ids and certified versions.
#[derive(Debug, Default)]
pub struct BootHistory {
    last_round: Option<LastRound>,
    versions: HashMap<u64, [u8; 32]>,
}

impl BootHistory {
    /// Whether a round `round_id` on model `base_version` may begin.
    pub fn check_begin(&self, round_id: u64, base_version: u64) -> Result<(), HistoryError> {
        if let Some(last) = self.last_round {
            if round_id < last.id {
                return Err(HistoryError::OlderRound {
                    requested: round_id,
                    last: last.id,
                });
            }
            if round_id == last.id && !last.unused {
                return Err(HistoryError::RoundUsed(round_id));
            }
        }
        match base_version.checked_add(1) {
            Some(next) if self.versions.contains_key(&next) => Err(HistoryError::SuccessorExists {
                base: base_version,
                next,
            }),
            _ => Ok(()),
        }
    }

    /// Records that round `round_id` began.
    pub fn begun(&mut self, round_id: u64) {
        self.last_round = Some(LastRound {
            id: round_id,
            unused: true,
        });
    }

    /// Records that the last round received a submission or was finalized.
    pub fn used(&mut self) {
        if let Some(last) = self.last_round.as_mut() {
            last.unused = false;
        }
    }

    /// Whether the model with `digest` may be certified as `version`.
    pub fn check_version(&self, version: u64, digest: &[u8; 32]) -> Result<(), HistoryError> {
        match self.versions.get(&version) {
            Some(known) if known != digest => Err(HistoryError::VersionTaken(version)),
            _ => Ok(()),
        }
    }

    /// Records that the model with `digest` was certified as `version`
    /// (after [`Self::check_version`] allowed it).
    pub fn certified(&mut self, version: u64, digest: [u8; 32]) {
        self.versions.insert(version, digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_ids_only_move_forward_and_a_used_id_is_spent() {
        let mut history = BootHistory::default();
        history.check_begin(5, 0).unwrap();
        history.begun(5);
        // Begun but unused: the host may retry it.
        history.check_begin(5, 0).unwrap();
        history.used();
        assert_eq!(history.check_begin(5, 0), Err(HistoryError::RoundUsed(5)));
        assert_eq!(
            history.check_begin(4, 0),
            Err(HistoryError::OlderRound {
                requested: 4,
                last: 5
            })
        );
        history.check_begin(6, 0).unwrap();
        // Skipping ids is allowed; going back is not.
        history.begun(9);
        assert!(history.check_begin(6, 0).is_err());
    }

    #[test]
    fn a_version_names_one_model() {
        let mut history = BootHistory::default();
        history.check_version(0, &[1; 32]).unwrap();
        history.certified(0, [1; 32]);
        history.check_version(0, &[1; 32]).unwrap();
        assert_eq!(
            history.check_version(0, &[2; 32]),
            Err(HistoryError::VersionTaken(0))
        );
        history.check_begin(1, 0).unwrap();
        history.certified(1, [3; 32]);
        assert_eq!(
            history.check_begin(2, 0),
            Err(HistoryError::SuccessorExists { base: 0, next: 1 })
        );
        history.check_begin(2, 1).unwrap();
        // No overflow at the top of the range.
        history.check_begin(3, u64::MAX).unwrap();
    }
}
