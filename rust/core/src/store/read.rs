//! Reads into RAM slots: submitting a record's chunks, verifying checksums, publishing the result.

use super::format::{crc_combine, Section};
use super::io::{record_chunks, record_io, Dir, IoDone, JobPriority, SendPtr};
use super::slots::{SlotInfo, SlotState};
use super::{Inner, Key, Read, Sections, Shared, Source, StoreError};
use std::sync::{Arc, MutexGuard};

impl Shared {
    /// Where the newest version of an expert lives on disk.
    pub(super) fn source(&self, g: &Inner, k: Key) -> Source {
        let flat = self.geom.flat(k.0 as usize, k.1 as usize);
        match g.latest.get(&flat) {
            Some(&(slot, crc, secs)) => Source {
                slot,
                crc,
                sections: Some(secs),
            },
            None => {
                let e = g.index.entry(flat);
                Source {
                    slot: e.slot,
                    crc: e.crc,
                    sections: e.sections,
                }
            }
        }
    }

    /// Resident, ready slot `v` lacks some of `secs`: read them into it (the slot stays assigned;
    /// requests wait for it as for a load).
    pub(super) fn start_section_read(
        self: &Arc<Self>,
        g: &mut MutexGuard<'_, Inner>,
        v: usize,
        secs: Sections,
        demand: bool,
        priority: i64,
    ) {
        let key = g.pool.key_of(v).expect("resident slot holds a key");
        g.pool.pin(v);
        let info = &mut g.slots[v];
        info.state = SlotState::Loading;
        info.want = info.valid.union(secs);
        info.want_demand = demand;
        info.want_priority = priority;
        let missing = secs.minus(info.valid);
        self.start_read(g, v, key, missing, demand, priority);
    }

    /// Read the sections `secs` of `key` into slot `v` (state Loading, pinned once for the
    /// read). Without section crcs in the index (an older store) only whole records are read,
    /// so no byte is used unverified.
    pub(super) fn start_read(
        self: &Arc<Self>,
        g: &mut MutexGuard<'_, Inner>,
        v: usize,
        key: Key,
        secs: Sections,
        demand: bool,
        priority: i64,
    ) {
        let src = self.source(g, key);
        let full = self.geom.layout.nonempty();
        let secs = if src.sections.is_none() {
            // Reachable only with nothing valid: a partly valid slot was read by sections, so
            // its source has section crcs (a new version needs a whole, dirty record).
            debug_assert!(g.slots[v].valid.is_empty());
            full
        } else {
            secs
        };
        let (start, lens) = self.geom.layout.span(secs);
        let off = self.geom.slot_offset(src.slot) + start as u64;
        let prio = JobPriority {
            class: if demand {
                JobPriority::DEMAND
            } else {
                JobPriority::PREFETCH
            },
            priority,
            seq: g.next_seq(),
        };
        let n = record_chunks(&lens, self.opts.chunk_bytes);
        let sh = self.clone();
        let read = Read {
            key,
            secs,
            src,
            off,
            lens: lens.clone(),
        };
        self.submit_record(
            g,
            Dir::Read,
            v,
            start,
            off,
            &lens,
            prio,
            Box::new(move |res| sh.finish_load(v, read, n, res)),
        );
    }

    /// Start reading or writing consecutive sections (`lens`) of slot `v`'s record, from byte
    /// `start` of the record, at byte `off` of the data file, and count its chunks in flight;
    /// `done` runs once all chunks finished and must call [`Self::lock_finished`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn submit_record(
        &self,
        g: &mut MutexGuard<'_, Inner>,
        dir: Dir,
        v: usize,
        start: usize,
        off: u64,
        lens: &[usize],
        prio: JobPriority,
        done: IoDone,
    ) {
        let rb = self.geom.layout.record_bytes;
        let ptr = SendPtr(unsafe { self.arena.ptr().add(v * rb + start) });
        let n = record_io(
            &self.io,
            &self.file,
            dir,
            off,
            ptr,
            lens,
            self.opts.chunk_bytes,
            prio,
            done,
        );
        g.inflight_chunks += n;
        if dir == Dir::Read {
            g.inflight_read_chunks += n;
            g.m.queue_depth_max = g.m.queue_depth_max.max(g.inflight_read_chunks as u64);
        }
    }

    /// Lock, and take a finished [`Self::submit_record`] I/O's `n` chunks out of flight.
    pub(super) fn lock_finished(&self, dir: Dir, n: usize) -> MutexGuard<'_, Inner> {
        let mut g = self.lock();
        g.inflight_chunks -= n;
        if dir == Dir::Read {
            g.inflight_read_chunks -= n;
        }
        g
    }

    /// Check a finished read against the index: the whole record's crc32 for a whole read,
    /// the section's for a section read. Returns the (weights, state) crcs of a whole read.
    pub(super) fn verify(
        &self,
        r: &Read,
        crcs: &[u32],
    ) -> std::result::Result<Option<(u32, u32)>, String> {
        let full = self.geom.layout.nonempty();
        let (got, want, what) = if r.secs == full {
            let mut total = crcs[0];
            for (c, l) in crcs.iter().zip(&r.lens).skip(1) {
                total = crc_combine(total, *c, *l as u64);
            }
            (total, r.src.crc, "record")
        } else {
            let (wc, sc) = r.src.sections.expect("section reads need section crcs");
            if r.secs == Sections::WEIGHTS {
                (crcs[0], wc, "weights section of the record")
            } else {
                (crcs[0], sc, "state section of the record")
            }
        };
        if got != want {
            return Err(format!(
                "checksum mismatch in {} for layer {} expert {} ({what} in record slot {} at byte {}): \
                 the index says crc32 {want:#010x}, the data has {got:#010x}; the record is corrupt — \
                 restore the store from a backup or recreate it",
                self.data_path.display(),
                r.key.0,
                r.key.1,
                r.src.slot,
                r.off
            ));
        }
        if r.secs != full {
            return Ok(None);
        }
        // A whole read gives both sections' crcs (an empty section's crc32 is 0).
        let mut it = crcs.iter();
        let mut pick = |sec| {
            if self.geom.layout.section_range(sec).1 > 0 {
                *it.next().unwrap()
            } else {
                0
            }
        };
        let w = pick(Section::Weights);
        let st = pick(Section::State);
        Ok(Some((w, st)))
    }

    pub(super) fn finish_load(
        self: &Arc<Self>,
        v: usize,
        r: Read,
        n: usize,
        res: std::io::Result<Vec<u32>>,
    ) {
        let mut g = self.lock_finished(Dir::Read, n);
        let key = r.key;
        let err = match res {
            Ok(crcs) => match self.verify(&r, &crcs) {
                Ok(secs) => {
                    // An index from before section reads: remember the verified section crcs
                    // of the committed record (the next commit stores them).
                    let flat = self.geom.flat(key.0 as usize, key.1 as usize);
                    if let (Some(secs), None) = (secs, r.src.sections) {
                        let e = g.index.entry(flat);
                        if !g.latest.contains_key(&flat)
                            && (e.slot, e.crc) == (r.src.slot, r.src.crc)
                        {
                            g.index.section_crcs[flat] = Some(secs);
                        }
                    }
                    None
                }
                Err(msg) => Some(msg),
            },
            Err(e) => Some(format!(
                "{}",
                StoreError::io(
                    &self.data_path,
                    &format!("read layer {} expert {} (byte {}) of", key.0, key.1, r.off),
                    e
                )
            )),
        };
        match err {
            None => {
                let _ = g.pool.unpin(v);
                g.m.bytes_read += r.lens.iter().sum::<usize>() as u64;
                g.m.reads += 1;
                if r.secs != self.geom.layout.nonempty() {
                    g.m.section_reads += 1;
                }
                let info = &mut g.slots[v];
                info.valid = info.valid.union(r.secs);
                let valid = info.valid;
                info.tickets.retain(|&(_, s)| !valid.contains(s));
                let missing = info.want.minus(valid);
                if missing.is_empty() || g.closed {
                    g.slots[v].state = SlotState::Ready;
                } else {
                    // Someone asked for another section while this one was read.
                    let info = &g.slots[v];
                    let demand = info.want_demand && !info.tickets.is_empty();
                    let priority = info.want_priority;
                    g.pool.pin(v);
                    self.start_read(&mut g, v, key, missing, demand, priority);
                }
            }
            Some(msg) => {
                g.m.read_errors += 1;
                let tickets = std::mem::take(&mut g.slots[v].tickets);
                if g.slots[v].valid.is_empty() {
                    // Nothing of it was ever valid: drop the slot (and the waiters' pins).
                    g.pool.remove(v);
                    g.slots[v] = SlotInfo {
                        dirty_gen: g.slots[v].dirty_gen,
                        ..SlotInfo::empty()
                    };
                } else {
                    // Other sections are valid and may be in use: keep the slot; the waiters
                    // for the failed section get the error and lose their pin.
                    let _ = g.pool.unpin(v);
                    for _ in &tickets {
                        let _ = g.pool.unpin(v);
                    }
                    let info = &mut g.slots[v];
                    info.state = SlotState::Ready;
                    info.want = info.valid;
                }
                for (t, _) in tickets {
                    let e = g
                        .ticket_errors
                        .entry(t)
                        .or_insert_with(|| (msg.clone(), vec![]));
                    e.1.push(key);
                }
            }
        }
        self.schedule(&mut g);
        self.cv.notify_all();
    }
}
