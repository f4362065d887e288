//! The load queue: which pending load gets which RAM slot, and when.

use super::io::JobPriority;
use super::pool::Need;
use super::slots::{SlotInfo, SlotState};
use super::{Inner, Key, Shared};
use std::sync::{Arc, MutexGuard};

#[derive(PartialEq, Eq, Debug)]
pub(super) struct HeapItem {
    pub(super) prio: JobPriority,
    pub(super) key: Key,
}
impl Ord for HeapItem {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.prio.cmp(&o.prio)
    }
}
impl PartialOrd for HeapItem {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Inner {
    /// Queue the read of `key`: demand reads (class 1) before prefetches (class 0), then by
    /// priority, then first come first served.
    pub(super) fn queue_read(&mut self, key: Key, demand: bool, priority: i64) {
        let prio = JobPriority {
            class: demand as u8,
            priority,
            seq: self.next_seq(),
        };
        self.heap.push(HeapItem { prio, key });
    }

    pub(super) fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq - 1
    }
}

impl Shared {
    /// Start as many pending loads as the queue depth and the free/evictable slots allow.
    pub(super) fn schedule(self: &Arc<Self>, g: &mut MutexGuard<'_, Inner>) {
        loop {
            if g.closed || g.inflight_read_chunks >= self.read_depth {
                return;
            }
            let Some(top) = g.heap.peek() else { return };
            let key = top.key;
            let class = top.prio.class;
            let stale = match g.pending.get(&key) {
                None => true,
                Some(p) => p.flushing_into.is_some() || (p.demand as u8) != class,
            };
            if stale {
                g.heap.pop();
                continue;
            }
            let p = &g.pending[&key];
            let need = if p.demand {
                Need::Demand
            } else {
                Need::Prefetch(p.priority)
            };
            let inner = &**g;
            let (slots, pool) = (&inner.slots, &inner.pool);
            // While committing (or after a failed write) dirty records stay put: no write-back
            // may race the index. Nor may one start where no record slot is free.
            let held = inner.committing || inner.write_error.is_some();
            let writable = |s: usize| pool.key_of(s).is_some_and(|k| self.writable(inner, k));
            let Some(v) = pool.victim(need, |s| !slots[s].dirty || (!held && writable(s))) else {
                if !held && pool.victim(need, |_| true).is_some() {
                    // Only dirty records without a free slot stand in the way.
                    self.start_interim_commit(g);
                }
                return;
            };
            g.heap.pop();
            if g.slots[v].dirty {
                self.start_writeback(g, v, Some(key));
                g.pending.get_mut(&key).unwrap().flushing_into = Some(v);
            } else {
                self.start_load(g, v, key);
            }
        }
    }

    /// Put pending `key` into (clean, unpinned) slot `v` and start reading the sections asked for.
    pub(super) fn start_load(self: &Arc<Self>, g: &mut MutexGuard<'_, Inner>, v: usize, key: Key) {
        let p = g.pending.remove(&key).expect("pending load");
        let prefetch = if p.demand { None } else { Some(p.priority) };
        let was_prefetched = g.pool.key_of(v).is_some() && g.pool.is_prefetched(v);
        // +1: the read itself pins the slot until it completes.
        if g.pool.assign(v, key, p.pins + 1, prefetch).is_some() {
            g.m.evictions += 1;
            if was_prefetched {
                g.m.prefetch_wasted += 1;
            }
        }
        let info = &mut g.slots[v];
        *info = SlotInfo {
            state: SlotState::Loading,
            dirty_gen: info.dirty_gen,
            tickets: p.tickets,
            want: p.sections,
            want_demand: p.demand,
            want_priority: p.priority,
            ..SlotInfo::empty()
        };
        self.start_read(g, v, key, p.sections, p.demand, p.priority);
    }
}
