//! Slot accounting shared by the RAM tier (inside [`super::ExpertStore`]) and the GPU tier
//! (inside [`super::gpu`]): a fixed number of slots, a key -> slot map, pin counts, and the
//! eviction policy: LRU refined by prefetch priority, pinned slots never evicted.

use crate::error::{Result, StoreError};
use std::collections::HashMap;

/// An expert: (layer, expert).
pub type Key = (u32, u32);

#[derive(Clone, Debug, Default)]
struct Slot {
    key: Option<Key>,
    pins: u32,
    last_use: u64,
    /// Set while the slot holds a prefetched expert nobody has used yet: it is protected from
    /// LRU eviction by prefetches of lower or equal priority, and evicted by demand last.
    prefetch_priority: Option<i64>,
}

/// A victim choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// A demand request: may evict any unpinned slot.
    Demand,
    /// A prefetch of this priority: may not evict a prefetched, unused slot of higher or equal priority.
    Prefetch(i64),
}

/// What [`SlotPool::take`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The slot now holding the key.
    pub slot: usize,
    /// The key was there already.
    pub hit: bool,
    /// The key the slot held before (a miss that evicted).
    pub evicted: Option<Key>,
    /// The slot held an unused prefetch before: the key's own on a hit, the evicted one's on
    /// a miss.
    pub was_prefetched: bool,
}

/// Fixed-size slot pool.
#[derive(Clone, Debug)]
pub struct SlotPool {
    slots: Vec<Slot>,
    map: HashMap<Key, usize>,
    clock: u64,
}

impl SlotPool {
    /// A pool of `num_slots` empty slots.
    pub fn new(num_slots: usize) -> SlotPool {
        SlotPool {
            slots: vec![Slot::default(); num_slots],
            map: HashMap::new(),
            clock: 0,
        }
    }
    /// Number of slots.
    pub fn num_slots(&self) -> usize {
        self.slots.len()
    }
    /// Slot holding `key`, if any.
    pub fn lookup(&self, key: Key) -> Option<usize> {
        self.map.get(&key).copied()
    }
    /// Key held by `slot`.
    pub fn key_of(&self, slot: usize) -> Option<Key> {
        self.slots[slot].key
    }
    /// Pin count of `slot`.
    pub fn pins(&self, slot: usize) -> u32 {
        self.slots[slot].pins
    }
    /// Slots holding a key.
    pub fn resident(&self) -> usize {
        self.map.len()
    }
    /// Slots with at least one pin.
    pub fn pinned(&self) -> usize {
        self.slots.iter().filter(|s| s.pins > 0).count()
    }
    /// Whether `slot` holds a prefetched expert not used since.
    pub fn is_prefetched(&self, slot: usize) -> bool {
        self.slots[slot].prefetch_priority.is_some()
    }
    /// Add a pin.
    pub fn pin(&mut self, slot: usize) {
        self.slots[slot].pins += 1;
    }
    /// Remove a pin; errors when the slot has none.
    pub fn unpin(&mut self, slot: usize) -> Result<()> {
        let s = &mut self.slots[slot];
        if s.pins == 0 {
            let k = s
                .key
                .map(|k| format!("(layer {}, expert {})", k.0, k.1))
                .unwrap_or("an empty slot".into());
            return Err(StoreError::InvalidArgument(format!(
                "release of {k}, which is not pinned: every wait()/acquire() pins once and needs exactly one release"
            )));
        }
        s.pins -= 1;
        Ok(())
    }
    /// Mark `slot` as used now (a demand use ends prefetch protection).
    pub fn touch(&mut self, slot: usize) {
        self.clock += 1;
        self.slots[slot].last_use = self.clock;
        self.slots[slot].prefetch_priority = None;
    }
    /// A prefetched guess turned out wrong: drop its protection and make it the first slot
    /// LRU evicts. Returns whether `slot` held an unused prefetch.
    pub fn demote(&mut self, slot: usize) -> bool {
        let s = &mut self.slots[slot];
        if s.key.is_none() || s.prefetch_priority.is_none() {
            return false;
        }
        s.prefetch_priority = None;
        s.last_use = 0;
        true
    }
    /// Choose the slot to (re)use for `need`, among slots `ok` accepts: an empty slot first, then
    /// the least recently used unprotected slot, then (demand only) prefetched slots by lowest
    /// priority, then LRU. Pinned slots are never chosen. `None` when nothing qualifies.
    pub fn victim(&self, need: Need, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<(usize, (u8, i64, u64))> = None;
        for (i, s) in self.slots.iter().enumerate() {
            if s.pins > 0 || !ok(i) {
                continue;
            }
            let rank = match (s.key, s.prefetch_priority) {
                (None, _) => (0u8, 0i64, 0u64),
                (Some(_), None) => (1, 0, s.last_use),
                (Some(_), Some(p)) => {
                    if let Need::Prefetch(q) = need {
                        if p >= q {
                            continue;
                        }
                    }
                    (2, p, s.last_use)
                }
            };
            if best.is_none_or(|(_, r)| rank < r) {
                best = Some((i, rank));
            }
        }
        best.map(|(i, _)| i)
    }
    /// Put `key` into `slot` with `pins` pins, returning the key it held before. A `prefetch`
    /// priority marks the slot as prefetched and unused.
    pub fn assign(
        &mut self,
        slot: usize,
        key: Key,
        pins: u32,
        prefetch: Option<i64>,
    ) -> Option<Key> {
        let old = self.remove(slot);
        if let Some(prev) = self.map.insert(key, slot) {
            // A key lives in one slot at most; callers check lookup() first.
            debug_assert_eq!(prev, slot);
        }
        self.clock += 1;
        let s = &mut self.slots[slot];
        *s = Slot {
            key: Some(key),
            pins,
            last_use: self.clock,
            prefetch_priority: prefetch,
        };
        old
    }
    /// Empty `slot` (pins dropped), returning the key it held.
    pub fn remove(&mut self, slot: usize) -> Option<Key> {
        let s = std::mem::take(&mut self.slots[slot]);
        if let Some(k) = s.key {
            self.map.remove(&k);
        }
        s.key
    }

    /// Take a slot for `key` and pin it: returns (slot, hit, evicted key). A hit pins the slot
    /// that holds the key already. With `priority > 0` and `pin = false` the slot is filled as a
    /// prefetch: unpinned but protected from lower-priority prefetches.
    pub fn acquire(
        &mut self,
        key: Key,
        priority: i64,
        pin: bool,
    ) -> Result<(usize, bool, Option<Key>)> {
        self.take(key, priority, pin)
            .map(|t| (t.slot, t.hit, t.evicted))
    }

    /// [`Self::acquire`], also saying whether the slot held an unused prefetch before: the
    /// key's own (a hit on a prefetched copy) or the evicted key's (a wasted prefetch).
    pub fn take(&mut self, key: Key, priority: i64, pin: bool) -> Result<Taken> {
        if let Some(s) = self.lookup(key) {
            let was_prefetched = self.is_prefetched(s);
            if pin {
                self.pin(s);
                self.touch(s);
            }
            return Ok(Taken {
                slot: s,
                hit: true,
                evicted: None,
                was_prefetched,
            });
        }
        let need = if pin {
            Need::Demand
        } else {
            Need::Prefetch(priority)
        };
        let Some(v) = self.victim(need, |_| true) else {
            return Err(StoreError::AllPinned(format!(
                "no slot for (layer {}, expert {}): all {} slots are pinned{}; release experts you \
                 are done with, or give the tier a larger budget",
                key.0,
                key.1,
                self.num_slots(),
                if pin { "" } else { " or hold higher-priority prefetches" }
            )));
        };
        let was_prefetched = self.is_prefetched(v);
        let evicted = self.assign(v, key, pin as u32, if pin { None } else { Some(priority) });
        Ok(Taken {
            slot: v,
            hit: false,
            evicted,
            was_prefetched: was_prefetched && evicted.is_some(),
        })
    }
    /// Unpin the slot of `key`.
    pub fn release(&mut self, key: Key) -> Result<()> {
        match self.lookup(key) {
            Some(s) => self.unpin(s),
            None => Err(StoreError::InvalidArgument(format!(
                "release of (layer {}, expert {}), which is not in this pool",
                key.0, key.1
            ))),
        }
    }
    /// Forget `key` (its data is stale); returns whether it was resident. Pins are dropped.
    pub fn invalidate(&mut self, key: Key) -> bool {
        match self.lookup(key) {
            Some(s) => {
                self.remove(s);
                true
            }
            None => false,
        }
    }
}
