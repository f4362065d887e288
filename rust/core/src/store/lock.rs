//! The store directory lock: one open [`super::ExpertStore`] per store, across processes.
//!
//! `flock(LOCK_EX | LOCK_NB)` on the file `lock` in the store directory, which holds the pid of
//! the process that took it. flock locks belong to an open file description: a second open in
//! the same process conflicts as one from another process does, reading or copying the file
//! leaves the lock alone, and the kernel drops it when the process dies (a stale `lock` file
//! never blocks anyone). A process forked while the store is open shares the description, and
//! so the lock, until it execs or exits: an open that finds the lock held under this process's
//! own pid, by no ExpertStore of this process, waits up to [`FORK_GRACE`] for that.

use super::{Result, StoreError};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The lock file's name in the store directory.
pub const LOCK_FILE: &str = "lock";

/// How long an open waits for a child forked from this process (one being started with
/// fork + exec, say) to let go of a lock this process has released.
pub const FORK_GRACE: Duration = Duration::from_secs(1);

/// (device, inode) of the lock files the ExpertStores of this process hold.
fn held() -> MutexGuard<'static, HashSet<(u64, u64)>> {
    static HELD: OnceLock<Mutex<HashSet<(u64, u64)>>> = OnceLock::new();
    HELD.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// A held store lock; dropping it releases the lock.
#[derive(Debug)]
pub(super) struct StoreLock {
    _file: File,
    id: (u64, u64),
}

impl StoreLock {
    /// Take the lock of store directory `dir`, or fail with [`StoreError::Locked`] naming the
    /// directory and the holder's pid.
    pub(super) fn acquire(dir: &Path) -> Result<StoreLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io(&path, "open the lock file", e))?;
        let m = file
            .metadata()
            .map_err(|e| StoreError::io(&path, "stat", e))?;
        let id = (m.dev(), m.ino());
        let this = std::process::id();
        let t0 = Instant::now();
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(StoreError::io(&path, "lock", err));
            }
            let pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok());
            let holder = match pid {
                Some(p) if p == this && held().contains(&id) => {
                    format!("this process (pid {p}), through another ExpertStore")
                }
                Some(p) if p == this && t0.elapsed() < FORK_GRACE => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Some(p) if p == this => format!(
                    "a process forked from this one (pid {p}) while the store was open, which \
                     still shares its lock"
                ),
                Some(p) => format!("process {p}"),
                // The holder took the lock but has not written its pid yet.
                None => "another process".to_string(),
            };
            return Err(StoreError::Locked(format!(
                "the expert store {} is already open in {holder}: one store is opened by one \
                 ExpertStore at a time (two writers would overwrite each other's records); \
                 close it there first, or wait for that process to end",
                dir.display()
            )));
        }
        // The pid stays in the file after release: it is read only while the lock is held.
        file.set_len(0)
            .and_then(|_| file.write_all(format!("{this}\n").as_bytes()))
            .map_err(|e| StoreError::io(&path, "write the pid to", e))?;
        held().insert(id);
        Ok(StoreLock { _file: file, id })
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        held().remove(&self.id);
    }
}
