//! Bindings of the tiered expert store: `ExpertStore`. Every call that may block releases the GIL.

use crate::error;
use crate::layout::{layout_list, parse_schema};
use crate::ticket::PyTicket;
use gmtier_core::store::{self as core, Key, Sections, StoreOptions};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict, PyList};
use std::path::PathBuf;
use std::sync::Mutex;

fn copy_buffer(obj: &Bound<'_, PyAny>, dst: &mut [u8], what: &str) -> PyResult<()> {
    let buf = PyBuffer::<u8>::get(obj).map_err(|_| {
        PyValueError::new_err(format!(
            "{what}: expected a bytes-like object of uint8 (bytes, bytearray, numpy uint8 array), got {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    if buf.item_count() != dst.len() || !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what}: got {} bytes, a record is {} bytes (see ExpertStore.tensor_layout())",
            buf.item_count(),
            dst.len()
        )));
    }
    buf.copy_to_slice(obj.py(), dst)
}

/// Call `f(l, e, out)` with `out` a zeroed bytearray of the record's size (one per `create`,
/// reused), then copy it into `buf`. Python owns `out`, so a reference kept past the call is
/// harmless; the copy costs a memcpy, far less than building a new record object each time.
fn fill_via(
    py: Python<'_>,
    f: &Py<PyAny>,
    l: usize,
    e: usize,
    out: &mut Option<Py<PyByteArray>>,
    buf: &mut [u8],
) -> PyResult<()> {
    let out = out
        .get_or_insert_with(|| PyByteArray::new(py, &vec![0u8; buf.len()]).unbind())
        .bind(py);
    // SAFETY: no Python code runs while the slice is alive.
    unsafe { out.as_bytes_mut() }.fill(0);
    f.call1(py, (l, e, out))?;
    copy_buffer(
        out.as_any(),
        buf,
        &format!("init_into({l}, {e}) left `out` so that it"),
    )
}

/// An expert store: NVMe data file + RAM slot arena. See docs/design.md.
#[pyclass(module = "gmtier._core", name = "ExpertStore", frozen)]
pub struct PyExpertStore {
    inner: core::ExpertStore,
}

impl PyExpertStore {
    /// The core store (for the bindings of what lives beside it, e.g. `GpuSlots`).
    pub(crate) fn core(&self) -> &core::ExpertStore {
        &self.inner
    }
}

#[pymethods]
impl PyExpertStore {
    /// Create a store directory, filling each record as it is written (streamed; the next
    /// record's fill overlaps the writes). `init(layer, expert) -> bytes-like of record_bytes`,
    /// or `init_into(layer, expert, out)`, which fills `out`, a zeroed bytearray of
    /// record_bytes reused for every record (no new record object each time). Neither: every
    /// record is zero. `spare_slots`: record slots beyond one per expert (None: one per
    /// expert); see docs/design.md "The store on disk".
    #[staticmethod]
    #[pyo3(signature = (path, num_layers, num_experts, schema, init=None, init_into=None, spare_slots=None))]
    #[allow(clippy::too_many_arguments)]
    fn create(
        py: Python<'_>,
        path: PathBuf,
        num_layers: usize,
        num_experts: usize,
        schema: &Bound<'_, PyAny>,
        init: Option<Py<PyAny>>,
        init_into: Option<Py<PyAny>>,
        spare_slots: Option<usize>,
    ) -> PyResult<()> {
        let schema = parse_schema(schema)?;
        let (f, into) = match (init, init_into) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err("pass init or init_into, not both"))
            }
            (Some(f), None) => (Some(f), false),
            (None, f) => (f, true),
        };
        let res = py.detach(|| match f {
            None => core::ExpertStore::create(
                &path,
                num_layers,
                num_experts,
                &schema,
                spare_slots,
                None,
            ),
            Some(f) => {
                let mut scratch = None;
                let mut cb = |l: usize, e: usize, buf: &mut [u8]| -> core::Result<()> {
                    Python::attach(|py| {
                        let r = if into {
                            fill_via(py, &f, l, e, &mut scratch, buf)
                        } else {
                            f.call1(py, (l, e)).and_then(|obj| {
                                copy_buffer(
                                    obj.bind(py),
                                    buf,
                                    &format!("init({l}, {e}) returned a record that"),
                                )
                            })
                        };
                        r.map_err(|err| {
                            core::StoreError::InvalidArgument(format!(
                                "init({l}, {e}) failed: {err}"
                            ))
                        })
                    })
                };
                core::ExpertStore::create(
                    &path,
                    num_layers,
                    num_experts,
                    &schema,
                    spare_slots,
                    Some(&mut cb),
                )
            }
        });
        res.map_err(error::store)
    }

    /// Open a store with a RAM budget (bytes).
    /// `turn_bytes` > 0: reads and writes take turns of up to that many bytes instead of
    /// running at once (for a disk slower at both at once).
    #[staticmethod]
    #[pyo3(signature = (path, ram_bytes, io_threads=8, queue_depth=32, direct=true, chunk_bytes=4<<20, turn_bytes=0))]
    #[allow(clippy::too_many_arguments)]
    fn open(
        py: Python<'_>,
        path: PathBuf,
        ram_bytes: usize,
        io_threads: usize,
        queue_depth: usize,
        direct: bool,
        chunk_bytes: usize,
        turn_bytes: usize,
    ) -> PyResult<Self> {
        let opts = StoreOptions {
            ram_bytes,
            io_threads,
            queue_depth,
            direct,
            chunk_bytes,
            turn_bytes,
        };
        let inner = py
            .detach(|| core::ExpertStore::open(&path, opts))
            .map_err(error::store)?;
        Ok(PyExpertStore { inner })
    }

    /// Let reads and writes take turns of up to `turn_bytes` from the next I/O on (0: at once);
    /// a turn starts while at most `overlap` chunks of the one before still run.
    #[pyo3(signature = (turn_bytes, overlap=0))]
    fn set_turn_bytes(&self, turn_bytes: usize, overlap: usize) {
        self.inner.set_turn_bytes(turn_bytes, overlap);
    }

    /// Bytes per record (weights + state, multiple of 4096).
    #[getter]
    fn record_bytes(&self) -> usize {
        self.inner.layout().record_bytes
    }
    /// Bytes of the weights section (what a GPU slot holds).
    #[getter]
    fn weights_bytes(&self) -> usize {
        self.inner.layout().weights_bytes
    }
    /// Layers.
    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.geometry().num_layers
    }
    /// Experts per layer.
    #[getter]
    fn num_experts(&self) -> usize {
        self.inner.geometry().num_experts
    }
    /// RAM slots (ram_bytes // record_bytes).
    #[getter]
    fn ram_slots(&self) -> usize {
        self.inner.ram_slots()
    }
    /// Record slots beyond one per expert (the file holds records + spares).
    #[getter]
    fn spare_slots(&self) -> usize {
        self.inner.geometry().spare_slots()
    }
    /// The data file's format version (1: two shadow slots per expert; 2: the slot pool).
    #[getter]
    fn format_version(&self) -> u32 {
        self.inner.geometry().version
    }
    /// File offset of the first record.
    #[getter]
    fn data_start(&self) -> u64 {
        self.inner.geometry().data_start
    }
    /// Store directory.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.dir().to_path_buf()
    }

    /// List of (name, dtype, shape, offset_in_record, nbytes, section).
    fn tensor_layout<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        layout_list(py, self.inner.layout())
    }

    /// (address, nbytes) of the RAM arena; slot s starts at s * record_bytes.
    fn arena_address(&self) -> (usize, usize) {
        self.inner.arena_address()
    }

    /// Ask for experts; returns a Ticket at once. `sections`: "all" (the whole record),
    /// "weights" or "state": only what the RAM slot lacks of it is read.
    #[pyo3(signature = (keys, priority=0, sections="all"))]
    fn request(
        slf: Py<Self>,
        py: Python<'_>,
        keys: Vec<Key>,
        priority: i64,
        sections: &str,
    ) -> PyResult<PyTicket> {
        let secs = Sections::parse(sections).map_err(error::store)?;
        let t = py
            .detach(|| slf.get().inner.request_sections(&keys, priority, secs))
            .map_err(error::store)?;
        Ok(PyTicket {
            sections: t.sections().name(),
            ticket: Mutex::new(Some(t)),
            store: slf,
        })
    }

    /// Best-effort read-ahead at a priority (lower than any request). Does not pin.
    #[pyo3(signature = (keys, priority=0, sections="all"))]
    fn prefetch(
        &self,
        py: Python<'_>,
        keys: Vec<Key>,
        priority: i64,
        sections: &str,
    ) -> PyResult<()> {
        let secs = Sections::parse(sections).map_err(error::store)?;
        py.detach(|| self.inner.prefetch_sections(&keys, priority, secs))
            .map_err(error::store)
    }

    /// Pin, without any read, the experts whose RAM records hold valid `sections` already:
    /// the slot of each, or None where a read would be needed. Release each slot given once.
    #[pyo3(signature = (keys, sections="weights"))]
    fn pin_resident(&self, keys: Vec<Key>, sections: &str) -> PyResult<Vec<Option<usize>>> {
        let secs = Sections::parse(sections).map_err(error::store)?;
        self.inner.pin_resident(&keys, secs).map_err(error::store)
    }

    /// The prediction of these experts was wrong: cancel their prefetch reads not yet started
    /// and make their unused prefetched records the first evicted. Returns how many were.
    fn demote_prefetched(&self, keys: Vec<Key>) -> PyResult<usize> {
        self.inner.demote_prefetched(&keys).map_err(error::store)
    }

    /// Names of the sections valid in RAM slot `slot` ("weights", "state"); only those may be
    /// used. They stay valid while the slot is pinned.
    fn slot_sections(&self, slot: usize) -> PyResult<Vec<&'static str>> {
        Ok(self
            .inner
            .slot_sections(slot)
            .map_err(error::store)?
            .names())
    }

    /// Unpin experts (once per wait()).
    fn release(&self, keys: Vec<Key>) -> PyResult<()> {
        self.inner.release(&keys).map_err(error::store)
    }

    /// The RAM records of these (pinned) experts changed; `filled` ("weights", "state", "all")
    /// names sections the caller overwrote completely, valid from now on even if never read.
    #[pyo3(signature = (keys, filled="none"))]
    fn mark_dirty(&self, keys: Vec<Key>, filled: &str) -> PyResult<()> {
        let filled = if filled == "none" {
            Sections::NONE
        } else {
            Sections::parse(filled).map_err(error::store)?
        };
        self.inner
            .mark_dirty_filled(&keys, filled)
            .map_err(error::store)
    }

    /// Start writing these experts' dirty RAM records back now (write-behind); never waits for
    /// the I/O. Keys not resident, clean or already being written are ignored.
    fn write_back(&self, py: Python<'_>, keys: Vec<Key>) -> PyResult<()> {
        py.detach(|| self.inner.write_back(&keys))
            .map_err(error::store)
    }

    /// Write all dirty records back to their uncommitted disk slots.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.flush()).map_err(error::store)
    }

    /// Flush + fsync + atomic index replacement.
    #[pyo3(signature = (user_meta=""))]
    fn commit(&self, py: Python<'_>, user_meta: &str) -> PyResult<()> {
        let m = user_meta.to_string();
        py.detach(|| self.inner.commit(&m)).map_err(error::store)
    }

    /// Metadata string of the last commit.
    fn user_meta(&self) -> String {
        self.inner.user_meta()
    }

    /// Commits recorded in the index.
    fn commit_count(&self) -> u64 {
        self.inner.commit_count()
    }

    /// Interim commits since the last `commit(user_meta)`: when not 0, some experts are newer
    /// than `user_meta()` says (the spare slots ran out between two commits).
    fn interim_commits(&self) -> u64 {
        self.inner.interim_commits()
    }

    /// Counters as a dict.
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.inner.metrics();
        let d = PyDict::new(py);
        d.set_item("hits", m.hits)?;
        d.set_item("misses", m.misses)?;
        d.set_item("prefetch_hits", m.prefetch_hits)?;
        d.set_item("prefetches", m.prefetches)?;
        d.set_item("prefetch_wasted", m.prefetch_wasted)?;
        d.set_item("prefetch_cancelled", m.prefetch_cancelled)?;
        d.set_item("bytes_read", m.bytes_read)?;
        d.set_item("bytes_written", m.bytes_written)?;
        d.set_item("reads", m.reads)?;
        d.set_item("section_reads", m.section_reads)?;
        d.set_item("read_errors", m.read_errors)?;
        d.set_item("evictions", m.evictions)?;
        d.set_item("writebacks", m.writebacks)?;
        d.set_item("stall_s", m.stall_s)?;
        d.set_item("queue_depth_max", m.queue_depth_max)?;
        d.set_item("commits", m.commits)?;
        d.set_item("interim_commits", m.interim_commits)?;
        d.set_item("direct", m.direct)?;
        d.set_item("resident", self.inner.resident())?;
        d.set_item("pinned", self.inner.pinned())?;
        d.set_item("ram_slots", self.inner.ram_slots())?;
        Ok(d)
    }

    /// Copy of an expert's record (bytes).
    fn read_record<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        expert: usize,
    ) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let v = py
            .detach(|| self.inner.read_record(layer, expert))
            .map_err(error::store)?;
        Ok(pyo3::types::PyBytes::new(py, &v))
    }

    /// Replace an expert's record from a bytes-like object (through RAM; persisted on commit).
    fn write_record(
        &self,
        py: Python<'_>,
        layer: usize,
        expert: usize,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let mut v = vec![0u8; self.inner.layout().record_bytes];
        copy_buffer(data, &mut v, &format!("write_record({layer}, {expert})"))?;
        py.detach(|| self.inner.write_record(layer, expert, &v))
            .map_err(error::store)
    }

    /// Stop I/O; uncommitted changes are dropped.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&self, py: Python<'_>, _a: Py<PyAny>, _b: Py<PyAny>, _c: Py<PyAny>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        let g = self.inner.geometry();
        format!(
            "ExpertStore({:?}, {} layers x {} experts, record {} B, weights {} B, {} RAM slots)",
            self.inner.dir(),
            g.num_layers,
            g.num_experts,
            g.layout.record_bytes,
            g.layout.weights_bytes,
            self.inner.ram_slots()
        )
    }
}

/// Register `ExpertStore` in `gmtier._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyExpertStore>()
}
