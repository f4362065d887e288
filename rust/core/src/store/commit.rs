//! Write-backs of dirty records, flush and commit (shadow paging: a commit replaces index.json).

use super::io::{record_chunks, Dir, JobPriority};
use super::slots::SlotState;
use super::{ExpertStore, Inner, Key, Result, Sections, Shared, StoreError};
use std::sync::{Arc, MutexGuard};

impl ExpertStore {
    /// Eager write-behind: start writing these experts' dirty RAM records back to their
    /// uncommitted disk slots now, asynchronously, so a later eviction finds them clean. Never
    /// blocks on I/O. Keys that are not resident, clean, still loading or already being written
    /// are ignored, and so is the whole call while a commit runs or after a failed write-back
    /// (flush/commit report that error). Safe while the caller still pins the keys: a record
    /// marked dirty again during its write stays dirty and is written again later.
    pub fn write_back(&self, keys: &[Key]) -> Result<()> {
        let sh = &self.sh;
        let mut g = sh.lock_open(keys)?;
        if g.committing || g.write_error.is_some() {
            return Ok(());
        }
        for &k in keys {
            if let Some(s) = g.pool.lookup(k) {
                if g.slots[s].dirty && g.slots[s].state == SlotState::Ready {
                    sh.start_writeback(&mut g, s, None);
                }
            }
        }
        Ok(())
    }

    /// Write every dirty RAM record back to its uncommitted disk slot; blocks until done.
    pub fn flush(&self) -> Result<()> {
        let _c = self.sh.commit_lock.lock().unwrap();
        self.sh.flush_locked()
    }

    /// Flush, fsync the data file, then atomically replace index.json (recording `user_meta`).
    /// A crash at any point leaves the previous commit intact.
    pub fn commit(&self, user_meta: &str) -> Result<()> {
        let sh = &self.sh;
        let _c = sh.commit_lock.lock().unwrap();
        sh.lock().committing = true;
        let res = (|| {
            sh.flush_locked()?;
            sh.file
                .sync_data()
                .map_err(|e| StoreError::io(&sh.data_path, "fsync", e))?;
            let (new_index, snapshot) = {
                let g = sh.lock();
                let mut idx = g.index.clone();
                for (&flat, &(slot, crc, secs)) in &g.latest {
                    let gen = idx.experts[flat].2 + 1;
                    idx.experts[flat] = (slot, crc, gen);
                    idx.section_crcs[flat] = Some(secs);
                }
                idx.commit += 1;
                idx.user_meta = user_meta.to_string();
                (idx, g.latest.clone())
            };
            new_index.store_atomic(&sh.dir)?;
            let mut g = sh.lock();
            for (flat, v) in snapshot {
                if g.latest.get(&flat) == Some(&v) {
                    g.latest.remove(&flat);
                }
            }
            g.index = new_index;
            g.m.commits += 1;
            Ok(())
        })();
        let mut g = sh.lock();
        g.committing = false;
        sh.schedule(&mut g);
        sh.cv.notify_all();
        res
    }
}

impl Shared {
    /// Write slot `v`'s dirty record to its expert's uncommitted disk slot; then, if `evict_for`
    /// is set, load that key into `v`.
    pub(super) fn start_writeback(
        self: &Arc<Self>,
        g: &mut MutexGuard<'_, Inner>,
        v: usize,
        evict_for: Option<Key>,
    ) {
        let key = g.pool.key_of(v).expect("dirty slot holds a key");
        g.pool.pin(v);
        let flat = self.geom.flat(key.0 as usize, key.1 as usize);
        let target = 1 - g.index.entry(flat).slot;
        let gen = g.slots[v].dirty_gen;
        let info = &mut g.slots[v];
        info.state = SlotState::Flushing;
        info.evict_for = evict_for;
        let off = self
            .geom
            .record_offset(key.0 as usize, key.1 as usize, target);
        let seq = g.next_seq();
        let sh = self.clone();
        // Only whole records are ever dirty; each section's crc32 comes out of the same pass.
        let (_, lens) = self.geom.layout.span(Sections::ALL);
        let n = record_chunks(&lens, self.opts.chunk_bytes);
        self.submit_record(
            g,
            Dir::Write,
            v,
            0,
            off,
            &lens,
            JobPriority {
                // A demand load waits for an eviction's write-back: as urgent as that read.
                class: if evict_for.is_some() {
                    JobPriority::URGENT_WRITE
                } else {
                    JobPriority::WRITE
                },
                priority: 0,
                seq,
            },
            Box::new(move |res| sh.finish_writeback(v, key, target, gen, n, res)),
        );
        g.inflight_writes += 1;
    }

    pub(super) fn finish_writeback(
        self: &Arc<Self>,
        v: usize,
        key: Key,
        target: u8,
        gen: u64,
        n: usize,
        res: std::io::Result<Vec<u32>>,
    ) {
        let layout = &self.geom.layout;
        let rb = layout.record_bytes;
        let mut g = self.lock_finished(Dir::Write, n);
        g.inflight_writes -= 1;
        let _ = g.pool.unpin(v);
        let evict_for = g.slots[v].evict_for.take();
        g.slots[v].state = SlotState::Ready;
        match res {
            Ok(crcs) => {
                let (w, st) = layout.section_crcs_of_segments(&crcs);
                let crc = layout.record_crc((w, st));
                let flat = self.geom.flat(key.0 as usize, key.1 as usize);
                g.latest.insert(flat, (target, crc, (w, st)));
                g.m.bytes_written += rb as u64;
                g.m.writebacks += 1;
                if g.slots[v].dirty_gen == gen {
                    g.slots[v].dirty = false;
                }
            }
            Err(e) => {
                let errno = e.raw_os_error();
                g.write_error = Some((
                    format!(
                        "{}; nothing committed was lost (the last commit is intact, the record stays dirty in RAM)",
                        StoreError::io(&self.data_path, &format!("write back layer {} expert {} to", key.0, key.1), e)
                    ),
                    errno,
                ));
            }
        }
        if let Some(other) = evict_for {
            if let Some(p) = g.pending.get_mut(&other) {
                p.flushing_into = None;
                let clean_and_free = !g.slots[v].dirty && g.pool.pins(v) == 0;
                if clean_and_free && !g.closed {
                    self.start_load(&mut g, v, other);
                } else {
                    let p = &g.pending[&other];
                    let (demand, priority) = (p.demand, p.priority);
                    g.queue_read(other, demand, priority);
                }
            }
        }
        self.schedule(&mut g);
        self.cv.notify_all();
    }

    pub(super) fn flush_locked(self: &Arc<Self>) -> Result<()> {
        let mut g = self.lock();
        g.write_error = None;
        loop {
            if let Some((message, errno)) = g.write_error.clone() {
                return Err(StoreError::WriteBack { message, errno });
            }
            let dirty: Vec<usize> = (0..self.ram_slots)
                .filter(|&s| g.slots[s].dirty && g.slots[s].state == SlotState::Ready)
                .collect();
            for s in &dirty {
                self.start_writeback(&mut g, *s, None);
            }
            let any_dirty = g.slots.iter().any(|s| s.dirty);
            if dirty.is_empty() && g.inflight_writes == 0 && !any_dirty {
                return Ok(());
            }
            if g.closed {
                return Err(StoreError::Closed);
            }
            g = self.cv.wait(g).unwrap();
        }
    }
}
