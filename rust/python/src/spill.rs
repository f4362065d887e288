//! Bindings of the activation spill file: `AlignedBuffer` (page-aligned memory to spill from
//! and read back into) and `SpillFile`. Every transfer releases the GIL.

use crate::error;
use gmtier_core::spill::{SpillFile, SpillOptions};
use gmtier_core::store::io::Arena;
use pyo3::exceptions::PyMemoryError;
use pyo3::prelude::*;
use std::path::PathBuf;

/// Page-aligned zeroed memory, freed when the object is dropped. `gmtier.host_memory` views it
/// as a torch tensor.
#[pyclass(module = "gmtier._core", name = "AlignedBuffer", frozen)]
pub struct PyAlignedBuffer {
    arena: Arena,
}

#[pymethods]
impl PyAlignedBuffer {
    /// Map `nbytes` (rounded up to a multiple of 4096).
    #[new]
    fn new(py: Python<'_>, nbytes: usize) -> PyResult<Self> {
        let arena = py.detach(|| Arena::new(nbytes)).map_err(|e| {
            PyMemoryError::new_err(format!(
                "could not map {nbytes} bytes of aligned memory: {e}; lower the activation RAM budget"
            ))
        })?;
        Ok(PyAlignedBuffer { arena })
    }
    /// Start address (a multiple of 4096).
    #[getter]
    fn address(&self) -> usize {
        self.arena.ptr() as usize
    }
    /// Length in bytes (a multiple of 4096).
    #[getter]
    fn nbytes(&self) -> usize {
        self.arena.len()
    }
    fn __repr__(&self) -> String {
        format!(
            "AlignedBuffer(address={:#x}, nbytes={})",
            self.address(),
            self.nbytes()
        )
    }
}

/// A scratch file for spilled activations, deleted at close (or when dropped). `write` and
/// `read` block until done with the GIL released; threads may move disjoint ranges at once.
#[pyclass(module = "gmtier._core", name = "SpillFile", frozen)]
pub struct PySpillFile {
    inner: SpillFile,
}

#[pymethods]
impl PySpillFile {
    /// Create (or truncate) the file at `path`.
    #[new]
    #[pyo3(signature = (path, io_threads=4, direct=true, chunk_bytes=4<<20))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        io_threads: usize,
        direct: bool,
        chunk_bytes: usize,
    ) -> PyResult<Self> {
        let opts = SpillOptions {
            io_threads,
            direct,
            chunk_bytes,
        };
        let inner = py
            .detach(|| SpillFile::create(&path, &opts))
            .map_err(error::spill)?;
        Ok(PySpillFile { inner })
    }

    /// Write `nbytes` at `address` to the file at `offset` (all multiples of 4096); returns
    /// their crc32. The memory must stay alive and unchanged until this returns.
    fn write(&self, py: Python<'_>, offset: u64, address: usize, nbytes: usize) -> PyResult<u32> {
        // SAFETY: the caller promises the range is live memory nobody writes during the call.
        py.detach(|| unsafe { self.inner.write_raw(offset, address as *const u8, nbytes) })
            .map_err(error::spill)
    }

    /// Read `nbytes` at `offset` into `address`; returns their crc32, and raises SpillError if
    /// `expect_crc` is given and differs (or if the file ends first).
    #[pyo3(signature = (offset, address, nbytes, expect_crc=None))]
    fn read(
        &self,
        py: Python<'_>,
        offset: u64,
        address: usize,
        nbytes: usize,
        expect_crc: Option<u32>,
    ) -> PyResult<u32> {
        // SAFETY: the caller promises the range is live memory nobody touches during the call.
        py.detach(|| unsafe {
            self.inner
                .read_raw(offset, address as *mut u8, nbytes, expect_crc)
        })
        .map_err(error::spill)
    }

    /// Wait for running transfers, then delete the file. Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.close()).map_err(error::spill)
    }

    /// Whether O_DIRECT is in effect (false where the filesystem refused it).
    #[getter]
    fn direct(&self) -> bool {
        self.inner.direct()
    }
    /// Whether `close` has run.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.closed()
    }
    /// The file's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }
    /// Bytes written by completed writes.
    #[getter]
    fn bytes_written(&self) -> u64 {
        self.inner.metrics().bytes_written
    }
    /// Bytes read by completed reads.
    #[getter]
    fn bytes_read(&self) -> u64 {
        self.inner.metrics().bytes_read
    }
    /// Seconds in completed writes, summed over calls (concurrent calls overlap).
    #[getter]
    fn write_s(&self) -> f64 {
        self.inner.metrics().write_s
    }
    /// Seconds in completed reads, summed over calls.
    #[getter]
    fn read_s(&self) -> f64 {
        self.inner.metrics().read_s
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _a: Py<PyAny>,
        _b: Py<PyAny>,
        _c: Py<PyAny>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "SpillFile({:?}, direct={}{})",
            self.inner.path(),
            self.inner.direct(),
            if self.inner.closed() { ", closed" } else { "" }
        )
    }
}

/// Register `AlignedBuffer` and `SpillFile` in `gmtier._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyAlignedBuffer>()?;
    m.add_class::<PySpillFile>()
}
