//! The crate's error types: [`StoreError`] for the expert store, [`AdamError`] for the AdamW.
//! Each message names the problem and, where there is one, the fix.

use crate::adam::Simd;
use std::path::Path;

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
    /// The store is open elsewhere (this or another process holds its lock).
    Locked(String),
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
            | StoreError::Locked(m)
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

/// Errors of the AdamW.
#[derive(Clone, Debug, PartialEq)]
pub enum AdamError {
    /// The requested SIMD path needs CPU features this machine lacks.
    SimdUnavailable(Simd),
    /// Bad arguments.
    Invalid(String),
    /// A worker panicked (a bug).
    Panicked(String),
}

impl std::fmt::Display for AdamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdamError::SimdUnavailable(s) => write!(
                f,
                "simd path {:?} is not available on this CPU (available: {})",
                s.name(),
                Simd::available()
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            AdamError::Invalid(msg) => write!(f, "{msg}"),
            AdamError::Panicked(msg) => write!(f, "adam worker panicked: {msg}"),
        }
    }
}

impl std::error::Error for AdamError {}
