//! The GPU tier's accounting, with no CUDA in it: which expert each GPU slot holds, its pins and
//! the eviction policy (a [`SlotPool`], the RAM tier's policy), the copies in flight into the
//! slots and the RAM pins they hold, stale and prefetched copies, and what each acquire pinned.
//!
//! It lives in the store's bookkeeping, under the store's one mutex, so that a finished copy
//! ([`GpuSlots::copy_done`], called by a CUDA host function queued on the copy stream after the
//! copy, see [`copy_done_host_fn`], or by the CPU emulation when it runs the copy) drops the RAM
//! pins the copy held and wakes the store's waiters on the condvar they already sleep on: a
//! request blocked on a full RAM tier goes on as soon as the copies holding its slots are over,
//! and nothing polls.
//!
//! The caller (Python's `GpuTier`) issues the copies and keeps the device's objects (the arena,
//! the streams, the events that order the device's work); every question of state comes here.
//!
//! A GPU slot is [`GpuSlotState::Free`], `Copying` (its last copy is in flight), `Ready`, `Stale`
//! (the RAM record changed while the slot was pinned: dropped at its last release) or
//! `Prefetched` (copied ahead of use and not used since: protected from lower-priority
//! prefetches, and the first evicted once demoted). The RAM record feeding a copy stays pinned
//! until the copy is done: an acquire's RAM pin passes, at release, to the last copy into its
//! slot (dropped at once when that copy is over), a prefetch's RAM pin to its own copy.

use super::pool::Taken;
use super::{key_str, ExpertStore, Key, Result, Shared, SlotPool, StoreError};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A copy into a GPU slot, named when it is started and reported done once.
pub type CopyId = u64;

/// What a GPU slot holds now (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuSlotState {
    /// No expert.
    Free,
    /// An expert whose last copy into the slot is in flight.
    Copying,
    /// A current copy of an expert's weights.
    Ready,
    /// An outdated copy, still pinned: dropped at its last release.
    Stale,
    /// A prefetched copy nobody has used yet.
    Prefetched,
}

/// What [`GpuSlots::acquire`] did on an active tier: the GPU slot, and the copy the caller must
/// issue into it (from the RAM slot it gave) when the tier did not hold a current copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acquired {
    /// The GPU slot holding the expert, pinned.
    pub slot: usize,
    /// The copy to issue into `slot`, then report with [`GpuSlots::copy_done`].
    pub copy: Option<CopyId>,
}

/// What [`GpuSlots::prefetch`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// Issue `copy` into `slot`; the RAM pin passed to the copy.
    Copied {
        /// The GPU slot taken (unpinned, protected as a prefetch).
        slot: usize,
        /// The copy to issue and report done.
        copy: CopyId,
    },
    /// The tier holds the expert already; the RAM pin was dropped.
    Held,
    /// Not now (prefetch copies still running, too few slots to spare, or none evictable);
    /// the RAM pin was dropped.
    Busy,
}

/// Counters of the GPU tier; see [`GpuSlots::metrics`].
#[derive(Clone, Debug, Default)]
pub struct GpuMetrics {
    /// Uses that found a current copy on the tier.
    pub hits: u64,
    /// Uses that needed a copy.
    pub misses: u64,
    /// Prefetch copies started.
    pub prefetch_copies: u64,
    /// Uses of a prefetched copy.
    pub prefetch_hits: u64,
    /// Prefetched copies evicted before any use.
    pub prefetch_wasted: u64,
    /// Prefetched copies demoted (wrong guesses).
    pub prefetch_demoted: u64,
    /// Copies started and not yet reported done.
    pub copies_in_flight: u64,
}

#[derive(Clone, Debug, Default)]
struct GpuSlot {
    stale: bool,
    /// The last copy into the slot, while it is in flight.
    copy: Option<CopyId>,
}

/// A copy in flight: the expert it copies and the RAM pins of that expert it holds.
#[derive(Debug)]
struct Copy {
    key: Key,
    slot: usize,
    ram_pins: u32,
}

/// The acquires of one expert not yet released, newest last: bit `i` of `ram` says whether the
/// `i`-th pinned the RAM record (a release undoes the newest).
#[derive(Debug)]
struct Acquires {
    depth: u32,
    ram: u64,
    ram_slot: usize,
}

const MAX_DEPTH: u32 = u64::BITS;

/// The GPU tier's state, inside the store's bookkeeping. With no slots (no GPU tier) it still
/// records the acquires, whose RAM pins a release then drops at once.
#[derive(Debug)]
pub(super) struct GpuState {
    configured: bool,
    pool: SlotPool,
    slots: Vec<GpuSlot>,
    copies: HashMap<CopyId, Copy>,
    next_copy: CopyId,
    acquired: HashMap<Key, Acquires>,
    m: GpuMetrics,
}

impl Default for GpuState {
    fn default() -> Self {
        GpuState::new(0)
    }
}

impl GpuState {
    fn new(num_slots: usize) -> GpuState {
        GpuState {
            configured: false,
            pool: SlotPool::new(num_slots),
            slots: vec![GpuSlot::default(); num_slots],
            copies: HashMap::new(),
            next_copy: 0,
            acquired: HashMap::new(),
            m: GpuMetrics::default(),
        }
    }

    fn active(&self) -> bool {
        !self.slots.is_empty()
    }

    fn current(&self, key: Key) -> Option<usize> {
        self.pool.lookup(key).filter(|&s| !self.slots[s].stale)
    }

    fn check_depth(&self, key: Key) -> Result<()> {
        match self.acquired.get(&key) {
            Some(a) if a.depth >= MAX_DEPTH => Err(StoreError::InvalidArgument(format!(
                "{} is acquired {MAX_DEPTH} times without a release; release each acquire once",
                key_str(key)
            ))),
            _ => Ok(()),
        }
    }

    /// Record an acquire of `key`; `ram_slot`: the RAM record it pinned, if any.
    fn push_acquire(&mut self, key: Key, ram_slot: Option<usize>) {
        let a = self.acquired.entry(key).or_insert(Acquires {
            depth: 0,
            ram: 0,
            ram_slot: 0,
        });
        if let Some(s) = ram_slot {
            a.ram |= 1 << a.depth;
            a.ram_slot = s;
        }
        a.depth += 1;
    }

    /// Undo the newest acquire of `key`: whether it pinned the RAM record (`None`: not acquired).
    fn pop_acquire(&mut self, key: Key) -> Option<bool> {
        let a = self.acquired.get_mut(&key)?;
        a.depth -= 1;
        let bit = 1u64 << a.depth;
        let ram = a.ram & bit != 0;
        a.ram &= !bit;
        if a.depth == 0 {
            self.acquired.remove(&key);
        }
        Some(ram)
    }

    fn count_use(&mut self, t: &Taken) {
        if t.hit {
            self.m.hits += 1;
            self.m.prefetch_hits += t.was_prefetched as u64;
        } else {
            self.m.misses += 1;
            self.m.prefetch_wasted += t.was_prefetched as u64;
        }
    }

    fn start_copy(&mut self, slot: usize, key: Key, ram_pins: u32) -> CopyId {
        let id = self.next_copy;
        self.next_copy += 1;
        self.copies.insert(
            id,
            Copy {
                key,
                slot,
                ram_pins,
            },
        );
        self.slots[slot] = GpuSlot {
            stale: false,
            copy: Some(id),
        };
        id
    }

    /// (pinned, prefetched, prefetched with their copy in flight) slots.
    fn census(&self) -> (usize, usize, usize) {
        let (mut pinned, mut prefetched, mut running) = (0, 0, 0);
        for (s, info) in self.slots.iter().enumerate() {
            pinned += (self.pool.pins(s) > 0) as usize;
            if self.pool.is_prefetched(s) {
                prefetched += 1;
                running += info.copy.is_some() as usize;
            }
        }
        (pinned, prefetched, running)
    }

    fn can_prefetch(&self, max_in_flight: usize, reserve: usize) -> bool {
        if !self.active() {
            return false;
        }
        let (pinned, prefetched, running) = self.census();
        running < max_in_flight && self.slots.len() - pinned - prefetched > reserve
    }

    /// Drop one GPU pin of `key`: its slot, and whether the RAM pin `ram_pinned` says it holds
    /// is to be dropped now (else the slot's copy in flight holds it until it is done).
    fn release_one(&mut self, key: Key, ram_pinned: bool) -> Result<(Option<usize>, bool)> {
        if !self.active() {
            return Ok((None, ram_pinned));
        }
        let s = self.pool.lookup(key).ok_or_else(|| {
            StoreError::InvalidArgument(format!(
                "release of {}, which is not on the GPU tier",
                key_str(key)
            ))
        })?;
        self.pool.unpin(s)?;
        if self.slots[s].stale && self.pool.pins(s) == 0 {
            self.slots[s].stale = false;
            self.pool.remove(s);
        }
        let mut now = ram_pinned;
        if ram_pinned {
            if let Some(c) = self.slots[s].copy {
                self.copies
                    .get_mut(&c)
                    .expect("a slot's copy in flight")
                    .ram_pins += 1;
                now = false;
            }
        }
        Ok((Some(s), now))
    }
}

/// The GPU tier's accounting of one open store (see the module's documentation). Every method
/// takes the store's lock for the length of the call; none waits but [`Self::wait_copies`].
pub struct GpuSlots {
    sh: Arc<Shared>,
}

impl ExpertStore {
    /// The GPU tier's accounting for this store, with `num_slots` weight slots; with 0 (no GPU
    /// tier) it still records acquires and their RAM pins. Once per open store.
    pub fn gpu_slots(&self, num_slots: usize) -> Result<GpuSlots> {
        let mut g = self.sh.lock();
        if g.closed {
            return Err(StoreError::Closed);
        }
        if g.gpu.configured {
            return Err(StoreError::InvalidArgument(
                "this store has its GPU tier already (one per open store)".into(),
            ));
        }
        g.gpu = GpuState::new(num_slots);
        g.gpu.configured = true;
        Ok(GpuSlots {
            sh: self.sh.clone(),
        })
    }
}

impl GpuSlots {
    /// Weight slots of the tier (0: no GPU tier).
    pub fn num_slots(&self) -> usize {
        self.sh.lock().gpu.slots.len()
    }

    /// An acquire of `key`, whose RAM record the caller pinned in `ram_slot` (the pin passes to
    /// the tier until [`Self::release`]): on an active tier, the GPU slot (pinned) and the copy to
    /// issue into it when the tier lacks a current copy; `None` without a GPU tier. `need_hit`:
    /// the RAM slot lacks the weights, so the tier must hold them (else an error, and nothing
    /// changes).
    pub fn acquire(&self, key: Key, ram_slot: usize, need_hit: bool) -> Result<Option<Acquired>> {
        let mut g = self.sh.lock();
        let gpu = &mut g.gpu;
        gpu.check_depth(key)?;
        let got = if gpu.active() {
            if need_hit && gpu.current(key).is_none() {
                return Err(StoreError::InvalidArgument(format!(
                    "{}: its weights are neither on the GPU tier nor in its RAM slot",
                    key_str(key)
                )));
            }
            let t = gpu.pool.take(key, 0, true)?;
            let stale = t.hit && gpu.slots[t.slot].stale;
            // A stale copy still pinned by an earlier acquire is copied again from the record.
            gpu.count_use(&Taken {
                hit: t.hit && !stale,
                ..t
            });
            let copy = (!t.hit || stale).then(|| gpu.start_copy(t.slot, key, 0));
            Some(Acquired { slot: t.slot, copy })
        } else {
            None
        };
        gpu.push_acquire(key, Some(ram_slot));
        Ok(got)
    }

    /// Acquire, without their RAM records, those of `keys` (at most `limit`) whose current
    /// weights the tier holds: (position in `keys`, GPU slot) of each, pinned.
    pub fn acquire_resident(&self, keys: &[Key], limit: usize) -> Result<Vec<(usize, usize)>> {
        let mut g = self.sh.lock();
        let gpu = &mut g.gpu;
        let mut out = Vec::new();
        for (i, &k) in keys.iter().enumerate() {
            if out.len() >= limit {
                break;
            }
            if gpu.current(k).is_none() {
                continue;
            }
            gpu.check_depth(k)?;
            let t = gpu.pool.take(k, 0, true)?;
            gpu.count_use(&t);
            gpu.push_acquire(k, None);
            out.push((i, t.slot));
        }
        Ok(out)
    }

    /// Release one acquire per key (the newest of each): its GPU pin, and the RAM pin it took,
    /// which the copy in flight into its slot holds until done. Keys not acquired are plain
    /// RAM releases (duplicates of those count once, as in [`ExpertStore::release`]). Returns
    /// the GPU slots released, for the caller to mark when the device has finished reading
    /// them.
    pub fn release(&self, keys: &[Key]) -> Result<Vec<usize>> {
        let sh = &self.sh;
        let mut g = sh.lock();
        let (mut freed, mut ram, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        let mut first_err = None;
        for &k in keys {
            match g.gpu.pop_acquire(k) {
                None if !plain.contains(&k) => plain.push(k),
                None => {}
                Some(ram_pinned) => match g.gpu.release_one(k, ram_pinned) {
                    Ok((slot, now)) => {
                        freed.extend(slot);
                        if now {
                            ram.push(k);
                        }
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                },
            }
        }
        ram.extend(plain);
        let r = sh.release_locked(&mut g, &ram);
        match first_err {
            Some(e) => Err(e),
            None => r.map(|()| freed),
        }
    }

    /// Start a prefetch copy of `key`, whose RAM record (holding its weights) the caller
    /// pinned: into a free or evictable slot, unpinned and protected from prefetches of lower
    /// priority, while fewer than `max_in_flight` prefetch copies run and more than `reserve`
    /// slots stay neither pinned nor prefetched. Only [`Prefetch::Copied`] keeps the RAM pin.
    pub fn prefetch(
        &self,
        key: Key,
        priority: i64,
        max_in_flight: usize,
        reserve: usize,
    ) -> Result<Prefetch> {
        let sh = &self.sh;
        let mut g = sh.lock();
        let gpu = &mut g.gpu;
        let outcome = if gpu.active() && gpu.pool.lookup(key).is_some() {
            Prefetch::Held
        } else if !gpu.can_prefetch(max_in_flight, reserve) {
            Prefetch::Busy
        } else {
            match gpu.pool.take(key, priority, false) {
                Ok(t) => {
                    gpu.m.prefetch_wasted += t.was_prefetched as u64;
                    gpu.m.prefetch_copies += 1;
                    let copy = gpu.start_copy(t.slot, key, 1);
                    return Ok(Prefetch::Copied { slot: t.slot, copy });
                }
                // Every slot pinned or holding a prefetch of higher priority.
                Err(StoreError::AllPinned(_)) => Prefetch::Busy,
                Err(e) => return Err(e),
            }
        };
        sh.release_locked(&mut g, &[key])?;
        Ok(outcome)
    }

    /// Whether a prefetch copy may start now (see [`Self::prefetch`]).
    pub fn can_prefetch(&self, max_in_flight: usize, reserve: usize) -> bool {
        self.sh.lock().gpu.can_prefetch(max_in_flight, reserve)
    }

    /// Wrong guesses: the unused prefetched copies of these experts become the first evicted.
    pub fn demote(&self, keys: &[Key]) {
        let mut g = self.sh.lock();
        let gpu = &mut g.gpu;
        for &k in keys {
            if let Some(s) = gpu.pool.lookup(k) {
                if gpu.pool.demote(s) {
                    gpu.m.prefetch_demoted += 1;
                }
            }
        }
    }

    /// Whether the tier holds a current copy of `key`'s weights.
    pub fn holds(&self, key: Key) -> bool {
        self.sh.lock().gpu.current(key).is_some()
    }

    /// The pinned RAM record of the acquired `key` changed: a copy of its new weights over its
    /// GPU copy (no longer stale) as (GPU slot, RAM slot, copy), to issue and report done; `None`
    /// when the tier holds no copy of it. An error when `key` is not acquired with its RAM record.
    pub fn refresh(&self, key: Key) -> Result<Option<(usize, usize, CopyId)>> {
        let mut g = self.sh.lock();
        let gpu = &mut g.gpu;
        let ram_slot = gpu
            .acquired
            .get(&key)
            .filter(|a| a.ram != 0)
            .map(|a| a.ram_slot)
            .ok_or_else(|| {
                StoreError::InvalidArgument(format!(
                    "mark_dirty(refresh_gpu=True) of {}, which is not acquire()d",
                    key_str(key)
                ))
            })?;
        let Some(s) = gpu.pool.lookup(key) else {
            return Ok(None);
        };
        Ok(Some((s, ram_slot, gpu.start_copy(s, key, 0))))
    }

    /// The RAM records of these experts changed: their GPU copies are stale (dropped now, or
    /// at the last release where pinned).
    pub fn invalidate(&self, keys: &[Key]) {
        let mut g = self.sh.lock();
        let gpu = &mut g.gpu;
        for &k in keys {
            if let Some(s) = gpu.pool.lookup(k) {
                if gpu.pool.pins(s) > 0 {
                    gpu.slots[s].stale = true;
                } else {
                    gpu.pool.remove(s);
                }
            }
        }
    }

    /// The RAM slot of the acquired `key`'s record, while an acquire of it holds the RAM pin.
    pub fn ram_slot(&self, key: Key) -> Option<usize> {
        let g = self.sh.lock();
        let a = g.gpu.acquired.get(&key)?;
        (a.ram != 0).then_some(a.ram_slot)
    }

    /// Copy `copy` is done: its RAM pins are dropped, and waiters (on RAM slots, on copies)
    /// wake.
    pub fn copy_done(&self, copy: CopyId) -> Result<()> {
        finish_copy(&self.sh, copy)
    }

    /// Block until every copy started has been reported done (without a timeout, for ever).
    pub fn wait_copies(&self, timeout: Option<Duration>) -> Result<()> {
        let t0 = Instant::now();
        let mut g = self.sh.lock();
        while !g.gpu.copies.is_empty() {
            g = match timeout {
                None => self.sh.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(t) => {
                    let Some(left) = t.checked_sub(t0.elapsed()) else {
                        return Err(StoreError::Timeout(format!(
                            "{} copies into the GPU tier not reported done after {:.1}s: each copy must \
                             be followed by copy_done (a host function on its stream)",
                            g.gpu.copies.len(),
                            t.as_secs_f64()
                        )));
                    };
                    self.sh
                        .cv
                        .wait_timeout(g, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        Ok(())
    }

    /// The state of GPU slot `slot`.
    pub fn state(&self, slot: usize) -> Result<GpuSlotState> {
        let g = self.sh.lock();
        let gpu = &g.gpu;
        if slot >= gpu.slots.len() {
            return Err(StoreError::InvalidArgument(format!(
                "GPU slot {slot} out of range (the tier has {})",
                gpu.slots.len()
            )));
        }
        let info = &gpu.slots[slot];
        Ok(if gpu.pool.key_of(slot).is_none() {
            GpuSlotState::Free
        } else if info.stale {
            GpuSlotState::Stale
        } else if info.copy.is_some() {
            GpuSlotState::Copying
        } else if gpu.pool.is_prefetched(slot) {
            GpuSlotState::Prefetched
        } else {
            GpuSlotState::Ready
        })
    }

    /// The slot holding `key` (current or stale), if any.
    pub fn lookup(&self, key: Key) -> Option<usize> {
        self.sh.lock().gpu.pool.lookup(key)
    }

    /// Slots pinned by acquires.
    pub fn pinned(&self) -> usize {
        self.sh.lock().gpu.census().0
    }

    /// Counters.
    pub fn metrics(&self) -> GpuMetrics {
        let g = self.sh.lock();
        GpuMetrics {
            copies_in_flight: g.gpu.copies.len() as u64,
            ..g.gpu.m.clone()
        }
    }

    /// The argument for [`copy_done_host_fn`] reporting `copy` done: give it to the host
    /// function launch, or back to [`drop_done_token`] if the launch fails.
    pub fn done_token(&self, copy: CopyId) -> *mut c_void {
        Box::into_raw(Box::new(DoneToken {
            sh: self.sh.clone(),
            copy,
        })) as *mut c_void
    }
}

fn finish_copy(sh: &Arc<Shared>, copy: CopyId) -> Result<()> {
    let mut g = sh.lock();
    let c = g.gpu.copies.remove(&copy).ok_or_else(|| {
        StoreError::InvalidArgument(format!(
            "copy {copy} into the GPU tier is not in flight (reported done twice?)"
        ))
    })?;
    let info = &mut g.gpu.slots[c.slot];
    if info.copy == Some(copy) {
        info.copy = None;
    }
    let pins = vec![c.key; c.ram_pins as usize];
    // Wakes every waiter, the RAM tier's and wait_copies' alike.
    sh.release_locked(&mut g, &pins)
}

/// What [`copy_done_host_fn`] needs: the store (kept alive until the copy is reported) and the
/// copy.
struct DoneToken {
    sh: Arc<Shared>,
    copy: CopyId,
}

/// A CUDA host function (`cudaHostFn_t`/`CUhostFn`) reporting a copy done: launch it on the copy
/// stream after the copy with a [`GpuSlots::done_token`] as its argument. It takes the store's
/// lock and updates state only (never calls CUDA, as a host function must not).
///
/// # Safety
/// `token` must come from [`GpuSlots::done_token`] and be passed here (or to
/// [`drop_done_token`]) once.
pub unsafe extern "C" fn copy_done_host_fn(token: *mut c_void) {
    let t = Box::from_raw(token as *mut DoneToken);
    // Nobody to report an error to: a copy unknown here is a bug wait_copies will time out on.
    let _ = finish_copy(&t.sh, t.copy);
}

/// Free a [`GpuSlots::done_token`] whose host function was never launched.
///
/// # Safety
/// As for [`copy_done_host_fn`].
pub unsafe fn drop_done_token(token: *mut c_void) {
    drop(Box::from_raw(token as *mut DoneToken));
}
