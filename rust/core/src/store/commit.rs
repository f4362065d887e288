//! Write-backs of dirty records, flush and commit: a changed record goes to a record slot no
//! committed version uses, and a commit (an atomic replace of index.json) frees the slots of
//! the versions it supersedes. When the spare slots run out the store commits on its own (an
//! interim commit, keeping the caller's metadata) instead of stalling.

use super::format::SHADOW_VERSION;
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
                if g.slots[s].dirty && g.slots[s].state == SlotState::Ready && sh.writable(&g, k) {
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
        let res = sh
            .flush_locked()
            .and_then(|()| sh.write_index(Some(user_meta)));
        let mut g = sh.lock();
        g.committing = false;
        sh.schedule(&mut g);
        sh.cv.notify_all();
        res
    }
}

impl Shared {
    /// Whether a write-back of `key` finds a record slot now: the one holding its version
    /// written since the last commit, its other shadow slot (version 1), or a free one.
    pub(super) fn writable(&self, g: &Inner, key: Key) -> bool {
        self.geom.version == SHADOW_VERSION
            || !g.free.is_empty()
            || g.latest
                .contains_key(&self.geom.flat(key.0 as usize, key.1 as usize))
    }

    /// The record slot a write-back of expert `flat` goes to (see [`Self::writable`]): never
    /// one a committed version uses, so a kill mid-write leaves the last commit intact.
    fn target_slot(&self, g: &mut Inner, flat: usize) -> u32 {
        if let Some(&(slot, ..)) = g.latest.get(&flat) {
            return slot; // an uncommitted version is overwritten: nothing committed is touched
        }
        if self.geom.version == SHADOW_VERSION {
            return g.index.experts[flat].0 ^ 1;
        }
        g.free
            .pop()
            .expect("write-backs start only where a slot is free (writable)")
    }

    /// Give a record slot back to the free list (version 2; in version 1 each expert's shadow
    /// pair is its own).
    fn free_slot(&self, g: &mut Inner, slot: u32) {
        if self.geom.version != SHADOW_VERSION {
            g.free.push(slot);
        }
    }

    /// Commit the versions written so far: wait for the write-backs in flight (none may start
    /// meanwhile), fsync the data file, atomically replace index.json, then free the slots of
    /// the versions it superseded. `user_meta`: the caller's commit; `None`: an interim commit
    /// (spare slots ran out), which keeps the caller's metadata, counts itself in
    /// `interim_commits`, and does nothing when nothing was written. The caller holds
    /// `commit_lock`.
    fn write_index(self: &Arc<Self>, user_meta: Option<&str>) -> Result<()> {
        let was_committing = std::mem::replace(&mut self.lock().committing, true);
        let res = (|| {
            let mut g = self.lock();
            while g.inflight_writes > 0 && !g.closed {
                g = self.cv.wait(g).unwrap();
            }
            if g.closed {
                return Err(StoreError::Closed);
            }
            if user_meta.is_none() && g.latest.is_empty() {
                return Ok(());
            }
            drop(g);
            self.file
                .sync_data()
                .map_err(|e| StoreError::io(&self.data_path, "fsync", e))?;
            let (new_index, snapshot) = {
                let g = self.lock();
                let mut idx = g.index.clone();
                for (&flat, &(slot, crc, secs)) in &g.latest {
                    let gen = idx.experts[flat].2 + 1;
                    idx.experts[flat] = (slot, crc, gen);
                    idx.section_crcs[flat] = Some(secs);
                }
                idx.commit += 1;
                match user_meta {
                    Some(meta) => {
                        idx.user_meta = meta.to_string();
                        idx.interim_commits = 0;
                    }
                    None => idx.interim_commits += 1,
                }
                (idx, g.latest.clone())
            };
            new_index.store_atomic(&self.dir)?;
            // From here on no index names the superseded versions: their slots may be reused.
            let mut g = self.lock();
            for (flat, v) in snapshot {
                let old = g.index.experts[flat].0;
                if g.latest.get(&flat) == Some(&v) {
                    g.latest.remove(&flat);
                }
                if old != v.0 {
                    self.free_slot(&mut g, old);
                }
            }
            g.index = new_index;
            g.m.commits += 1;
            if user_meta.is_none() {
                g.m.interim_commits += 1;
            }
            Ok(())
        })();
        let mut g = self.lock();
        g.committing = was_committing;
        self.schedule(&mut g);
        self.cv.notify_all();
        res
    }

    /// A load waits because every RAM slot it could take holds a dirty record and no record
    /// slot is free: commit in the background (once at a time) so the slots free up.
    pub(super) fn start_interim_commit(self: &Arc<Self>, g: &mut Inner) {
        if g.interim_pending || g.closed {
            return;
        }
        g.interim_pending = true;
        let sh = self.clone();
        std::thread::spawn(move || {
            let res = {
                let _c = sh.commit_lock.lock().unwrap();
                sh.write_index(None)
            };
            let mut g = sh.lock();
            g.interim_pending = false;
            if let Err(e) = res {
                if !g.closed && g.write_error.is_none() {
                    g.write_error = Some((format!("interim commit: {e}"), None));
                }
            }
            sh.schedule(&mut g);
            sh.cv.notify_all();
        });
    }
}

impl Shared {
    /// Write slot `v`'s dirty record to a record slot no commit uses ([`Self::target_slot`]); then, if `evict_for`
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
        let target = self.target_slot(g, flat);
        let gen = g.slots[v].dirty_gen;
        let info = &mut g.slots[v];
        info.state = SlotState::Flushing;
        info.evict_for = evict_for;
        let off = self.geom.slot_offset(target);
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
        target: u32,
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
        let flat = self.geom.flat(key.0 as usize, key.1 as usize);
        match res {
            Ok(crcs) => {
                let (w, st) = layout.section_crcs_of_segments(&crcs);
                let crc = layout.record_crc((w, st));
                g.latest.insert(flat, (target, crc, (w, st)));
                g.m.bytes_written += rb as u64;
                g.m.writebacks += 1;
                if g.slots[v].dirty_gen == gen {
                    g.slots[v].dirty = false;
                }
            }
            Err(e) => {
                if g.latest.get(&flat).map(|x| x.0) != Some(target) {
                    self.free_slot(&mut g, target); // a fresh slot: nothing valid was in it
                }
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

    /// Write every dirty RAM record back; where the spare slots run out, commit what was
    /// written so far (an interim commit) to free them. The caller holds `commit_lock`.
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
            let mut blocked = false;
            for &s in &dirty {
                let key = g.pool.key_of(s).expect("dirty slot holds a key");
                if self.writable(&g, key) {
                    self.start_writeback(&mut g, s, None);
                } else {
                    blocked = true;
                }
            }
            let any_dirty = g.slots.iter().any(|s| s.dirty);
            if !blocked && g.inflight_writes == 0 && !any_dirty {
                return Ok(());
            }
            if g.closed {
                return Err(StoreError::Closed);
            }
            if blocked && g.inflight_writes == 0 {
                drop(g);
                self.write_index(None)?;
                g = self.lock();
                continue;
            }
            g = self.cv.wait(g).unwrap();
        }
    }
}
