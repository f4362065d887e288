//! Hooks for the integration tests in `rust/core/tests/`: not part of the API.

use super::io::JobPriority;
use super::slots::SlotState;
use super::{ExpertStore, Key};
use std::sync::{Arc, Condvar, Mutex};

#[doc(hidden)]
/// Test hook: the file offset of an expert's record slot and the slot the index commits.
pub fn record_location(store: &ExpertStore, layer: usize, expert: usize) -> (u64, u64, u8) {
    let g = store.sh.lock();
    let e = g.index.entry(store.sh.geom.flat(layer, expert));
    (
        store.sh.geom.record_offset(layer, expert, 0),
        store.sh.geom.record_offset(layer, expert, 1),
        e.slot,
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
