//! What callers ask of the store: requests, prefetches, pins, releases, dirty marks.

use super::slots::{Pending, SlotState};
use super::{key_str, ExpertStore, Key, Result, Sections, StoreError, Ticket};
use std::collections::HashSet;

impl ExpertStore {
    /// Ask for experts' whole records; never blocks on I/O. Pins the experts for the caller
    /// (the pins pass to the caller at wait()). Duplicate keys count once.
    ///
    /// A resident key is pinned at once, the others as slots free up, so requests from several
    /// threads must together pin at most the RAM slots; otherwise each can hold part of what
    /// it asked for while waiting on the others (a timed wait then fails with Timeout).
    pub fn request(&self, keys: &[Key], priority: i64) -> Result<Ticket> {
        self.request_sections(keys, priority, Sections::ALL)
    }

    /// Ask for some sections of experts' records (e.g. only the weights for forward): only the
    /// sections the RAM slot lacks are read, and wait() returns once they are valid. The slot
    /// keeps what it held; [`Self::slot_sections`] tells which sections a slot holds.
    pub fn request_sections(
        &self,
        keys: &[Key],
        priority: i64,
        sections: Sections,
    ) -> Result<Ticket> {
        let sh = &self.sh;
        let secs = sh.norm(sections);
        let mut distinct = Vec::with_capacity(keys.len());
        let mut seen = HashSet::new();
        for &k in keys {
            sh.geom.check_key(k.0 as usize, k.1 as usize)?;
            if seen.insert(k) {
                distinct.push(k);
            }
        }
        if distinct.len() > sh.ram_slots {
            return Err(StoreError::InvalidArgument(format!(
                "one request asks for {} distinct experts but the RAM tier has only {} slots ({} bytes / {} \
                 per record); split the request or raise ram_bytes",
                distinct.len(),
                sh.ram_slots,
                sh.opts.ram_bytes,
                sh.geom.layout.record_bytes
            )));
        }
        let mut g = sh.lock();
        if g.closed {
            return Err(StoreError::Closed);
        }
        let id = g.next_ticket;
        g.next_ticket += 1;
        for &k in &distinct {
            let inner = &mut *g;
            if let Some(s) = inner.pool.lookup(k) {
                let prefetched = inner.pool.is_prefetched(s);
                inner.pool.pin(s);
                inner.pool.touch(s);
                if prefetched {
                    inner.m.prefetch_hits += 1;
                }
                let info = &mut inner.slots[s];
                let missing = secs.minus(info.valid);
                match info.state {
                    SlotState::Loading => {
                        inner.m.hits += 1;
                        if !missing.is_empty() {
                            info.tickets.push((id, secs));
                            info.want = info.want.union(secs);
                            info.want_demand = true;
                            info.want_priority = info.want_priority.max(priority);
                        }
                    }
                    SlotState::Flushing => {
                        inner.m.hits += 1;
                        // Rescue: the record was being written back to make room; keep it instead.
                        if let Some(other) = info.evict_for.take() {
                            if let Some(p) = inner.pending.get_mut(&other) {
                                p.flushing_into = None;
                                let (demand, priority) = (p.demand, p.priority);
                                inner.queue_read(other, demand, priority);
                            }
                        }
                    }
                    SlotState::Ready | SlotState::Empty => {
                        if missing.is_empty() {
                            inner.m.hits += 1;
                        } else {
                            // Resident, but without a section this request needs: read just that.
                            inner.m.misses += 1;
                            info.tickets.push((id, secs));
                            sh.start_section_read(&mut g, s, secs, true, priority);
                        }
                    }
                }
            } else if let Some(p) = inner.pending.get_mut(&k) {
                p.pins += 1;
                p.tickets.push((id, secs));
                p.sections = p.sections.union(secs);
                inner.m.misses += 1;
                if !p.demand {
                    inner.m.prefetch_hits += 1;
                    p.demand = true;
                    if p.flushing_into.is_none() {
                        let priority = priority.max(p.priority);
                        inner.queue_read(k, true, priority);
                    }
                }
            } else {
                inner.m.misses += 1;
                inner.pending.insert(
                    k,
                    Pending {
                        pins: 1,
                        demand: true,
                        priority,
                        sections: secs,
                        tickets: vec![(id, secs)],
                        flushing_into: None,
                    },
                );
                inner.queue_read(k, true, priority);
            }
        }
        sh.schedule(&mut g);
        drop(g);
        Ok(Ticket {
            sh: sh.clone(),
            id,
            keys: keys.to_vec(),
            distinct,
            sections: secs,
            done: false,
        })
    }

    /// Best-effort read-ahead of whole records; lower priority than any request. Does not pin.
    pub fn prefetch(&self, keys: &[Key], priority: i64) -> Result<()> {
        self.prefetch_sections(keys, priority, Sections::ALL)
    }

    /// Best-effort read-ahead of some sections (only those a resident slot lacks are read).
    pub fn prefetch_sections(&self, keys: &[Key], priority: i64, sections: Sections) -> Result<()> {
        let sh = &self.sh;
        let secs = sh.norm(sections);
        let mut g = sh.lock_open(keys)?;
        for &k in keys {
            let inner = &mut *g;
            if let Some(s) = inner.pool.lookup(k) {
                let info = &mut inner.slots[s];
                let missing = secs.minus(info.valid);
                if missing.is_empty() {
                    continue;
                }
                match info.state {
                    SlotState::Loading => info.want = info.want.union(secs),
                    SlotState::Ready | SlotState::Empty => {
                        inner.m.prefetches += 1;
                        sh.start_section_read(&mut g, s, secs, false, priority);
                    }
                    SlotState::Flushing => {}
                }
                continue;
            }
            if let Some(p) = inner.pending.get_mut(&k) {
                p.sections = p.sections.union(secs);
                continue;
            }
            inner.m.prefetches += 1;
            inner.pending.insert(
                k,
                Pending {
                    pins: 0,
                    demand: false,
                    priority,
                    sections: secs,
                    tickets: vec![],
                    flushing_into: None,
                },
            );
            inner.queue_read(k, false, priority);
        }
        sh.schedule(&mut g);
        Ok(())
    }

    /// Pin, without reading anything, those of `keys` whose RAM records already hold valid
    /// `sections` (and are not being written back to make room): the slot of each, or `None`
    /// where a read would be needed. For moving records on to the next tier ahead of use (a
    /// GPU prefetch): no read is queued and nothing counts as a hit or miss. Release each
    /// `Some` once.
    pub fn pin_resident(&self, keys: &[Key], sections: Sections) -> Result<Vec<Option<usize>>> {
        let sh = &self.sh;
        let secs = sh.norm(sections);
        let mut g = sh.lock_open(keys)?;
        Ok(keys
            .iter()
            .map(|&k| {
                let s = g.pool.lookup(k)?;
                let info = &g.slots[s];
                let usable = info.state != SlotState::Flushing && secs.minus(info.valid).is_empty();
                usable.then(|| {
                    g.pool.pin(s);
                    s
                })
            })
            .collect())
    }

    /// The router predicted these experts but the real routing did not use them: cancel their
    /// prefetch reads that have not started, and make their unused prefetched RAM records the
    /// first to be evicted. Returns how many of the keys were demoted or cancelled.
    pub fn demote_prefetched(&self, keys: &[Key]) -> Result<usize> {
        let mut g = self.sh.lock_open(keys)?;
        let mut n = 0;
        for &k in keys {
            if let Some(s) = g.pool.lookup(k) {
                if g.pool.pins(s) == 0 && g.pool.demote(s) {
                    n += 1;
                }
            } else if g
                .pending
                .get(&k)
                .is_some_and(|p| !p.demand && p.pins == 0 && p.flushing_into.is_none())
            {
                // Its heap entry goes stale and is skipped by schedule().
                g.pending.remove(&k);
                g.m.prefetch_cancelled += 1;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The sections valid in RAM slot `slot` (sections without bytes count as valid; an empty
    /// slot has none). Only valid sections may be used; they stay valid while the slot is pinned.
    pub fn slot_sections(&self, slot: usize) -> Result<Sections> {
        if slot >= self.sh.ram_slots {
            return Err(StoreError::InvalidArgument(format!(
                "RAM slot {slot} out of range (the store has {})",
                self.sh.ram_slots
            )));
        }
        let g = self.sh.lock();
        Ok(if g.pool.key_of(slot).is_some() {
            g.slots[slot]
                .valid
                .union(Sections::ALL.minus(self.sh.geom.layout.nonempty()))
        } else {
            Sections::NONE
        })
    }

    /// Unpin experts (once per wait()). Duplicate keys count once.
    pub fn release(&self, keys: &[Key]) -> Result<()> {
        let mut seen = HashSet::new();
        let distinct: Vec<Key> = keys.iter().copied().filter(|k| seen.insert(*k)).collect();
        self.sh.release(&distinct)
    }

    /// The RAM records of these experts were changed: write them back before eviction.
    pub fn mark_dirty(&self, keys: &[Key]) -> Result<()> {
        self.mark_dirty_filled(keys, Sections::NONE)
    }

    /// [`Self::mark_dirty`] for a caller that has also overwritten the `filled` sections of the
    /// records completely (e.g. an AdamW writing the new weights from the master copy), so they
    /// count as valid even if they were never read: backward then reads only the state.
    pub fn mark_dirty_filled(&self, keys: &[Key], filled: Sections) -> Result<()> {
        let mut g = self.sh.lock();
        for &k in keys {
            let s = g.pool.lookup(k).filter(|&s| g.pool.pins(s) > 0).ok_or_else(|| {
                StoreError::InvalidArgument(format!(
                    "mark_dirty of {}, which is not pinned in RAM; mark an expert dirty between wait() and release()",
                    key_str(k)
                ))
            })?;
            let full = self.sh.geom.layout.nonempty();
            let info = &mut g.slots[s];
            if info.valid.is_empty() {
                return Err(StoreError::InvalidArgument(format!(
                    "mark_dirty of {} before its read finished; call ticket.wait() first",
                    key_str(k)
                )));
            }
            if !filled.is_empty() {
                if info.state == SlotState::Loading {
                    return Err(StoreError::InvalidArgument(format!(
                        "mark_dirty of {} with the {} section filled while a read into its RAM slot \
                         is running; wait for the requested sections first",
                        key_str(k),
                        filled.name()
                    )));
                }
                info.valid = info.valid.union(filled);
                info.want = info.want.minus(filled);
            }
            if !info.valid.contains(full) {
                return Err(StoreError::InvalidArgument(format!(
                    "mark_dirty of {}, whose RAM slot holds only its {} section: a write-back \
                     writes the whole record, so request the whole record (sections=\"all\") or \
                     its {} section, and wait for it, before changing it",
                    key_str(k),
                    info.valid.name(),
                    full.minus(info.valid).name()
                )));
            }
            info.dirty = true;
            info.dirty_gen += 1;
        }
        Ok(())
    }

    /// Copy an expert's record out (request, wait, copy, release).
    pub fn read_record(&self, layer: usize, expert: usize) -> Result<Vec<u8>> {
        let k = (layer as u32, expert as u32);
        let slots = self.request(&[k], 0)?.wait(None)?;
        let out = unsafe { self.slot_bytes(slots[0]) }.to_vec();
        self.release(&[k])?;
        Ok(out)
    }

    /// Replace an expert's record (through RAM; written back on eviction, flush or commit).
    pub fn write_record(&self, layer: usize, expert: usize, data: &[u8]) -> Result<()> {
        let rb = self.sh.geom.layout.record_bytes;
        if data.len() != rb {
            return Err(StoreError::InvalidArgument(format!(
                "record for (layer {layer}, expert {expert}) is {} bytes; this store's records are {rb} bytes \
                 (see tensor_layout())",
                data.len()
            )));
        }
        let k = (layer as u32, expert as u32);
        let slots = self.request(&[k], 0)?.wait(None)?;
        unsafe { self.slot_bytes(slots[0]) }.copy_from_slice(data);
        let r = self.mark_dirty(&[k]);
        self.release(&[k])?;
        r
    }
}
