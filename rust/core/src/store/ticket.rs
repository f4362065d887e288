//! Tickets: a request's handle to wait on, and the release of pins.

use super::{key_str, Inner, Key, Result, Sections, Shared, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

/// An asynchronous request; [`Ticket::wait`] returns the RAM slots. Dropping a ticket that was
/// never waited on releases its pins.
pub struct Ticket {
    pub(super) sh: Arc<Shared>,
    pub(super) id: u64,
    pub(super) keys: Vec<Key>,
    pub(super) distinct: Vec<Key>,
    pub(super) sections: Sections,
    pub(super) done: bool,
}

impl Shared {
    pub(super) fn release(self: &Arc<Self>, keys: &[Key]) -> Result<()> {
        let mut g = self.lock();
        self.release_locked(&mut g, keys)
    }

    /// A ticket gives its pins back without waiting: take it off the waiters of reads into
    /// its keys' slots, so a failing read does not drop its pin a second time.
    pub(super) fn forget_ticket(&self, g: &mut Inner, id: u64, keys: &[Key]) {
        for &k in keys {
            if let Some(s) = g.pool.lookup(k) {
                g.slots[s].tickets.retain(|t| t.0 != id);
            } else if let Some(p) = g.pending.get_mut(&k) {
                p.tickets.retain(|t| t.0 != id);
            }
        }
    }

    pub(super) fn release_locked(
        self: &Arc<Self>,
        g: &mut MutexGuard<'_, Inner>,
        keys: &[Key],
    ) -> Result<()> {
        let mut first_err = None;
        for &k in keys {
            let r = if let Some(s) = g.pool.lookup(k) {
                g.pool.unpin(s)
            } else if let Some(p) = g.pending.get_mut(&k).filter(|p| p.pins > 0) {
                p.pins -= 1;
                Ok(())
            } else {
                Err(StoreError::InvalidArgument(format!(
                    "release of {}, which is not pinned in RAM: every wait() pins once and needs exactly one release",
                    key_str(k)
                )))
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        self.schedule(g);
        self.cv.notify_all();
        first_err.map_or(Ok(()), Err)
    }
}

impl Ticket {
    /// The keys of this request, as given.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The sections this request asked for (what wait() guarantees valid in each slot).
    pub fn sections(&self) -> Sections {
        self.sections
    }

    /// Slot of `k` if the sections asked for are valid there.
    fn slot_ready(&self, g: &Inner, k: Key) -> Option<usize> {
        g.pool
            .lookup(k)
            .filter(|&s| g.slots[s].valid.contains(self.sections))
    }

    /// Whether wait() would return without blocking.
    pub fn ready(&self) -> bool {
        let g = self.sh.lock();
        self.distinct
            .iter()
            .all(|&k| self.slot_ready(&g, k).is_some())
            || g.ticket_errors.contains_key(&self.id)
    }

    /// Block (on a condvar) until every expert is in RAM; returns the RAM slot of each key, in
    /// order. The pins taken by request() now belong to the caller: release() each key once.
    /// With a timeout, fails with [`StoreError::Timeout`] instead of waiting forever (e.g. when
    /// every slot is pinned by experts nobody releases).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Vec<usize>> {
        if self.done {
            return Err(StoreError::InvalidArgument(
                "this ticket was already waited on".into(),
            ));
        }
        let sh = self.sh.clone();
        let t0 = Instant::now();
        let mut g = sh.lock();
        let mut blocked = false;
        let res = loop {
            if let Some((msg, failed)) = g.ticket_errors.remove(&self.id) {
                let others: Vec<Key> = self
                    .distinct
                    .iter()
                    .copied()
                    .filter(|k| !failed.contains(k))
                    .collect();
                self.done = true;
                sh.forget_ticket(&mut g, self.id, &others);
                let _ = sh.release_locked(&mut g, &others);
                break Err(StoreError::Corrupt(msg));
            }
            if g.closed {
                self.done = true;
                break Err(StoreError::Closed);
            }
            let slots: Option<Vec<usize>> = self
                .distinct
                .iter()
                .map(|&k| self.slot_ready(&g, k))
                .collect();
            if let Some(slots) = slots {
                let map: HashMap<Key, usize> = self.distinct.iter().copied().zip(slots).collect();
                self.done = true;
                break Ok(self.keys.iter().map(|k| map[k]).collect());
            }
            if let Some((message, errno)) = g.write_error.clone() {
                // A failed write-back can block evictions; tell the caller rather than hang.
                if g.pending.values().any(|p| p.demand) && g.inflight_chunks == 0 {
                    break Err(StoreError::WriteBack { message, errno });
                }
            }
            blocked = true;
            match timeout {
                None => g = sh.cv.wait(g).unwrap(),
                Some(t) => {
                    let left = t.checked_sub(t0.elapsed());
                    let Some(left) = left else {
                        let pinned = g.pool.pinned();
                        break Err(StoreError::Timeout(format!(
                            "waited {:.1}s for {} experts; {pinned} of {} RAM slots are pinned. If every slot is \
                             pinned, release experts you are done with (store.release) or raise ram_bytes",
                            t.as_secs_f64(),
                            self.distinct.len(),
                            sh.ram_slots
                        )));
                    };
                    g = sh.cv.wait_timeout(g, left).unwrap().0;
                }
            }
        };
        if blocked {
            g.m.stall_s += t0.elapsed().as_secs_f64();
        }
        res
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            let sh = self.sh.clone();
            let mut g = sh.lock();
            let failed = g
                .ticket_errors
                .remove(&self.id)
                .map(|e| e.1)
                .unwrap_or_default();
            let keys: Vec<Key> = self
                .distinct
                .iter()
                .copied()
                .filter(|k| !failed.contains(k))
                .collect();
            sh.forget_ticket(&mut g, self.id, &keys);
            let _ = sh.release_locked(&mut g, &keys);
        }
    }
}
