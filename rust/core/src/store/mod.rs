//! The tiered expert store: a data file on NVMe (two record slots per expert, shadow paging),
//! a pinned-able RAM arena of `ram_bytes / record_bytes` slots, asynchronous reads and
//! write-backs on an I/O thread pool, tickets that callers wait on without busy-waiting, and
//! prefetch with priorities. See docs/design.md for the contracts.
//!
//! Concurrency model: one mutex (`Inner`) holds all bookkeeping and is never held across I/O;
//! I/O workers lock it only to publish a completion; waiters sleep on one condvar.

pub mod format;
pub mod io;
pub mod pool;

pub use format::Sections;
use format::{
    crc_combine, Geometry, Index, RecordLayout, Section, TensorSpec, DATA_FILE, INDEX_FILE,
};
use io::{record_chunks, record_io, Arena, DataFile, Dir, IoDone, IoPool, JobPriority, SendPtr};
pub use pool::{Key, Need, SlotPool};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Errors of the store, each with a message that names the problem and the fix.
#[derive(Debug)]
pub enum StoreError {
    /// Bad argument (budget, key, schema, buffer size...).
    InvalidArgument(String),
    /// A file that should exist does not.
    NotFound(String),
    /// Damaged, truncated or mismatched files, checksum errors.
    Corrupt(String),
    /// An operating-system I/O error (disk full, permissions...).
    Io {
        /// What we were doing, with the file.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Every slot is pinned and nothing can be evicted.
    AllPinned(String),
    /// A write-back failed (disk full, file size limit...); nothing committed was lost.
    WriteBack {
        /// What failed and what to do.
        message: String,
        /// The OS error number, if any.
        errno: Option<i32>,
    },
    /// A wait ran past its timeout.
    Timeout(String),
    /// The store was closed.
    Closed,
}

impl StoreError {
    /// Wrap an I/O error with the file and the operation.
    pub fn io(path: &Path, what: &str, source: std::io::Error) -> StoreError {
        let hint = match source.raw_os_error() {
            Some(libc::ENOSPC) => {
                " — the disk is full: free space (the last commit is intact) and retry"
            }
            Some(libc::EFBIG) => " — the file size limit (ulimit -f) was hit: raise it and retry",
            Some(libc::EACCES) | Some(libc::EPERM) => {
                " — permission denied: check the path's owner and mode"
            }
            Some(libc::EROFS) => " — the filesystem is read-only",
            _ => "",
        };
        StoreError::Io {
            context: format!("{what} {}{hint}", path.display()),
            source,
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::InvalidArgument(m)
            | StoreError::NotFound(m)
            | StoreError::Corrupt(m)
            | StoreError::AllPinned(m)
            | StoreError::Timeout(m)
            | StoreError::WriteBack { message: m, .. } => f.write_str(m),
            StoreError::Io { context, source } => write!(f, "{context}: {source}"),
            StoreError::Closed => f.write_str("the expert store is closed; open it again"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Result with [`StoreError`].
pub type Result<T> = std::result::Result<T, StoreError>;

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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            ram_bytes: 1 << 30,
            io_threads: 8,
            queue_depth: 32,
            direct: true,
            chunk_bytes: 4 << 20,
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
    /// Commits.
    pub commits: u64,
    /// Whether I/O bypasses the page cache.
    pub direct: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Empty,
    Loading,
    Ready,
    /// A write-back is running; the RAM data stays valid.
    Flushing,
}

#[derive(Debug)]
struct SlotInfo {
    state: SlotState,
    dirty: bool,
    dirty_gen: u64,
    /// Key whose load waits for this slot's write-back (eviction of a dirty record).
    evict_for: Option<Key>,
    /// Tickets waiting for a read into this slot, with the sections each needs (to hear about
    /// a failure); a ticket leaves the list once its sections are valid.
    tickets: Vec<(u64, Sections)>,
    /// Sections of the record in RAM that are valid (read and verified, or written by the
    /// caller of a whole record); only these may be used.
    valid: Sections,
    /// Sections someone asked for: a finished read starts the next read while any is missing.
    want: Sections,
    /// Class and priority of that next read.
    want_demand: bool,
    want_priority: i64,
}

impl SlotInfo {
    fn empty() -> SlotInfo {
        SlotInfo {
            state: SlotState::Empty,
            dirty: false,
            dirty_gen: 0,
            evict_for: None,
            tickets: vec![],
            valid: Sections::NONE,
            want: Sections::NONE,
            want_demand: false,
            want_priority: 0,
        }
    }
}

#[derive(Debug)]
struct Pending {
    pins: u32,
    demand: bool,
    priority: i64,
    /// Sections to read (the union of what the requests and prefetches asked for).
    sections: Sections,
    tickets: Vec<(u64, Sections)>,
    /// Slot whose write-back must finish before this load starts.
    flushing_into: Option<usize>,
}

#[derive(PartialEq, Eq, Debug)]
struct HeapItem {
    prio: JobPriority,
    key: Key,
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

struct Inner {
    pool: SlotPool,
    slots: Vec<SlotInfo>,
    index: Index,
    /// Experts written back since the last commit: flat index -> (record slot, crc,
    /// (weights crc, state crc)).
    latest: HashMap<usize, (u8, u32, (u32, u32))>,
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
}

impl Inner {
    /// Queue the read of `key`: demand reads (class 1) before prefetches (class 0), then by
    /// priority, then first come first served.
    fn queue_read(&mut self, key: Key, demand: bool, priority: i64) {
        let prio = JobPriority {
            class: demand as u8,
            priority,
            seq: self.next_seq(),
        };
        self.heap.push(HeapItem { prio, key });
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq - 1
    }
}

/// Where an expert's newest version lives on disk and its checksums.
#[derive(Clone, Copy, Debug)]
struct Source {
    slot: u8,
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

/// An asynchronous request; [`Ticket::wait`] returns the RAM slots. Dropping a ticket that was
/// never waited on releases its pins.
pub struct Ticket {
    sh: Arc<Shared>,
    id: u64,
    keys: Vec<Key>,
    distinct: Vec<Key>,
    sections: Sections,
    done: bool,
}

fn key_str(k: Key) -> String {
    format!("(layer {}, expert {})", k.0, k.1)
}

/// Initializer for [`ExpertStore::create`]: fills a zeroed record of `(layer, expert)`.
pub type InitFn<'a> = &'a mut dyn FnMut(usize, usize, &mut [u8]) -> Result<()>;

/// I/O threads and record buffers of [`ExpertStore::create`]: `init` fills one buffer while the
/// record in the other is written, in chunks on the threads, which compute its crc32s as they go.
const CREATE_IO_THREADS: usize = 8;
const CREATE_BUFFERS: usize = 2;

/// Fill slot 0 of every record with `init` and write it, the next record's `init` overlapping
/// the writes; returns each record's (weights, state) crc32s, by flat index. A failed `init` or
/// write stops the filling; the writes already in flight finish first (they read the buffers).
fn write_initial_records(
    geom: &Geometry,
    data_path: &Path,
    init: InitFn<'_>,
) -> Result<Vec<(u32, u32)>> {
    let rb = geom.layout.record_bytes;
    let file = Arc::new(
        DataFile::open(data_path, true, true).map_err(|e| StoreError::io(data_path, "open", e))?,
    );
    let buffers = Arena::new(CREATE_BUFFERS * rb)
        .map_err(|e| StoreError::io(data_path, "allocate record buffers for", e))?;
    let pool = IoPool::new(CREATE_IO_THREADS);
    let (start, lens) = geom.layout.span(Sections::ALL);
    let chunk = StoreOptions::default().chunk_bytes;
    let (tx, rx) = std::sync::mpsc::channel::<(usize, usize, std::io::Result<Vec<u32>>)>();
    let mut crcs = vec![(0u32, 0u32); geom.num_records()];
    let mut writing: [Option<usize>; CREATE_BUFFERS] = [None; CREATE_BUFFERS]; // record per buffer
    let mut error: Option<StoreError> = None;
    let ne = geom.num_experts;
    // Take one finished write (they finish in any order): its crc32s or its error.
    let take_one =
        |writing: &mut [Option<usize>], crcs: &mut [(u32, u32)], error: &mut Option<StoreError>| {
            let (buffer, flat, res) = rx.recv().expect("every write in flight reports");
            writing[buffer] = None;
            match res {
                Ok(c) => crcs[flat] = geom.layout.section_crcs_of_segments(&c),
                Err(err) => {
                    let what = format!("write (layer {}, expert {}) of", flat / ne, flat % ne);
                    error.get_or_insert(StoreError::io(data_path, &what, err));
                }
            }
        };
    for flat in 0..geom.num_records() {
        let buffer = flat % CREATE_BUFFERS;
        while writing[buffer].is_some() {
            take_one(&mut writing, &mut crcs, &mut error);
        }
        if error.is_some() {
            break;
        }
        let (l, e) = (flat / ne, flat % ne);
        let b = unsafe { buffers.slice_mut(buffer * rb, rb) };
        b.fill(0);
        if let Err(err) = init(l, e, b) {
            error = Some(err);
            break;
        }
        writing[buffer] = Some(flat);
        let tx = tx.clone();
        record_io(
            &pool,
            &file,
            Dir::Write,
            geom.record_offset(l, e, 0) + start as u64,
            SendPtr(b[start..].as_mut_ptr()),
            &lens,
            chunk,
            JobPriority {
                class: JobPriority::WRITE,
                priority: 0,
                seq: flat as u64,
            },
            Box::new(move |res| {
                let _ = tx.send((buffer, flat, res));
            }),
        );
    }
    while writing.iter().any(Option::is_some) {
        take_one(&mut writing, &mut crcs, &mut error);
    }
    match error {
        Some(e) => Err(e),
        None => {
            file.sync_data()
                .map_err(|e| StoreError::io(data_path, "fsync", e))?;
            Ok(crcs)
        }
    }
}

impl ExpertStore {
    /// Create a store directory: the data file (header, space reserved with fallocate so a full
    /// disk shows up now, not during training), every expert's slot 0 zero-filled or filled by
    /// `init` one record at a time (streaming, O_DIRECT), and the first index.json.
    pub fn create(
        dir: &Path,
        num_layers: usize,
        num_experts: usize,
        schema: &[TensorSpec],
        init: Option<InitFn<'_>>,
    ) -> Result<()> {
        if num_layers == 0 || num_experts == 0 {
            return Err(StoreError::InvalidArgument(format!(
                "a store needs at least one layer and one expert (got {num_layers} x {num_experts})"
            )));
        }
        let layout = RecordLayout::new(schema)?;
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, "create directory", e))?;
        let data_path = dir.join(DATA_FILE);
        if data_path.exists() {
            return Err(StoreError::InvalidArgument(format!(
                "{} already exists; open it with ExpertStore.open, or delete the directory to recreate it",
                data_path.display()
            )));
        }
        let header = format::build_header(num_layers, num_experts, &layout);
        let geom = Geometry {
            num_layers,
            num_experts,
            layout,
            data_start: header.len() as u64,
        };
        let rb = geom.layout.record_bytes;
        type Entries = (Vec<(u8, u32, u64)>, Vec<Option<(u32, u32)>>);
        let res = (|| -> Result<Entries> {
            {
                use std::os::fd::AsRawFd;
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::create(&data_path)
                    .map_err(|e| StoreError::io(&data_path, "create", e))?;
                f.write_all_at(&header, 0)
                    .map_err(|e| StoreError::io(&data_path, "write header", e))?;
                let size = geom.file_size();
                let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
                match rc {
                    0 => {}
                    libc::EOPNOTSUPP | libc::EINVAL => f
                        .set_len(size)
                        .map_err(|e| StoreError::io(&data_path, "set length of", e))?,
                    e => {
                        return Err(StoreError::io(
                            &data_path,
                            &format!(
                                "reserve {size} bytes (2 slots x {} records x {rb} bytes) for",
                                geom.num_records()
                            ),
                            std::io::Error::from_raw_os_error(e),
                        ))
                    }
                }
            }
            let zeros = vec![0u8; rb];
            let zero_crc = crc32fast::hash(&zeros);
            let mut entries = vec![(0u8, zero_crc, 0u64); geom.num_records()];
            let mut sections = vec![Some(geom.layout.section_crcs(&zeros)); geom.num_records()];
            if let Some(init) = init {
                let crcs = write_initial_records(&geom, &data_path, init)?;
                for (flat, c) in crcs.into_iter().enumerate() {
                    entries[flat].1 = geom.layout.record_crc(c);
                    sections[flat] = Some(c);
                }
            }
            Ok((entries, sections))
        })();
        let (entries, section_crcs) = match res {
            Ok(x) => x,
            Err(e) => {
                // A half-made store is worse than none: remove what we created.
                let _ = std::fs::remove_file(&data_path);
                return Err(e);
            }
        };
        let index = Index {
            format: "gmtier-index".into(),
            version: format::FORMAT_VERSION,
            num_layers,
            num_experts,
            record_bytes: rb,
            commit: 0,
            user_meta: String::new(),
            experts: entries,
            section_crcs,
        };
        index.store_atomic(dir)
    }

    /// Open a store with a RAM budget.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<ExpertStore> {
        let data_path = dir.join(DATA_FILE);
        if !data_path.exists() {
            return Err(StoreError::NotFound(format!(
                "{} not found: no expert store at {}; create one with ExpertStore.create (or check the path)",
                data_path.display(),
                dir.display()
            )));
        }
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
            index,
            latest: HashMap::new(),
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
        };
        let io = IoPool::new(opts.io_threads);
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

    /// The metadata string of the last commit.
    pub fn user_meta(&self) -> String {
        self.sh.lock().index.user_meta.clone()
    }

    /// Number of commits in the index.
    pub fn commit_count(&self) -> u64 {
        self.sh.lock().index.commit
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

    /// Stop I/O (waiting for what is in flight). Later calls fail with [`StoreError::Closed`].
    /// Uncommitted changes are dropped (the last commit stays on disk).
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
        sh.io.shutdown();
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        self.close();
    }
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

    /// Where the newest version of an expert lives on disk.
    fn source(&self, g: &Inner, k: Key) -> Source {
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

    /// The sections a request for `s` reads: those with bytes; nothing asked means the whole record.
    fn norm(&self, s: Sections) -> Sections {
        let full = self.geom.layout.nonempty();
        match s.intersect(full) {
            x if x.is_empty() => full,
            x => x,
        }
    }

    /// Start as many pending loads as the queue depth and the free/evictable slots allow.
    fn schedule(self: &Arc<Self>, g: &mut MutexGuard<'_, Inner>) {
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
            let inner = &mut **g;
            let (slots, committing, werr) =
                (&inner.slots, inner.committing, inner.write_error.is_some());
            // While committing (or after a failed write) dirty records stay put: no write-back may race the index.
            let Some(v) = inner
                .pool
                .victim(need, |s| !(slots[s].dirty && (committing || werr)))
            else {
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
    fn start_load(self: &Arc<Self>, g: &mut MutexGuard<'_, Inner>, v: usize, key: Key) {
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

    /// Resident, ready slot `v` lacks some of `secs`: read them into it (the slot stays assigned;
    /// requests wait for it as for a load).
    fn start_section_read(
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
    fn start_read(
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
        let off = self
            .geom
            .record_offset(key.0 as usize, key.1 as usize, src.slot)
            + start as u64;
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
    fn submit_record(
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
    fn lock_finished(&self, dir: Dir, n: usize) -> MutexGuard<'_, Inner> {
        let mut g = self.lock();
        g.inflight_chunks -= n;
        if dir == Dir::Read {
            g.inflight_read_chunks -= n;
        }
        g
    }

    /// Check a finished read against the index: the whole record's crc32 for a whole read,
    /// the section's for a section read. Returns the (weights, state) crcs of a whole read.
    fn verify(&self, r: &Read, crcs: &[u32]) -> std::result::Result<Option<(u32, u32)>, String> {
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

    fn finish_load(self: &Arc<Self>, v: usize, r: Read, n: usize, res: std::io::Result<Vec<u32>>) {
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

    /// Write slot `v`'s dirty record to its expert's uncommitted disk slot; then, if `evict_for`
    /// is set, load that key into `v`.
    fn start_writeback(
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

    fn finish_writeback(
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

    fn flush_locked(self: &Arc<Self>) -> Result<()> {
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

    fn release(self: &Arc<Self>, keys: &[Key]) -> Result<()> {
        let mut g = self.lock();
        self.release_locked(&mut g, keys)
    }

    /// A ticket gives its pins back without waiting: take it off the waiters of reads into
    /// its keys' slots, so a failing read does not drop its pin a second time.
    fn forget_ticket(&self, g: &mut Inner, id: u64, keys: &[Key]) {
        for &k in keys {
            if let Some(s) = g.pool.lookup(k) {
                g.slots[s].tickets.retain(|t| t.0 != id);
            } else if let Some(p) = g.pending.get_mut(&k) {
                p.tickets.retain(|t| t.0 != id);
            }
        }
    }

    fn release_locked(self: &Arc<Self>, g: &mut MutexGuard<'_, Inner>, keys: &[Key]) -> Result<()> {
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

#[doc(hidden)]
/// Test hook: the file offset of an expert's record slot and the slot the index commits.
pub fn record_location(store: &ExpertStore, layer: usize, expert: usize) -> (u64, u64, u8) {
    let g = store.sh.lock();
    let e = g.index.entry(store.sh.geom.flat(layer, expert));
    (
        store.sh.geom.record_offset(layer, expert, 0),
        store.sh.geom.record_offset(layer, expert, 1),
        e.slot,
    )
}

#[doc(hidden)]
/// Test hook: whether `key` is resident, and then (dirty, write-back running).
pub fn slot_status(store: &ExpertStore, key: Key) -> Option<(bool, bool)> {
    let g = store.sh.lock();
    g.pool
        .lookup(key)
        .map(|s| (g.slots[s].dirty, g.slots[s].state == SlotState::Flushing))
}

#[doc(hidden)]
/// Test hook: occupy every I/O worker with a job that blocks until the returned guard is
/// dropped, so that I/O queued meanwhile cannot start (deterministic tests of in-flight states).
pub fn block_io(store: &ExpertStore) -> IoBlock {
    let n = store.sh.opts.io_threads;
    let gate = Arc::new((Mutex::new((0usize, false)), Condvar::new()));
    for _ in 0..n {
        let gate = gate.clone();
        store.sh.io.submit(
            JobPriority {
                class: u8::MAX,
                priority: 0,
                seq: 0,
            },
            Box::new(move || {
                let (m, cv) = &*gate;
                let mut g = m.lock().unwrap();
                g.0 += 1;
                cv.notify_all();
                while !g.1 {
                    g = cv.wait(g).unwrap();
                }
            }),
        );
    }
    let (m, cv) = &*gate;
    let mut g = m.lock().unwrap();
    while g.0 < n {
        g = cv.wait(g).unwrap();
    }
    drop(g);
    IoBlock { gate }
}

#[doc(hidden)]
/// See [`block_io`]; dropping it lets the I/O workers go.
pub struct IoBlock {
    gate: Arc<(Mutex<(usize, bool)>, Condvar)>,
}

impl Drop for IoBlock {
    fn drop(&mut self) {
        let (m, cv) = &*self.gate;
        m.lock().unwrap().1 = true;
        cv.notify_all();
    }
}

/// The index file name (for tools and tests).
pub fn index_path(dir: &Path) -> PathBuf {
    dir.join(INDEX_FILE)
}
