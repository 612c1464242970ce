//! Where the simulation shows colluding attackers the round's honest
//! updates, for the crafted (omniscient) attacks of `crafted.rs`.
//!
//! Every honest device's tamper hook posts its update for the round and
//! sends it unchanged; every attacker's hook waits until all honest updates
//! of the round are posted, computes the attack from them and sends that.
//! The hooks run on the devices' blocking training threads, so waiting on a
//! condition variable holds no async worker. The attack needs every device
//! selected in every round (the simulation checks), so the number of
//! honest updates a round brings is known; an attacker that waits longer
//! than `patience` (an honest device failed) attacks with what is there, or
//! sends its own update when nothing is.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use qflare_edge::run::TamperFn;
use qflare_protocol::tensor::TensorMap;

use super::Attack;
use super::crafted::CraftError;

/// See the module documentation.
pub(super) struct Collusion {
    attack: Attack,
    devices: usize,
    attackers: usize,
    patience: Duration,
    seed: u64,
    /// Honest updates by round, then device index.
    posted: Mutex<HashMap<u64, BTreeMap<usize, Vec<f32>>>>,
    arrived: Condvar,
}

impl Collusion {
    /// A board for `attackers` of `devices` running the crafted `attack`.
    pub(super) fn new(
        attack: Attack,
        devices: usize,
        attackers: usize,
        patience: Duration,
        seed: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            attack,
            devices,
            attackers,
            patience,
            seed,
            posted: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
        })
    }

    /// The hook of honest device `index`: post, then send unchanged.
    pub(super) fn honest_hook(self: &Arc<Self>, index: usize) -> TamperFn {
        let board = Arc::clone(self);
        Arc::new(move |round, update: TensorMap| {
            board.post(round, index, update.to_flat());
            update
        })
    }

    /// The hook of attacker `index`: wait for the honest updates, send the attack.
    pub(super) fn attacker_hook(self: &Arc<Self>, index: usize) -> TamperFn {
        let board = Arc::clone(self);
        Arc::new(move |round, update: TensorMap| {
            match board
                .craft(round, index)
                .map(|crafted| update.with_flat(&crafted))
            {
                Ok(Ok(crafted)) => crafted,
                Ok(Err(err)) => {
                    tracing::warn!(round, index, %err, "the crafted update does not fit; sending the own update");
                    update
                }
                Err(err) => {
                    tracing::warn!(round, index, %err, "no attack this round; sending the own update");
                    update
                }
            }
        })
    }

    fn post(&self, round: u64, index: usize, update: Vec<f32>) {
        let mut posted = self.posted.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the current round and the one before are still wanted.
        posted.retain(|&kept, _| kept + 1 >= round);
        posted.entry(round).or_default().insert(index, update);
        self.arrived.notify_all();
    }

    /// The round's honest updates once all have arrived (or `patience` ran out).
    fn honest(&self, round: u64) -> Vec<Vec<f32>> {
        let expected = self.devices - self.attackers;
        let posted = self.posted.lock().unwrap_or_else(PoisonError::into_inner);
        let (posted, _) = self
            .arrived
            .wait_timeout_while(posted, self.patience, |posted| {
                posted.get(&round).map_or(0, BTreeMap::len) < expected
            })
            .unwrap_or_else(PoisonError::into_inner);
        posted
            .get(&round)
            .map(|updates| updates.values().cloned().collect())
            .unwrap_or_default()
    }

    /// What attacker `index` sends in `round`.
    fn craft(&self, round: u64, index: usize) -> Result<Vec<f32>, CraftError> {
        let honest = self.honest(round);
        let seed = self.seed ^ round.rotate_left(32) ^ index as u64;
        self.attack
            .craft(&honest, self.devices, self.attackers, seed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use qflare_protocol::tensor::{Tensor, TensorMap};

    use super::*;

    fn update(values: &[f32]) -> TensorMap {
        let mut map = TensorMap::new();
        map.insert(
            "w",
            Tensor::new(vec![values.len()], values.to_vec()).unwrap(),
        )
        .unwrap();
        map
    }

    /// Three honest devices post from their own threads, in any order; the
    /// attacker, which started first, waits for all three and sends the
    /// attack computed from exactly them.
    #[test]
    fn attackers_wait_for_every_honest_update_of_the_round() {
        let board = Collusion::new(Attack::Ipm(0.5), 4, 1, Duration::from_secs(60), 1);
        let attacker = board.attacker_hook(3);
        let attacking = std::thread::spawn(move || attacker(7, update(&[9.0, 9.0])));
        let honest: Vec<_> = [[0.0f32, -2.0], [2.0, -1.0], [4.0, 0.0]]
            .into_iter()
            .enumerate()
            .map(|(index, values)| {
                let hook = board.honest_hook(index);
                std::thread::spawn(move || hook(7, update(&values)).to_flat())
            })
            .collect();
        for (thread, values) in honest
            .into_iter()
            .zip([[0.0f32, -2.0], [2.0, -1.0], [4.0, 0.0]])
        {
            assert_eq!(
                thread.join().unwrap(),
                values,
                "honest updates pass unchanged"
            );
        }
        // μ = (2, −1), so −0.5·μ.
        assert_eq!(attacking.join().unwrap().to_flat(), vec![-1.0, 0.5]);
    }

    #[test]
    fn with_no_honest_update_in_time_the_attacker_sends_its_own() {
        let board = Collusion::new(Attack::MinMax, 3, 1, Duration::from_millis(10), 1);
        let attacker = board.attacker_hook(2);
        assert_eq!(attacker(1, update(&[3.0])).to_flat(), vec![3.0]);
    }
}
