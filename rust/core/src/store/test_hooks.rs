//! Hooks for the integration tests in `rust/core/tests/`: not part of the API.

use super::create::create_store;
use super::format::{TensorSpec, SHADOW_VERSION};
use super::io::JobPriority;
use super::slots::SlotState;
use super::{ExpertStore, Key};
use super::{InitFn, Result};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

#[doc(hidden)]
/// Test hook: the file offsets of an expert's committed record and of its version written
/// since the last commit, if any.
pub fn record_location(store: &ExpertStore, layer: usize, expert: usize) -> (u64, Option<u64>) {
    let g = store.sh.lock();
    let flat = store.sh.geom.flat(layer, expert);
    let geom = &store.sh.geom;
    (
        geom.slot_offset(g.index.entry(flat).slot),
        g.latest.get(&flat).map(|l| geom.slot_offset(l.0)),
    )
}

#[doc(hidden)]
/// Test hook: the record slots free now (version 2 stores).
pub fn free_slots(store: &ExpertStore) -> usize {
    store.sh.lock().free.len()
}

#[doc(hidden)]
/// Test hook: create a store in the version 1 format (two shadow slots per expert), as gmtier
/// before the slot pool did.
pub fn create_shadow_store(
    dir: &Path,
    num_layers: usize,
    num_experts: usize,
    schema: &[TensorSpec],
    init: Option<InitFn<'_>>,
) -> Result<()> {
    let slots = 2 * num_layers * num_experts;
    create_store(
        dir,
        num_layers,
        num_experts,
        schema,
        SHADOW_VERSION,
        slots,
        init,
    )
}

#[doc(hidden)]
/// Test hook: whether `key` is resident, and then (dirty, write-back running).
pub fn slot_status(store: &ExpertStore, key: Key) -> Option<(bool, bool)> {
    let g = store.sh.lock();
    g.pool
        .lookup(key)
        .map(|s| (g.slots[s].dirty, g.slots[s].state == SlotState::Flushing))
}

#[doc(hidden)]
/// Test hook: occupy every I/O worker with a job that blocks until the returned guard is
/// dropped, so that I/O queued meanwhile cannot start (deterministic tests of in-flight states).
pub fn block_io(store: &ExpertStore) -> IoBlock {
    let n = store.sh.opts.io_threads;
    let gate = Arc::new((Mutex::new((0usize, false)), Condvar::new()));
    for _ in 0..n {
        let gate = gate.clone();
        store.sh.io.submit(
            JobPriority {
                class: u8::MAX,
                priority: 0,
                seq: 0,
            },
            Box::new(move || {
                let (m, cv) = &*gate;
                let mut g = m.lock().unwrap();
                g.0 += 1;
                cv.notify_all();
                while !g.1 {
                    g = cv.wait(g).unwrap();
                }
            }),
        );
    }
    let (m, cv) = &*gate;
    let mut g = m.lock().unwrap();
    while g.0 < n {
        g = cv.wait(g).unwrap();
    }
    drop(g);
    IoBlock { gate }
}

#[doc(hidden)]
/// See [`block_io`]; dropping it lets the I/O workers go.
pub struct IoBlock {
    gate: Arc<(Mutex<(usize, bool)>, Condvar)>,
}

impl Drop for IoBlock {
    fn drop(&mut self) {
        let (m, cv) = &*self.gate;
        m.lock().unwrap().1 = true;
        cv.notify_all();
    }
}
