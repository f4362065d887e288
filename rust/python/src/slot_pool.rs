//! Bindings of the slot accounting both tiers use: `SlotPool`, on its own (the GPU tier reaches it
//! through `GpuSlots`).

use crate::error;
use gmtier_core::store::{self as core, Key};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::sync::Mutex;

/// Slot accounting with the store's eviction policy (LRU refined by prefetch priority, pinned
/// slots never evicted), as both tiers use it.
#[pyclass(module = "gmtier._core", name = "SlotPool", frozen)]
pub struct PySlotPool {
    inner: Mutex<core::SlotPool>,
}

#[pymethods]
impl PySlotPool {
    #[new]
    fn new(num_slots: usize) -> PyResult<Self> {
        if num_slots == 0 {
            return Err(PyValueError::new_err(
                "a SlotPool needs at least one slot (the budget is smaller than one expert)",
            ));
        }
        Ok(PySlotPool {
            inner: Mutex::new(core::SlotPool::new(num_slots)),
        })
    }
    /// Take (and pin, unless pin=False for a prefetch) a slot for key: (slot, hit, evicted_key|None).
    /// Raises StoreError when every slot is pinned.
    #[pyo3(signature = (key, priority=0, pin=true))]
    fn acquire(&self, key: Key, priority: i64, pin: bool) -> PyResult<(usize, bool, Option<Key>)> {
        self.inner
            .lock()
            .unwrap()
            .acquire(key, priority, pin)
            .map_err(error::store)
    }
    /// Unpin key's slot.
    fn release(&self, key: Key) -> PyResult<()> {
        self.inner
            .lock()
            .unwrap()
            .release(key)
            .map_err(error::store)
    }
    /// Slot of key, or None.
    fn lookup(&self, key: Key) -> Option<usize> {
        self.inner.lock().unwrap().lookup(key)
    }
    /// Forget key (its data is stale); returns whether it was resident.
    fn invalidate(&self, key: Key) -> bool {
        self.inner.lock().unwrap().invalidate(key)
    }
    /// A prefetch of key turned out wrong: unprotect it and make it the first LRU victim.
    /// Returns whether key held an unused prefetch.
    fn demote(&self, key: Key) -> bool {
        let mut g = self.inner.lock().unwrap();
        g.lookup(key).is_some_and(|s| g.demote(s))
    }
    /// Pins on slot.
    fn pins(&self, slot: usize) -> PyResult<u32> {
        let g = self.inner.lock().unwrap();
        if slot >= g.num_slots() {
            return Err(PyValueError::new_err(format!(
                "slot {slot} out of range (pool has {})",
                g.num_slots()
            )));
        }
        Ok(g.pins(slot))
    }
    /// Key in slot, or None.
    fn key_of(&self, slot: usize) -> PyResult<Option<Key>> {
        let g = self.inner.lock().unwrap();
        if slot >= g.num_slots() {
            return Err(PyValueError::new_err(format!(
                "slot {slot} out of range (pool has {})",
                g.num_slots()
            )));
        }
        Ok(g.key_of(slot))
    }
    /// Number of slots.
    #[getter]
    fn num_slots(&self) -> usize {
        self.inner.lock().unwrap().num_slots()
    }
    /// Slots holding a key.
    fn resident(&self) -> usize {
        self.inner.lock().unwrap().resident()
    }
    /// Slots pinned.
    fn pinned(&self) -> usize {
        self.inner.lock().unwrap().pinned()
    }
}

/// Register `SlotPool` in `gmtier._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySlotPool>()
}
