//! The Python exceptions of `gmtier._core`: `StoreError`, `SpillError`, and the conversions of
//! the core's errors to the Python exception that fits each.

use gmtier_core::error::{AdamError, StoreError as CoreStoreError};
use pyo3::exceptions::{
    PyFileNotFoundError, PyOSError, PyRuntimeError, PyTimeoutError, PyValueError,
};
use pyo3::prelude::*;

pyo3::create_exception!(
    gmtier._core,
    StoreError,
    PyRuntimeError,
    "A damaged, truncated or mismatched expert store (checksum errors included), a store open elsewhere, or a store that cannot make progress."
);

pyo3::create_exception!(
    gmtier._core,
    SpillError,
    PyRuntimeError,
    "A spill file whose bytes cannot be trusted: a read whose crc32 differs from the one written (a torn or corrupt spill), or a read past the file's end."
);

/// A spill file's error: `SpillError` for bytes that cannot be trusted, else as [`store`].
pub fn spill(e: CoreStoreError) -> PyErr {
    match e {
        CoreStoreError::Corrupt(m) => SpillError::new_err(m),
        e => store(e),
    }
}

/// A store error as the Python exception that fits it: ValueError, FileNotFoundError,
/// TimeoutError, OSError (with errno), or StoreError.
pub fn store(e: CoreStoreError) -> PyErr {
    use CoreStoreError as E;
    match e {
        E::InvalidArgument(m) => PyValueError::new_err(m),
        E::NotFound(m) => PyFileNotFoundError::new_err(m),
        E::Timeout(m) => PyTimeoutError::new_err(m),
        E::Io { context, source } => match source.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, format!("{context}: {source}"))),
            None => PyOSError::new_err(format!("{context}: {source}")),
        },
        E::WriteBack { message, errno } => match errno {
            Some(errno) => PyOSError::new_err((errno, message)),
            None => PyOSError::new_err(message),
        },
        e @ (E::Corrupt(_) | E::AllPinned(_) | E::Locked(_) | E::Closed) => {
            StoreError::new_err(e.to_string())
        }
    }
}

/// An AdamW error: ValueError for bad arguments, RuntimeError otherwise.
pub fn adam(e: AdamError) -> PyErr {
    match e {
        AdamError::Invalid(_) => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// Register `StoreError` and `SpillError` in `gmtier._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("StoreError", m.py().get_type::<StoreError>())?;
    m.add("SpillError", m.py().get_type::<SpillError>())
}
