//! The tiered expert store: a data file on NVMe (a pool of record slots, copy on write),
//! a pinned-able RAM arena of `ram_bytes / record_bytes` slots, asynchronous reads and
//! write-backs on an I/O thread pool, tickets that callers wait on without busy-waiting, and
//! prefetch with priorities. See docs/design.md for the contracts.
//!
//! Concurrency model: one mutex (`Inner`) holds all bookkeeping and is never held across I/O;
//! I/O workers lock it only to publish a completion; waiters sleep on one condvar.
//!
//! Where things are: `open` (open, accessors, counters, close), `create` (a new store
//! directory), `request` (requests, prefetches, pins, releases, dirty marks), `ticket` (waiting
//! on a request), `schedule` (which pending load gets which slot), `read` (reads and their
//! checksums), `commit` (write-backs, flush, commit), `slots` (one slot's state), `lock` (the
//! directory lock), `format` (the files on disk), `io` (the I/O threads), `pool` (slot accounting
//! and eviction), `gpu` (the GPU tier's accounting, under the same mutex), `test_hooks` (for
//! `rust/core/tests/`).

pub mod format;
pub mod gpu;
pub mod io;
pub mod pool;
#[doc(hidden)]
pub mod test_hooks;

mod commit;
mod create;
mod lock;
mod open;
mod read;
mod request;
mod schedule;
mod slots;
mod ticket;

pub use crate::error::{Result, StoreError};
pub use create::InitFn;
pub use format::Sections;
pub use gpu::GpuSlots;
pub use lock::LOCK_FILE;
pub use pool::{Key, Need, SlotPool};
pub use ticket::Ticket;

use format::{Geometry, Index, INDEX_FILE};
use io::{Arena, DataFile, IoPool};
use lock::StoreLock;
use schedule::HeapItem;
use slots::{Pending, SlotInfo};
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Options for [`ExpertStore::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// RAM budget: the arena holds `ram_bytes / record_bytes` record slots.
    pub ram_bytes: usize,
    /// I/O worker threads.
    pub io_threads: usize,
    /// Read chunks in flight before a new load waits. A load's chunks count until all of them
    /// are done, so the store raises this to two whole records' worth where records are large:
    /// the next record's first chunks then fill the I/O threads the last chunks of the one
    /// before leave idle. Write-backs are not counted (the dirty slots bound them), so a large
    /// record's write never holds back the reads a full-duplex disk can run beside it.
    pub queue_depth: usize,
    /// Try O_DIRECT (falls back to buffered I/O where the filesystem refuses it).
    pub direct: bool,
    /// Bytes per pread/pwrite; a record is split into chunks that run concurrently.
    pub chunk_bytes: usize,
    /// 0: reads and writes run at once (a full-duplex disk). Otherwise they take turns of up to
    /// this many bytes while the other kind waits, never running at once: for a disk whose
    /// rate reading and writing at once is below its rate doing one after the other.
    pub turn_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            ram_bytes: 1 << 30,
            io_threads: 8,
            queue_depth: 32,
            direct: true,
            chunk_bytes: 4 << 20,
            turn_bytes: 0,
        }
    }
}

/// Counters; see [`ExpertStore::metrics`].
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Requested experts already in RAM (or being read for another request).
    pub hits: u64,
    /// Requested experts that had to be read for this request.
    pub misses: u64,
    /// Requested experts that a prefetch had brought (or was bringing) into RAM.
    pub prefetch_hits: u64,
    /// Prefetches issued for experts not in RAM.
    pub prefetches: u64,
    /// Prefetched experts evicted before anyone used them.
    pub prefetch_wasted: u64,
    /// Prefetch reads cancelled before they started (the prediction was wrong).
    pub prefetch_cancelled: u64,
    /// Bytes read from disk (only the sections read).
    pub bytes_read: u64,
    /// Bytes written to disk (write-back and init).
    pub bytes_written: u64,
    /// Reads completed (whole records and single sections).
    pub reads: u64,
    /// Reads of a single section (weights or state) rather than a whole record.
    pub section_reads: u64,
    /// Reads that failed (checksum mismatch or I/O error).
    pub read_errors: u64,
    /// Records evicted from RAM.
    pub evictions: u64,
    /// Dirty records written back (eviction, flush, commit).
    pub writebacks: u64,
    /// Seconds callers spent blocked in wait().
    pub stall_s: f64,
    /// Largest number of read chunks in flight (what `queue_depth` bounds).
    pub queue_depth_max: u64,
    /// Commits (the caller's and interim ones).
    pub commits: u64,
    /// Commits the store made on its own because the spare record slots ran out.
    pub interim_commits: u64,
    /// Whether I/O bypasses the page cache.
    pub direct: bool,
}

/// All bookkeeping of the store, behind one mutex ([`Shared::inner`]).
struct Inner {
    pool: SlotPool,
    slots: Vec<SlotInfo>,
    index: Index,
    /// Experts written back since the last commit: flat index -> (record slot, crc,
    /// (weights crc, state crc)).
    latest: HashMap<usize, (u32, u32, (u32, u32))>,
    /// Record slots neither committed nor in `latest` nor being written (version 2 only).
    free: Vec<u32>,
    /// An interim commit has been started and has not finished.
    interim_pending: bool,
    pending: HashMap<Key, Pending>,
    heap: BinaryHeap<HeapItem>,
    seq: u64,
    inflight_chunks: usize,
    /// Of `inflight_chunks`, those that read: what `queue_depth` bounds.
    inflight_read_chunks: usize,
    inflight_writes: usize,
    committing: bool,
    closed: bool,
    /// A write-back failed: reported by flush/commit/wait until a later flush succeeds.
    write_error: Option<(String, Option<i32>)>,
    ticket_errors: HashMap<u64, (String, Vec<Key>)>,
    next_ticket: u64,
    m: Metrics,
    /// The store directory's lock, held from open() to close().
    dir_lock: Option<StoreLock>,
    /// The GPU tier's slots, copies in flight and acquires (see [`gpu`]).
    gpu: gpu::GpuState,
}

/// Where an expert's newest version lives on disk and its checksums.
#[derive(Clone, Copy, Debug)]
struct Source {
    slot: u32,
    crc: u32,
    /// (weights, state) crcs; `None` in an index from before section reads.
    sections: Option<(u32, u32)>,
}

/// A read in flight.
struct Read {
    key: Key,
    secs: Sections,
    src: Source,
    off: u64,
    lens: Vec<usize>,
}

/// What the store handle, its tickets and the I/O completions share.
struct Shared {
    dir: PathBuf,
    data_path: PathBuf,
    geom: Geometry,
    file: Arc<DataFile>,
    arena: Arena,
    ram_slots: usize,
    opts: StoreOptions,
    /// `opts.queue_depth`, raised to two whole records' chunks (see [`StoreOptions::queue_depth`]).
    read_depth: usize,
    io: IoPool,
    inner: Mutex<Inner>,
    cv: Condvar,
    /// Serializes flush() and commit().
    commit_lock: Mutex<()>,
}

/// The store. Dropping it waits for in-flight I/O; uncommitted changes are not committed.
pub struct ExpertStore {
    sh: Arc<Shared>,
}

fn key_str(k: Key) -> String {
    format!("(layer {}, expert {})", k.0, k.1)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock, after checking that every key is in range and the store is open.
    fn lock_open(&self, keys: &[Key]) -> Result<MutexGuard<'_, Inner>> {
        for &k in keys {
            self.geom.check_key(k.0 as usize, k.1 as usize)?;
        }
        let g = self.lock();
        if g.closed {
            return Err(StoreError::Closed);
        }
        Ok(g)
    }

    /// The sections a request for `s` reads: those with bytes; nothing asked means the whole record.
    fn norm(&self, s: Sections) -> Sections {
        let full = self.geom.layout.nonempty();
        match s.intersect(full) {
            x if x.is_empty() => full,
            x => x,
        }
    }
}

/// The index file name (for tools and tests).
pub fn index_path(dir: &Path) -> PathBuf {
    dir.join(INDEX_FILE)
}
