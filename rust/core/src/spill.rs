//! A scratch file for activations spilled from pinned RAM: blocking, page-aligned reads and
//! writes split into concurrent chunks on the store's I/O machinery (`store::io`: O_DIRECT with
//! a buffered fallback, the worker pool, per-chunk crc32). The file holds nothing that must
//! survive the process, so it is created empty, never synced, and deleted at close or drop.
//!
//! Callers pass byte ranges they own; several threads may move disjoint ranges at once.
//! Errors are [`StoreError`]s: `InvalidArgument` for an unaligned or out-of-use call, `Io`
//! (naming the file and the bytes) for an OS error, `Corrupt` for a short file or a crc that
//! differs from the one the caller expects.

use crate::error::{Result, StoreError};
use crate::store::format::ALIGN;
use crate::store::io::{record_io, DataFile, Dir, IoPool, JobPriority, SendPtr};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Options for [`SpillFile::create`].
#[derive(Clone, Debug)]
pub struct SpillOptions {
    /// I/O worker threads of the file's own pool.
    pub io_threads: usize,
    /// Try O_DIRECT (falls back to buffered I/O where the filesystem refuses it).
    pub direct: bool,
    /// Bytes per pread/pwrite (a multiple of 4096); a transfer is split into chunks that run
    /// concurrently.
    pub chunk_bytes: usize,
}

impl Default for SpillOptions {
    fn default() -> Self {
        SpillOptions {
            io_threads: 4,
            direct: true,
            chunk_bytes: 4 << 20,
        }
    }
}

/// Counters; see [`SpillFile::metrics`]. Only completed transfers count.
#[derive(Clone, Debug, Default)]
pub struct SpillMetrics {
    /// Bytes written to the file.
    pub bytes_written: u64,
    /// Bytes read back.
    pub bytes_read: u64,
    /// Seconds spent in writes, summed over calls (concurrent calls overlap, so this can
    /// exceed wall time).
    pub write_s: f64,
    /// Seconds spent in reads, summed over calls.
    pub read_s: f64,
}

struct State {
    /// `None` once closed: closing drops the descriptors so the disk space is freed at once.
    file: Option<Arc<DataFile>>,
    /// Transfers running now; close waits for them.
    in_flight: usize,
    /// Whether O_DIRECT was in effect when the file was closed.
    direct_at_close: bool,
}

/// A scratch file of spilled bytes. See the module documentation.
pub struct SpillFile {
    path: PathBuf,
    chunk_bytes: usize,
    io: IoPool,
    state: Mutex<State>,
    idle: Condvar,
    seq: AtomicU64,
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    write_ns: AtomicU64,
    read_ns: AtomicU64,
}

/// Decrements the in-flight count when a transfer ends, however it ends.
struct InFlight<'a>(&'a SpillFile);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
        self.0.idle.notify_all();
    }
}

impl SpillFile {
    /// Create (or truncate) the scratch file at `path`, readable and writable by its owner only.
    pub fn create(path: &Path, opts: &SpillOptions) -> Result<SpillFile> {
        if opts.io_threads == 0 {
            return Err(StoreError::InvalidArgument(
                "a spill file needs io_threads >= 1".into(),
            ));
        }
        if opts.chunk_bytes == 0 || !opts.chunk_bytes.is_multiple_of(ALIGN) {
            return Err(StoreError::InvalidArgument(format!(
                "spill chunk_bytes={} must be a positive multiple of {ALIGN} (O_DIRECT moves whole pages)",
                opts.chunk_bytes
            )));
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::io(path, "create spill file", e))?;
        let file = DataFile::open(path, true, opts.direct).map_err(|e| {
            let _ = std::fs::remove_file(path);
            StoreError::io(path, "open spill file", e)
        })?;
        Ok(SpillFile {
            path: path.to_path_buf(),
            chunk_bytes: opts.chunk_bytes,
            io: IoPool::new(opts.io_threads),
            state: Mutex::new(State {
                file: Some(Arc::new(file)),
                in_flight: 0,
                direct_at_close: false,
            }),
            idle: Condvar::new(),
            seq: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            write_ns: AtomicU64::new(0),
            read_ns: AtomicU64::new(0),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether I/O bypasses the page cache (false after a fallback to buffered I/O).
    pub fn direct(&self) -> bool {
        let g = self.lock();
        match &g.file {
            Some(f) => f.direct(),
            None => g.direct_at_close,
        }
    }

    /// Whether [`SpillFile::close`] has run.
    pub fn closed(&self) -> bool {
        self.lock().file.is_none()
    }

    /// Counters of completed transfers.
    pub fn metrics(&self) -> SpillMetrics {
        SpillMetrics {
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            write_s: self.write_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            read_s: self.read_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    /// Write `buf` at `offset`; returns its crc32. Both and `buf`'s address 4096-aligned.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<u32> {
        // SAFETY: `buf` is borrowed for the whole (blocking) transfer, which only reads it.
        unsafe { self.write_raw(offset, buf.as_ptr(), buf.len()) }
    }

    /// Read `buf.len()` bytes at `offset` into `buf`; returns their crc32, checked against
    /// `expect_crc` when given.
    pub fn read(&self, offset: u64, buf: &mut [u8], expect_crc: Option<u32>) -> Result<u32> {
        // SAFETY: `buf` is borrowed mutably for the whole (blocking) transfer.
        unsafe { self.read_raw(offset, buf.as_mut_ptr(), buf.len(), expect_crc) }
    }

    /// [`SpillFile::write`] from `nbytes` at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + nbytes` must be readable and not written by anyone until this returns.
    pub unsafe fn write_raw(&self, offset: u64, ptr: *const u8, nbytes: usize) -> Result<u32> {
        self.transfer(Dir::Write, offset, ptr as *mut u8, nbytes)
    }

    /// [`SpillFile::read`] into `nbytes` at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + nbytes` must be writable and not accessed by anyone until this returns.
    pub unsafe fn read_raw(
        &self,
        offset: u64,
        ptr: *mut u8,
        nbytes: usize,
        expect_crc: Option<u32>,
    ) -> Result<u32> {
        let crc = self.transfer(Dir::Read, offset, ptr, nbytes)?;
        match expect_crc {
            Some(want) if want != crc => Err(StoreError::Corrupt(format!(
                "spill file {}: the {nbytes} bytes at offset {offset} read back with crc32 \
                 {crc:#010x}, but were written with {want:#010x}: a torn or corrupt spill (the \
                 file was changed behind its writer, or the disk returned bad data); its \
                 activations cannot be trusted, so rerun the step",
                self.path.display()
            ))),
            _ => Ok(crc),
        }
    }

    /// Delete the file once the transfers running now have finished; later transfers fail.
    /// Idempotent.
    pub fn close(&self) -> Result<()> {
        let mut g = self.lock();
        let Some(file) = g.file.take() else {
            return Ok(());
        };
        g.direct_at_close = file.direct();
        drop(file);
        while g.in_flight > 0 {
            g = self.idle.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        drop(g);
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::io(&self.path, "delete spill file", e))
            }
            _ => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Move `nbytes` between `ptr` and the file at `offset` as concurrent chunks on the pool,
    /// blocking until every chunk is done; returns the crc32 of the bytes.
    fn transfer(&self, dir: Dir, offset: u64, ptr: *mut u8, nbytes: usize) -> Result<u32> {
        let what = match dir {
            Dir::Write => "write",
            Dir::Read => "read",
        };
        for (name, value) in [
            ("offset", offset),
            ("address", ptr as u64),
            ("nbytes", nbytes as u64),
        ] {
            if !value.is_multiple_of(ALIGN as u64) {
                return Err(StoreError::InvalidArgument(format!(
                    "spill {what}: {name}={value} is not a multiple of {ALIGN}; offset, address \
                     and nbytes must all be (O_DIRECT moves whole pages): allocate buffers with \
                     AlignedBuffer and round each spilled range up to {ALIGN} bytes"
                )));
            }
        }
        if ptr.is_null() {
            return Err(StoreError::InvalidArgument(format!(
                "spill {what}: address 0 is not memory"
            )));
        }
        let file = {
            let mut g = self.lock();
            let file = g.file.clone().ok_or_else(|| {
                StoreError::InvalidArgument(format!(
                    "spill {what} on {}, which is closed; create a new SpillFile",
                    self.path.display()
                ))
            })?;
            g.in_flight += 1;
            file
        };
        let _in_flight = InFlight(self);
        if nbytes == 0 {
            return Ok(crc32fast::hash(&[]));
        }
        let t0 = Instant::now();
        let (tx, rx) = mpsc::channel();
        let prio = JobPriority {
            class: match dir {
                Dir::Write => JobPriority::WRITE,
                Dir::Read => JobPriority::DEMAND,
            },
            priority: 0,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        };
        record_io(
            &self.io,
            &file,
            dir,
            offset,
            SendPtr(ptr),
            &[nbytes],
            self.chunk_bytes,
            prio,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let result = rx
            .recv()
            .expect("record_io calls done exactly once, before its last chunk's job returns");
        let crc = match result {
            Ok(crcs) => crcs[0],
            Err(e) => return Err(self.io_error(dir, offset, nbytes, &file, e)),
        };
        let (bytes, ns) = match dir {
            Dir::Write => (&self.bytes_written, &self.write_ns),
            Dir::Read => (&self.bytes_read, &self.read_ns),
        };
        bytes.fetch_add(nbytes as u64, Ordering::Relaxed);
        ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(crc)
    }

    fn io_error(
        &self,
        dir: Dir,
        offset: u64,
        nbytes: usize,
        file: &DataFile,
        e: io::Error,
    ) -> StoreError {
        let range = format!("{nbytes} bytes at offset {offset}");
        match dir {
            Dir::Read if e.kind() == io::ErrorKind::UnexpectedEof => {
                let len = file.file().metadata().map(|m| m.len()).unwrap_or(0);
                StoreError::Corrupt(format!(
                    "spill file {} is {len} bytes long, so a read of {range} runs past its end: \
                     those bytes were never written (or the file was truncated behind its writer)",
                    self.path.display()
                ))
            }
            Dir::Read => StoreError::io(&self.path, &format!("spill read of {range} from"), e),
            Dir::Write => StoreError::io(&self.path, &format!("spill write of {range} to"), e),
        }
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::io::Arena;

    fn spill(dir: &tempfile::TempDir, chunk_bytes: usize) -> SpillFile {
        let opts = SpillOptions {
            io_threads: 3,
            chunk_bytes,
            ..SpillOptions::default()
        };
        SpillFile::create(&dir.path().join("act.spill"), &opts).unwrap()
    }

    /// Arena bytes filled from a seed (xorshift), different for every seed.
    fn random_arena(len: usize, seed: u64) -> Arena {
        let a = Arena::new(len).unwrap();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for b in unsafe { a.slice_mut(0, len) } {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        a
    }

    #[test]
    fn round_trip_in_concurrent_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let f = spill(&dir, 2 * ALIGN);
        let len = 7 * ALIGN; // four chunks, the last one short
        let src = random_arena(len, 1);
        let src = unsafe { src.slice_mut(0, len) };
        let crc = f.write(3 * ALIGN as u64, src).unwrap();
        assert_eq!(crc, crc32fast::hash(src));
        let dst = Arena::new(len).unwrap();
        let dst = unsafe { dst.slice_mut(0, len) };
        assert_eq!(f.read(3 * ALIGN as u64, dst, Some(crc)).unwrap(), crc);
        assert_eq!(src, dst);
        let m = f.metrics();
        assert_eq!((m.bytes_written, m.bytes_read), (len as u64, len as u64));
        assert!(m.write_s > 0.0 && m.read_s > 0.0);
    }

    #[test]
    fn unaligned_calls_are_refused_naming_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let f = spill(&dir, ALIGN);
        let a = Arena::new(2 * ALIGN).unwrap();
        let buf = unsafe { a.slice_mut(0, 2 * ALIGN) };
        let msg = |r: Result<u32>| match r {
            Err(StoreError::InvalidArgument(m)) => m,
            r => panic!("expected InvalidArgument, got {r:?}"),
        };
        assert!(msg(f.write(100, &buf[..ALIGN])).contains("offset=100 is not a multiple of 4096"));
        assert!(msg(f.write(0, &buf[..100])).contains("nbytes=100"));
        let m = msg(f.read(0, &mut buf[8..8 + ALIGN], None));
        assert!(m.contains("address=") && m.contains("AlignedBuffer"), "{m}");
        assert_eq!(f.metrics().bytes_written, 0);
    }

    #[test]
    fn a_changed_byte_fails_the_expected_crc() {
        let dir = tempfile::tempdir().unwrap();
        let f = spill(&dir, ALIGN);
        let len = 3 * ALIGN;
        let src = random_arena(len, 2);
        let crc = f.write(0, unsafe { src.slice_mut(0, len) }).unwrap();
        // Flip one byte of the middle chunk behind the spill file's back.
        let other = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        let mut b = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(&other, &mut b, 5000).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&other, &[b[0] ^ 0x10], 5000).unwrap();
        let dst = Arena::new(len).unwrap();
        match f.read(0, unsafe { dst.slice_mut(0, len) }, Some(crc)) {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("torn or corrupt spill"), "{m}"),
            r => panic!("expected Corrupt, got {r:?}"),
        }
        // Without an expected crc the read succeeds and its crc shows the change.
        assert_ne!(
            f.read(0, unsafe { dst.slice_mut(0, len) }, None).unwrap(),
            crc
        );
    }

    #[test]
    fn a_read_past_the_end_is_an_error_not_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let f = spill(&dir, ALIGN);
        let a = Arena::new(2 * ALIGN).unwrap();
        f.write(0, unsafe { a.slice_mut(0, ALIGN) }).unwrap();
        match f.read(0, unsafe { a.slice_mut(0, 2 * ALIGN) }, None) {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("runs past its end"), "{m}"),
            r => panic!("expected Corrupt, got {r:?}"),
        }
    }

    #[test]
    fn concurrent_disjoint_transfers() {
        let dir = tempfile::tempdir().unwrap();
        let f = spill(&dir, ALIGN);
        let (threads, len) = (6, 5 * ALIGN);
        let srcs: Vec<Arena> = (0..threads).map(|t| random_arena(len, 10 + t)).collect();
        let crcs: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = srcs
                .iter()
                .enumerate()
                .map(|(t, a)| {
                    let f = &f;
                    s.spawn(move || f.write((t * len) as u64, unsafe { a.slice_mut(0, len) }))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        // Read each range back concurrently too, checked against its crc.
        std::thread::scope(|s| {
            for (t, a) in srcs.iter().enumerate() {
                let (f, crc) = (&f, crcs[t]);
                s.spawn(move || {
                    let dst = Arena::new(len).unwrap();
                    let dst = unsafe { dst.slice_mut(0, len) };
                    f.read((t * len) as u64, dst, Some(crc)).unwrap();
                    assert_eq!(dst, unsafe { a.slice_mut(0, len) });
                });
            }
        });
        assert_eq!(f.metrics().bytes_read, (threads as usize * len) as u64);
    }

    #[test]
    fn close_deletes_the_file_and_refuses_later_transfers() {
        let dir = tempfile::tempdir().unwrap();
        let f = spill(&dir, ALIGN);
        let path = f.path().to_path_buf();
        let a = Arena::new(ALIGN).unwrap();
        f.write(0, unsafe { a.slice_mut(0, ALIGN) }).unwrap();
        assert!(path.exists());
        f.close().unwrap();
        f.close().unwrap();
        assert!(!path.exists() && f.closed());
        match f.write(0, unsafe { a.slice_mut(0, ALIGN) }) {
            Err(StoreError::InvalidArgument(m)) => assert!(m.contains("closed"), "{m}"),
            r => panic!("expected InvalidArgument, got {r:?}"),
        }
        let g = spill(&dir, ALIGN);
        drop(g);
        assert!(!path.exists(), "drop deletes the file too");
    }

    #[test]
    fn bad_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        for opts in [
            SpillOptions {
                chunk_bytes: 1000,
                ..SpillOptions::default()
            },
            SpillOptions {
                io_threads: 0,
                ..SpillOptions::default()
            },
        ] {
            assert!(matches!(
                SpillFile::create(&path, &opts),
                Err(StoreError::InvalidArgument(_))
            ));
        }
        assert!(!path.exists());
    }
}
