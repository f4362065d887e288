//! Opening a store, its accessors and counters, and closing it.

use super::format::{self, Geometry, Index, RecordLayout, DATA_FILE};
use super::io::{record_chunks, Arena, DataFile, IoPool};
use super::lock::StoreLock;
use super::slots::SlotInfo;
use super::{
    ExpertStore, Inner, Metrics, Result, Sections, Shared, SlotPool, StoreError, StoreOptions,
};
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

impl ExpertStore {
    /// Open a store with a RAM budget. Takes the store directory's lock (see [`super::LOCK_FILE`]):
    /// while this store is open, another open of the directory, from this or another process,
    /// fails at once with [`StoreError::Locked`].
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<ExpertStore> {
        let data_path = dir.join(DATA_FILE);
        if !data_path.exists() {
            return Err(StoreError::NotFound(format!(
                "{} not found: no expert store at {}; create one with ExpertStore.create (or check the path)",
                data_path.display(),
                dir.display()
            )));
        }
        let dir_lock = StoreLock::acquire(dir)?;
        let file = DataFile::open(&data_path, true, opts.direct)
            .map_err(|e| StoreError::io(&data_path, "open", e))?;
        let geom = format::read_header(&data_path, file.file())?;
        let index = Index::load(dir, &geom)?;
        let rb = geom.layout.record_bytes;
        let ram_slots = opts.ram_bytes / rb;
        if ram_slots == 0 {
            return Err(StoreError::InvalidArgument(format!(
                "RAM budget of {} bytes is smaller than one expert record ({rb} bytes); raise ram_bytes to at \
                 least {rb} (better: several records, so requests and prefetches overlap)",
                opts.ram_bytes
            )));
        }
        if opts.queue_depth == 0 || opts.io_threads == 0 {
            return Err(StoreError::InvalidArgument(
                "io_threads and queue_depth must be at least 1".into(),
            ));
        }
        let arena = Arena::new(ram_slots * rb).map_err(|e| {
            StoreError::io(
                dir,
                &format!("allocate a {} byte RAM arena for", ram_slots * rb),
                e,
            )
        })?;
        let m = Metrics {
            direct: file.direct(),
            ..Default::default()
        };
        let inner = Inner {
            pool: SlotPool::new(ram_slots),
            slots: (0..ram_slots).map(|_| SlotInfo::empty()).collect(),
            free: index.free_slots(&geom),
            index,
            latest: HashMap::new(),
            interim_pending: false,
            pending: HashMap::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            inflight_chunks: 0,
            inflight_read_chunks: 0,
            inflight_writes: 0,
            committing: false,
            closed: false,
            write_error: None,
            ticket_errors: HashMap::new(),
            next_ticket: 0,
            m,
            dir_lock: Some(dir_lock),
            gpu: Default::default(),
        };
        let io = IoPool::new(opts.io_threads);
        io.set_turns(turn_jobs(opts.turn_bytes, opts.chunk_bytes), 0);
        let read_depth = opts
            .queue_depth
            .max(2 * record_chunks(&geom.layout.span(Sections::ALL).1, opts.chunk_bytes));
        Ok(ExpertStore {
            sh: Arc::new(Shared {
                dir: dir.to_path_buf(),
                data_path,
                geom,
                file: Arc::new(file),
                arena,
                ram_slots,
                opts,
                read_depth,
                io,
                inner: Mutex::new(inner),
                cv: Condvar::new(),
                commit_lock: Mutex::new(()),
            }),
        })
    }

    /// Geometry (layers, experts, record layout).
    pub fn geometry(&self) -> &Geometry {
        &self.sh.geom
    }
    /// Record layout.
    pub fn layout(&self) -> &RecordLayout {
        &self.sh.geom.layout
    }
    /// RAM slots.
    pub fn ram_slots(&self) -> usize {
        self.sh.ram_slots
    }
    /// Let reads and writes take turns of up to `turn_bytes` (0: run both at once); see
    /// [`StoreOptions::turn_bytes`]. A turn starts while at most `overlap` chunks of the one
    /// before still run (0: reads and writes never at once). Takes effect from the next I/O.
    pub fn set_turn_bytes(&self, turn_bytes: usize, overlap: usize) {
        self.sh
            .io
            .set_turns(turn_jobs(turn_bytes, self.sh.opts.chunk_bytes), overlap);
    }
    /// Store directory.
    pub fn dir(&self) -> &Path {
        &self.sh.dir
    }
    /// (address, length) of the RAM arena; slot `s` starts at `s * record_bytes`.
    pub fn arena_address(&self) -> (usize, usize) {
        (
            self.sh.arena.ptr() as usize,
            self.sh.ram_slots * self.sh.geom.layout.record_bytes,
        )
    }
    /// The record of a RAM slot. The caller must hold a pin on the slot.
    ///
    /// # Safety
    /// Nobody else may write the slot concurrently (it must be pinned and not being loaded).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_bytes(&self, slot: usize) -> &mut [u8] {
        let rb = self.sh.geom.layout.record_bytes;
        self.sh.arena.slice_mut(slot * rb, rb)
    }

    /// The metadata string of the last commit.
    pub fn user_meta(&self) -> String {
        self.sh.lock().index.user_meta.clone()
    }

    /// Number of commits in the index.
    pub fn commit_count(&self) -> u64 {
        self.sh.lock().index.commit
    }

    /// Interim commits since the caller's last commit (see [`Index::interim_commits`]).
    pub fn interim_commits(&self) -> u64 {
        self.sh.lock().index.interim_commits
    }

    /// Counters.
    pub fn metrics(&self) -> Metrics {
        let g = self.sh.lock();
        let mut m = g.m.clone();
        m.direct = self.sh.file.direct();
        m
    }

    /// Slots holding a record (for tests and metrics).
    pub fn resident(&self) -> usize {
        self.sh.lock().pool.resident()
    }

    /// Slots pinned (by callers or in-flight I/O).
    pub fn pinned(&self) -> usize {
        self.sh.lock().pool.pinned()
    }

    /// Stop I/O (waiting for what is in flight). Later calls fail with [`StoreError::Closed`].
    /// Uncommitted changes are dropped (the last commit stays on disk). Releases the directory
    /// lock.
    pub fn close(&self) {
        let sh = &self.sh;
        let mut g = sh.lock();
        if g.closed {
            return;
        }
        g.closed = true;
        g.heap.clear();
        while g.inflight_chunks > 0 {
            g = sh.cv.wait(g).unwrap();
        }
        sh.cv.notify_all();
        drop(g);
        // An interim commit running in the background finishes (or sees `closed`) before the
        // directory lock goes: nobody else may write index.json while it could.
        drop(sh.commit_lock.lock().unwrap_or_else(|e| e.into_inner()));
        sh.io.shutdown();
        // Nothing runs any more: another ExpertStore may open the directory now.
        sh.lock().dir_lock = None;
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// The I/O pool's turn in jobs (chunks) for a turn of `turn_bytes`; `None` for 0 (no turns).
fn turn_jobs(turn_bytes: usize, chunk_bytes: usize) -> Option<usize> {
    (turn_bytes > 0).then(|| turn_bytes.div_ceil(chunk_bytes.max(super::format::ALIGN)))
}
