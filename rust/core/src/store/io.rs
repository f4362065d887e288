//! Aligned memory, O_DIRECT files with a buffered fallback, and a pread/pwrite worker pool
//! that keeps reads and writes both moving, each most urgent first.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::format::ALIGN;

/// Page-aligned anonymous memory (mmap): the RAM arena and I/O bounce buffers. Zero-filled.
pub struct Arena {
    ptr: *mut u8,
    len: usize,
}

// The arena is plain memory; who may touch which bytes is decided by the slot pool.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    /// Map `len` bytes (rounded up to 4096), backed by huge pages where the kernel allows.
    pub fn new(len: usize) -> io::Result<Arena> {
        let len = len.max(ALIGN).div_ceil(ALIGN) * ALIGN;
        // SAFETY: anonymous private mapping, checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Best effort: fewer TLB misses, and fault pages in now rather than inside the first reads.
        unsafe {
            libc::madvise(p, len, libc::MADV_HUGEPAGE);
            libc::madvise(p, len, 23 /* MADV_POPULATE_WRITE, Linux 5.14+ */);
        }
        Ok(Arena {
            ptr: p as *mut u8,
            len,
        })
    }
    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Never true (an arena has at least one page); for clippy's len/is_empty pairing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The whole arena as a mutable slice.
    ///
    /// # Safety
    /// The caller must make sure nobody else accesses the same bytes concurrently.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(off), len)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// A data file opened twice: with O_DIRECT (when the filesystem allows it) and buffered. If the
/// filesystem refuses O_DIRECT at open (EINVAL, e.g. older tmpfs) or on the first I/O, every
/// later I/O uses the buffered descriptor and [`DataFile::direct`] turns false.
pub struct DataFile {
    direct_file: Option<File>,
    buffered: File,
    direct_ok: AtomicBool,
}

impl DataFile {
    /// Open `path` read-write (or read-only), trying O_DIRECT when `direct` is set.
    pub fn open(path: &Path, write: bool, direct: bool) -> io::Result<DataFile> {
        let buffered = OpenOptions::new().read(true).write(write).open(path)?;
        let direct_file = if direct {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok()
        } else {
            None
        };
        let ok = direct_file.is_some();
        Ok(DataFile {
            direct_file,
            buffered,
            direct_ok: AtomicBool::new(ok),
        })
    }
    /// Whether I/O still bypasses the page cache.
    pub fn direct(&self) -> bool {
        self.direct_ok.load(AtomicOrdering::Relaxed)
    }
    /// The buffered handle (metadata, fsync).
    pub fn file(&self) -> &File {
        &self.buffered
    }
    fn pick(&self) -> &File {
        match (&self.direct_file, self.direct()) {
            (Some(f), true) => f,
            _ => &self.buffered,
        }
    }
    /// Read exactly `buf.len()` bytes at `off` (buf and off 4096-aligned for O_DIRECT).
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self.pick().read_exact_at(buf, off) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && self.direct() => {
                self.direct_ok.store(false, AtomicOrdering::Relaxed);
                self.buffered.read_exact_at(buf, off)
            }
            r => r,
        }
    }
    /// Write all of `buf` at `off`.
    pub fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        match self.pick().write_all_at(buf, off) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && self.direct() => {
                self.direct_ok.store(false, AtomicOrdering::Relaxed);
                self.buffered.write_all_at(buf, off)
            }
            r => r,
        }
    }
    /// fdatasync.
    pub fn sync_data(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }
}

/// Job priority: class (see the constants: prefetch, demand read, write-back, urgent
/// write-back), then priority, then FIFO. Classes from [`JobPriority::WRITE`] up are writes, the
/// others reads; [`IoPool`] keeps the two apart so that both make progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobPriority {
    /// Coarse class; higher runs first among jobs of the same kind (read or write).
    pub class: u8,
    /// Finer priority inside a class; higher runs first.
    pub priority: i64,
    /// Submission order; lower runs first.
    pub seq: u64,
}

impl JobPriority {
    /// A prefetch read.
    pub const PREFETCH: u8 = 0;
    /// A demand read (someone waits for it).
    pub const DEMAND: u8 = 1;
    /// A write-back nobody waits for yet (write-behind, flush, commit).
    pub const WRITE: u8 = 2;
    /// A write-back a demand read waits for (eviction of a dirty slot): runs before any read.
    pub const URGENT_WRITE: u8 = 3;
    /// Whether the job writes (class [`Self::WRITE`] or higher).
    pub fn is_write(&self) -> bool {
        self.class >= Self::WRITE
    }
}

impl Ord for JobPriority {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.class, self.priority)
            .cmp(&(o.class, o.priority))
            .then(o.seq.cmp(&self.seq))
    }
}
impl PartialOrd for JobPriority {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

struct Job {
    prio: JobPriority,
    run: Box<dyn FnOnce() + Send>,
}
impl PartialEq for Job {
    fn eq(&self, o: &Self) -> bool {
        self.prio == o.prio
    }
}
impl Eq for Job {}
impl Ord for Job {
    fn cmp(&self, o: &Self) -> Ordering {
        self.prio.cmp(&o.prio)
    }
}
impl PartialOrd for Job {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

struct Queue {
    reads: BinaryHeap<Job>,
    writes: BinaryHeap<Job>,
    /// Write jobs running now.
    writes_running: usize,
    /// Read jobs running now.
    reads_running: usize,
    /// Whether the last job taken was a write (a one-thread pool alternates).
    last_was_write: bool,
    /// `Some(n)`: reads and writes take turns, never running at once, each turn at most `n`
    /// jobs while the other kind waits (see [`IoPool::set_turns`]); `None`: both at once.
    turn_jobs: Option<usize>,
    /// Jobs of the last job's kind taken in a row.
    taken_in_turn: usize,
    /// Taking turns: how many of the other kind's jobs may still be running when a job starts
    /// (0: none; more keeps the disk's queue filled while a turn's last chunks finish).
    turn_overlap: usize,
    stop: bool,
}

impl Queue {
    /// The next job for a free worker of a pool of `threads`, and whether it writes. Reads and
    /// writes are queued apart: with only one kind queued, its most urgent job runs (heap
    /// order). With both, an urgent write-back (a demand read waits for it) runs first; other
    /// writes run while fewer than half the workers write (a one-thread pool alternates), else
    /// the most urgent read. So a batch of write-behinds never starves demand reads, reads
    /// never starve writes, and a full-duplex disk sees both at once.
    ///
    /// Taking turns (`turn_jobs`), a job starts only while no job of the other kind runs: an
    /// urgent write-back wins the next turn; otherwise the kind of the last job keeps the disk
    /// for up to `turn_jobs` jobs while the other kind waits, or until its queue is empty; the
    /// other kind starts once the last job of the turn has finished. For a disk that moves
    /// fewer bytes a second reading and writing at once than one after the other.
    fn pop(&mut self, threads: usize) -> Option<(Job, bool)> {
        let write = match (self.writes.peek(), self.reads.peek()) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(w), Some(_)) if w.prio.class >= JobPriority::URGENT_WRITE => true,
            (Some(_), Some(_)) => match self.turn_jobs {
                Some(n) if self.taken_in_turn < n => self.last_was_write,
                Some(_) => !self.last_was_write,
                None if threads == 1 => !self.last_was_write,
                None => self.writes_running < threads / 2,
            },
        };
        let other_running = if write {
            self.reads_running
        } else {
            self.writes_running
        };
        if self.turn_jobs.is_some() && other_running > self.turn_overlap {
            return None; // the turn's last jobs are still running
        }
        let job = if write {
            self.writes.pop()
        } else {
            self.reads.pop()
        }?;
        if write {
            self.writes_running += 1;
        } else {
            self.reads_running += 1;
        }
        self.taken_in_turn = if write == self.last_was_write {
            self.taken_in_turn + 1
        } else {
            1
        };
        self.last_was_write = write;
        Some((job, write))
    }

    /// A job of the kind `write` has finished: whether workers waiting for its kind's turn to
    /// end must be woken.
    fn finish(&mut self, write: bool) -> bool {
        let running = if write {
            &mut self.writes_running
        } else {
            &mut self.reads_running
        };
        *running -= 1;
        *running <= self.turn_overlap && self.turn_jobs.is_some()
    }
}

/// Worker threads that run I/O jobs: reads and writes from separate queues, each most urgent
/// first, both making progress when both are queued (see `Queue::pop`). The caller bounds how
/// many jobs are queued (the store's queue depth); the pool itself only orders them.
pub struct IoPool {
    q: Arc<(Mutex<Queue>, Condvar)>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl IoPool {
    /// Start `threads` workers.
    pub fn new(threads: usize) -> IoPool {
        let threads = threads.max(1);
        let q = Arc::new((
            Mutex::new(Queue {
                reads: BinaryHeap::new(),
                writes: BinaryHeap::new(),
                writes_running: 0,
                reads_running: 0,
                last_was_write: false,
                turn_jobs: None,
                taken_in_turn: 0,
                turn_overlap: 0,
                stop: false,
            }),
            Condvar::new(),
        ));
        let workers = (0..threads)
            .map(|i| {
                let q = q.clone();
                std::thread::Builder::new()
                    .name(format!("gmtier-io-{i}"))
                    .spawn(move || loop {
                        let (m, cv) = &*q;
                        let (job, write) = {
                            let mut g = m.lock().unwrap();
                            loop {
                                if let Some(j) = g.pop(threads) {
                                    break j;
                                }
                                // (A job can stay queued while the other kind's turn ends.)
                                if g.stop && g.reads.is_empty() && g.writes.is_empty() {
                                    return;
                                }
                                g = cv.wait(g).unwrap();
                            }
                        };
                        (job.run)();
                        if m.lock().unwrap().finish(write) {
                            cv.notify_all();
                        }
                    })
                    .expect("spawn I/O thread")
            })
            .collect();
        IoPool {
            q,
            workers: Mutex::new(workers),
        }
    }
    /// Queue a job.
    pub fn submit(&self, prio: JobPriority, run: Box<dyn FnOnce() + Send>) {
        let (m, cv) = &*self.q;
        let mut g = m.lock().unwrap();
        let job = Job { prio, run };
        if prio.is_write() {
            g.writes.push(job);
        } else {
            g.reads.push(job);
        }
        drop(g);
        cv.notify_one();
    }
    /// Let reads and writes take turns of at most `turn_jobs` jobs each (`Some`), or run both at
    /// once (`None`, the default); see `Queue::pop`. Takes effect from the next job taken.
    /// `overlap`: how many jobs of the last turn may still run when the next one starts (0:
    /// none, so reads and writes never run at once).
    pub fn set_turns(&self, turn_jobs: Option<usize>, overlap: usize) {
        let (m, cv) = &*self.q;
        let mut q = m.lock().unwrap();
        q.turn_jobs = turn_jobs.map(|n| n.max(1));
        q.turn_overlap = overlap;
        drop(q);
        cv.notify_all();
    }
    /// Run the queued jobs, then stop and join the workers.
    pub fn shutdown(&self) {
        let (m, cv) = &*self.q;
        m.lock().unwrap().stop = true;
        cv.notify_all();
        for w in self.workers.lock().unwrap().drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Called once when a record's I/O is done, with the crc32 of each segment or the first error.
pub type IoDone = Box<dyn FnOnce(io::Result<Vec<u32>>) + Send>;

/// Chunks [`record_io`] splits `segments` into.
pub fn record_chunks(segments: &[usize], chunk: usize) -> usize {
    let chunk = chunk.max(ALIGN);
    segments.iter().map(|l| l.div_ceil(chunk).max(1)).sum()
}

/// A raw pointer that may cross threads; the slot pool guarantees exclusive access.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut u8);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole Send wrapper, not the raw field).
    pub fn get(self) -> *mut u8 {
        self.0
    }
}

/// Read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// File -> memory.
    Read,
    /// Memory -> file.
    Write,
}

/// Read or write contiguous bytes (a record or a section of one) as concurrent chunks of
/// `chunk` bytes: `segments` are consecutive lengths (e.g. the weights and state sections)
/// starting at `offset` in the file and `ptr` in memory; no chunk straddles two segments. Each
/// chunk's crc32 is computed by the worker that moved it (cache-hot), and the last chunk
/// combines them and calls `done` with each segment's crc32. Returns the number of chunks
/// queued ([`record_chunks`]).
#[allow(clippy::too_many_arguments)]
pub fn record_io(
    pool: &IoPool,
    file: &Arc<DataFile>,
    dir: Dir,
    offset: u64,
    ptr: SendPtr,
    segments: &[usize],
    chunk: usize,
    prio: JobPriority,
    done: IoDone,
) -> usize {
    let chunk = chunk.max(ALIGN);
    // (segment, start, len) of every chunk.
    let mut pieces = Vec::new();
    let mut start = 0usize;
    for (si, &len) in segments.iter().enumerate() {
        let n = len.div_ceil(chunk).max(1);
        for i in 0..n {
            let s = i * chunk;
            pieces.push((si, start + s, chunk.min(len - s.min(len))));
        }
        start += len;
    }
    let n = pieces.len();
    struct Op {
        remaining: AtomicUsize,
        crcs: Mutex<Vec<Option<crc32fast::Hasher>>>,
        err: Mutex<Option<io::Error>>,
        done: Mutex<Option<IoDone>>,
        segment_of: Vec<usize>,
        segments: usize,
    }
    let op = Arc::new(Op {
        remaining: AtomicUsize::new(n),
        crcs: Mutex::new(vec![None; n]),
        err: Mutex::new(None),
        done: Mutex::new(Some(done)),
        segment_of: pieces.iter().map(|p| p.0).collect(),
        segments: segments.len(),
    });
    for (i, &(_, start, clen)) in pieces.iter().enumerate() {
        let (op, file) = (op.clone(), file.clone());
        let run = move || {
            // SAFETY: the slot is owned by this I/O until `done` runs (the pool pins it).
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(start), clen) };
            let res = match dir {
                Dir::Read => file.read_exact_at(buf, offset + start as u64).map(|_| {
                    let mut h = crc32fast::Hasher::new();
                    h.update(buf);
                    h
                }),
                Dir::Write => {
                    let mut h = crc32fast::Hasher::new();
                    h.update(buf);
                    file.write_all_at(buf, offset + start as u64).map(|_| h)
                }
            };
            match res {
                Ok(h) => op.crcs.lock().unwrap()[i] = Some(h),
                Err(e) => {
                    op.err.lock().unwrap().get_or_insert(e);
                }
            }
            if op.remaining.fetch_sub(1, AtomicOrdering::AcqRel) == 1 {
                let result = match op.err.lock().unwrap().take() {
                    Some(e) => Err(e),
                    None => {
                        let crcs = op.crcs.lock().unwrap();
                        let mut totals = vec![crc32fast::Hasher::new(); op.segments];
                        for (h, &si) in crcs.iter().zip(&op.segment_of) {
                            totals[si].combine(h.as_ref().expect("every chunk finished"));
                        }
                        Ok(totals.into_iter().map(|h| h.finalize()).collect())
                    }
                };
                let done = op.done.lock().unwrap().take().expect("done runs once");
                done(result);
            }
        };
        pool.submit(prio, Box::new(run));
    }
    n
}

/// Drop a file's clean pages from the page cache (used when O_DIRECT is unavailable so that a
/// benchmark still reads from the disk). Needs no privileges.
pub fn drop_cache(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path)?;
    f.sync_data()?;
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Result of [`raw_read`].
#[derive(Clone, Copy, Debug)]
pub struct RawRead {
    /// Bytes read.
    pub bytes: u64,
    /// Wall seconds.
    pub seconds: f64,
    /// Whether O_DIRECT was used.
    pub direct: bool,
}

/// The physical limit: read the byte ranges of a file with `threads` concurrent preads of
/// `chunk` bytes into reused aligned buffers (O_DIRECT when possible), no processing.
pub fn raw_read(
    path: &Path,
    ranges: &[(u64, u64)],
    chunk: usize,
    threads: usize,
    direct: bool,
) -> io::Result<RawRead> {
    let file = Arc::new(DataFile::open(path, false, direct)?);
    let chunk = chunk.max(ALIGN).div_ceil(ALIGN) * ALIGN;
    let mut pieces = Vec::new();
    for &(off, len) in ranges {
        let mut p = 0;
        while p < len {
            let l = (chunk as u64).min(len - p);
            pieces.push((off + p, l as usize));
            p += l;
        }
    }
    let pieces = Arc::new(pieces);
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (file, pieces, next) = (file.clone(), pieces.clone(), next.clone());
            std::thread::spawn(move || -> io::Result<u64> {
                let buf = Arena::new(chunk)?;
                let mut total = 0u64;
                loop {
                    let i = next.fetch_add(1, AtomicOrdering::Relaxed);
                    let Some(&(off, len)) = pieces.get(i) else {
                        return Ok(total);
                    };
                    let b = unsafe { buf.slice_mut(0, len.div_ceil(ALIGN) * ALIGN) };
                    file.read_exact_at(&mut b[..len], off)?;
                    total += len as u64;
                }
            })
        })
        .collect();
    let mut bytes = 0;
    for h in handles {
        bytes += h.join().expect("raw read thread")?;
    }
    Ok(RawRead {
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
        direct: file.direct(),
    })
}
