//! Raw file I/O for benchmarks and tools: `raw_read` (the disk's limit), `drop_cache`.

use crate::error;
use gmtier_core::store::{self as core};
use pyo3::prelude::*;
use std::path::PathBuf;

/// Read byte ranges [(offset, length)] of a file with `threads` concurrent O_DIRECT preads of
/// `chunk_bytes`: the disk's physical limit. Returns (bytes, seconds, direct).
#[pyfunction]
#[pyo3(signature = (path, ranges, chunk_bytes=4<<20, threads=8, direct=true))]
fn raw_read(
    py: Python<'_>,
    path: PathBuf,
    ranges: Vec<(u64, u64)>,
    chunk_bytes: usize,
    threads: usize,
    direct: bool,
) -> PyResult<(u64, f64, bool)> {
    let r = py
        .detach(|| core::io::raw_read(&path, &ranges, chunk_bytes, threads, direct))
        .map_err(|e| error::store(core::StoreError::io(&path, "raw read of", e)))?;
    Ok((r.bytes, r.seconds, r.direct))
}

/// fdatasync + drop a file's clean pages from the page cache (no root needed).
#[pyfunction]
fn drop_cache(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    py.detach(|| core::io::drop_cache(&path))
        .map_err(|e| error::store(core::StoreError::io(&path, "drop page cache of", e)))
}

/// Register `raw_read` and `drop_cache` in `gmtier._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(raw_read, m)?)?;
    m.add_function(wrap_pyfunction!(drop_cache, m)?)
}
