//! The two limits uploads ([`crate::uploads`]) and model downloads
//! ([`crate::downloads`]) both put on a large body: one per device at a time
//! ([`DeviceSlots`]), and a memory budget over all devices
//! ([`MemoryBudget`]). Each returns a guard that gives its share back when
//! dropped, whichever way the request ends.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// A budget is counted in units of this many bytes, so that the largest
/// body (1.4 GB) is a permit count a semaphore takes at once (`u32`).
const UNIT: usize = 1024;

/// The devices with an operation of one kind in flight.
#[derive(Debug, Default)]
pub struct DeviceSlots {
    held: Arc<Mutex<HashSet<String>>>,
}

/// One device's place, given back when dropped.
#[derive(Debug)]
pub struct DeviceSlot {
    device_id: String,
    held: Arc<Mutex<HashSet<String>>>,
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.device_id);
    }
}

impl DeviceSlots {
    /// The device's place, or `None` while it holds one already.
    pub fn take(&self, device_id: &str) -> Option<DeviceSlot> {
        let inserted = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(device_id.to_owned());
        inserted.then(|| DeviceSlot {
            device_id: device_id.to_owned(),
            held: self.held.clone(),
        })
    }

    /// Devices holding a place now.
    pub fn len(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// True when no device holds a place.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bytes of bodies in memory at once, over all devices. A body larger than
/// the whole budget is charged the whole budget: it runs alone rather than
/// never.
#[derive(Debug)]
pub struct MemoryBudget {
    semaphore: Arc<Semaphore>,
    units: u32,
}

impl MemoryBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Self {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        Self {
            semaphore: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    fn units_for(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT).max(1))
            .unwrap_or(u32::MAX)
            .min(self.units)
    }

    /// `bytes` of the budget now, or `None` if they are not free.
    pub fn try_take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        self.semaphore
            .clone()
            .try_acquire_many_owned(self.units_for(bytes))
            .ok()
    }

    /// `bytes` of the budget, once they are free.
    pub async fn take(&self, bytes: usize) -> Result<OwnedSemaphorePermit, AcquireError> {
        self.semaphore
            .clone()
            .acquire_many_owned(self.units_for(bytes))
            .await
    }

    /// Bytes not held now (in whole units).
    pub fn available_bytes(&self) -> usize {
        self.semaphore.available_permits() * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_held_until_dropped_and_bytes_until_released() {
        let slots = DeviceSlots::default();
        let slot = slots.take("a").unwrap();
        assert!(slots.take("a").is_none());
        assert!(
            slots.take("b").is_some(),
            "another device's place is its own"
        );
        drop(slot);
        assert!(slots.is_empty());
        assert!(slots.take("a").is_some());

        let budget = MemoryBudget::new(4 * UNIT);
        let three = budget.try_take(3 * UNIT).unwrap();
        assert!(budget.try_take(2 * UNIT).is_none());
        assert_eq!(budget.available_bytes(), UNIT);
        drop(three);
        let whole = budget.try_take(100 * UNIT).unwrap();
        assert_eq!(
            budget.available_bytes(),
            0,
            "larger than the budget: all of it"
        );
        drop(whole);
    }
}
