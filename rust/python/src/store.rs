//! Bindings of the tiered expert store: `ExpertStore`, `Ticket`, `SlotPool`, `StoreError`,
//! `raw_read`, `drop_cache`. Every call that may block releases the GIL.

use gmtier_core::store::{
    self as core,
    format::{RecordLayout, TensorSpec},
    Key, Sections, StoreOptions,
};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{
    PyFileNotFoundError, PyOSError, PyRuntimeError, PyTimeoutError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict, PyList, PyTuple};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

pyo3::create_exception!(
    gmtier._core,
    StoreError,
    PyRuntimeError,
    "A damaged, truncated or mismatched expert store (checksum errors included), or a store that cannot make progress."
);

fn to_py(e: core::StoreError) -> PyErr {
    use core::StoreError as E;
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
        e @ (E::Corrupt(_) | E::AllPinned(_) | E::Closed) => StoreError::new_err(e.to_string()),
    }
}

fn parse_schema(schema: &Bound<'_, PyAny>) -> PyResult<Vec<TensorSpec>> {
    let mut out = Vec::new();
    for item in schema.try_iter()? {
        let item = item?;
        let parts: Vec<Bound<'_, PyAny>> = item.try_iter()?.collect::<PyResult<_>>()?;
        if parts.len() != 3 && parts.len() != 4 {
            return Err(PyValueError::new_err(format!(
                "schema entry {item} must be (name, dtype, shape[, section]) with section \"weights\" or \"state\""
            )));
        }
        let name: String = parts[0].extract()?;
        let dtype: String = parts[1].str()?.extract()?;
        let shape: Vec<usize> = parts[2].extract().map_err(|_| {
            PyValueError::new_err(format!(
                "schema entry {name:?}: shape must be a list of non-negative ints"
            ))
        })?;
        let section: String = if parts.len() == 4 {
            parts[3].extract()?
        } else {
            "weights".into()
        };
        out.push(
            TensorSpec::new(&name, &dtype, &shape, &section)
                .map_err(|e| PyValueError::new_err(format!("schema entry {name:?}: {e}")))?,
        );
    }
    Ok(out)
}

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

#[pymethods]
impl PyExpertStore {
    /// Create a store directory, filling each record as it is written (streamed; the next
    /// record's fill overlaps the writes). `init(layer, expert) -> bytes-like of record_bytes`,
    /// or `init_into(layer, expert, out)`, which fills `out`, a zeroed bytearray of
    /// record_bytes reused for every record (no new record object each time). Neither: every
    /// record is zero.
    #[staticmethod]
    #[pyo3(signature = (path, num_layers, num_experts, schema, init=None, init_into=None))]
    fn create(
        py: Python<'_>,
        path: PathBuf,
        num_layers: usize,
        num_experts: usize,
        schema: &Bound<'_, PyAny>,
        init: Option<Py<PyAny>>,
        init_into: Option<Py<PyAny>>,
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
            None => core::ExpertStore::create(&path, num_layers, num_experts, &schema, None),
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
                core::ExpertStore::create(&path, num_layers, num_experts, &schema, Some(&mut cb))
            }
        });
        res.map_err(to_py)
    }

    /// Open a store with a RAM budget (bytes).
    #[staticmethod]
    #[pyo3(signature = (path, ram_bytes, io_threads=8, queue_depth=32, direct=true, chunk_bytes=4<<20))]
    fn open(
        py: Python<'_>,
        path: PathBuf,
        ram_bytes: usize,
        io_threads: usize,
        queue_depth: usize,
        direct: bool,
        chunk_bytes: usize,
    ) -> PyResult<Self> {
        let opts = StoreOptions {
            ram_bytes,
            io_threads,
            queue_depth,
            direct,
            chunk_bytes,
        };
        let inner = py
            .detach(|| core::ExpertStore::open(&path, opts))
            .map_err(to_py)?;
        Ok(PyExpertStore { inner })
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
        let secs = Sections::parse(sections).map_err(to_py)?;
        let t = py
            .detach(|| slf.get().inner.request_sections(&keys, priority, secs))
            .map_err(to_py)?;
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
        let secs = Sections::parse(sections).map_err(to_py)?;
        py.detach(|| self.inner.prefetch_sections(&keys, priority, secs))
            .map_err(to_py)
    }

    /// Pin, without any read, the experts whose RAM records hold valid `sections` already:
    /// the slot of each, or None where a read would be needed. Release each slot given once.
    #[pyo3(signature = (keys, sections="weights"))]
    fn pin_resident(&self, keys: Vec<Key>, sections: &str) -> PyResult<Vec<Option<usize>>> {
        let secs = Sections::parse(sections).map_err(to_py)?;
        self.inner.pin_resident(&keys, secs).map_err(to_py)
    }

    /// The prediction of these experts was wrong: cancel their prefetch reads not yet started
    /// and make their unused prefetched records the first evicted. Returns how many were.
    fn demote_prefetched(&self, keys: Vec<Key>) -> PyResult<usize> {
        self.inner.demote_prefetched(&keys).map_err(to_py)
    }

    /// Names of the sections valid in RAM slot `slot` ("weights", "state"); only those may be
    /// used. They stay valid while the slot is pinned.
    fn slot_sections(&self, slot: usize) -> PyResult<Vec<&'static str>> {
        Ok(self.inner.slot_sections(slot).map_err(to_py)?.names())
    }

    /// Unpin experts (once per wait()).
    fn release(&self, keys: Vec<Key>) -> PyResult<()> {
        self.inner.release(&keys).map_err(to_py)
    }

    /// The RAM records of these (pinned) experts changed; `filled` ("weights", "state", "all")
    /// names sections the caller overwrote completely, valid from now on even if never read.
    #[pyo3(signature = (keys, filled="none"))]
    fn mark_dirty(&self, keys: Vec<Key>, filled: &str) -> PyResult<()> {
        let filled = if filled == "none" {
            Sections::NONE
        } else {
            Sections::parse(filled).map_err(to_py)?
        };
        self.inner.mark_dirty_filled(&keys, filled).map_err(to_py)
    }

    /// Start writing these experts' dirty RAM records back now (write-behind); never waits for
    /// the I/O. Keys not resident, clean or already being written are ignored.
    fn write_back(&self, py: Python<'_>, keys: Vec<Key>) -> PyResult<()> {
        py.detach(|| self.inner.write_back(&keys)).map_err(to_py)
    }

    /// Write all dirty records back to their uncommitted disk slots.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.flush()).map_err(to_py)
    }

    /// Flush + fsync + atomic index replacement.
    #[pyo3(signature = (user_meta=""))]
    fn commit(&self, py: Python<'_>, user_meta: &str) -> PyResult<()> {
        let m = user_meta.to_string();
        py.detach(|| self.inner.commit(&m)).map_err(to_py)
    }

    /// Metadata string of the last commit.
    fn user_meta(&self) -> String {
        self.inner.user_meta()
    }

    /// Commits recorded in the index.
    fn commit_count(&self) -> u64 {
        self.inner.commit_count()
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
            .map_err(to_py)?;
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
            .map_err(to_py)
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

/// An asynchronous request; wait() returns the RAM slot per key.
#[pyclass(module = "gmtier._core", name = "Ticket", frozen)]
pub struct PyTicket {
    ticket: Mutex<Option<core::Ticket>>,
    sections: &'static str,
    store: Py<PyExpertStore>,
}

#[pymethods]
impl PyTicket {
    /// Block (GIL released) until the experts are in RAM; returns their RAM slots, in order.
    /// Pins them: release() each key once. `timeout` (seconds) raises TimeoutError instead of
    /// waiting forever.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<usize>> {
        let mut t = self.ticket.lock().unwrap().take().ok_or_else(|| {
            PyValueError::new_err("this ticket was already waited on; request() again")
        })?;
        let timeout = timeout.map(Duration::from_secs_f64);
        let res = py.detach(|| t.wait(timeout));
        if let Err(core::StoreError::Timeout(_)) = res {
            // Still pending and still pinned: the caller may wait on it again.
            *self.ticket.lock().unwrap() = Some(t);
        }
        res.map_err(to_py)
    }
    /// Whether wait() would return at once.
    fn ready(&self) -> bool {
        self.ticket
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|t| t.ready())
    }
    /// The keys requested.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let keys: Vec<Key> = self
            .ticket
            .lock()
            .unwrap()
            .as_ref()
            .map(|t| t.keys().to_vec())
            .unwrap_or_default();
        PyList::new(py, keys)
    }
    /// The sections requested ("all", "weights" or "state"): what wait() makes valid.
    #[getter]
    fn sections(&self) -> &'static str {
        self.sections
    }
    /// The store this ticket belongs to.
    #[getter]
    fn store(&self, py: Python<'_>) -> Py<PyExpertStore> {
        self.store.clone_ref(py)
    }
}

/// Slot accounting with the store's eviction policy (LRU refined by prefetch priority, pinned
/// slots never evicted); the GPU tier uses it.
#[pyclass(module = "gmtier._core", name = "SlotPool", frozen)]
pub struct PySlotPool {
    inner: Mutex<core::SlotPool>,
}

#[pymethods]
impl PySlotPool {
    #[new]
    fn new(num_slots: usize) -> PyResult<Self> {
        if num_slots == 0 {
            return Err(PyValueError::new_err(
                "a SlotPool needs at least one slot (the budget is smaller than one expert)",
            ));
        }
        Ok(PySlotPool {
            inner: Mutex::new(core::SlotPool::new(num_slots)),
        })
    }
    /// Take (and pin, unless pin=False for a prefetch) a slot for key: (slot, hit, evicted_key|None).
    /// Raises StoreError when every slot is pinned.
    #[pyo3(signature = (key, priority=0, pin=true))]
    fn acquire(&self, key: Key, priority: i64, pin: bool) -> PyResult<(usize, bool, Option<Key>)> {
        self.inner
            .lock()
            .unwrap()
            .acquire(key, priority, pin)
            .map_err(to_py)
    }
    /// Unpin key's slot.
    fn release(&self, key: Key) -> PyResult<()> {
        self.inner.lock().unwrap().release(key).map_err(to_py)
    }
    /// Slot of key, or None.
    fn lookup(&self, key: Key) -> Option<usize> {
        self.inner.lock().unwrap().lookup(key)
    }
    /// Forget key (its data is stale); returns whether it was resident.
    fn invalidate(&self, key: Key) -> bool {
        self.inner.lock().unwrap().invalidate(key)
    }
    /// A prefetch of key turned out wrong: unprotect it and make it the first LRU victim.
    /// Returns whether key held an unused prefetch.
    fn demote(&self, key: Key) -> bool {
        let mut g = self.inner.lock().unwrap();
        g.lookup(key).is_some_and(|s| g.demote(s))
    }
    /// Pins on slot.
    fn pins(&self, slot: usize) -> PyResult<u32> {
        let g = self.inner.lock().unwrap();
        if slot >= g.num_slots() {
            return Err(PyValueError::new_err(format!(
                "slot {slot} out of range (pool has {})",
                g.num_slots()
            )));
        }
        Ok(g.pins(slot))
    }
    /// Key in slot, or None.
    fn key_of(&self, slot: usize) -> PyResult<Option<Key>> {
        let g = self.inner.lock().unwrap();
        if slot >= g.num_slots() {
            return Err(PyValueError::new_err(format!(
                "slot {slot} out of range (pool has {})",
                g.num_slots()
            )));
        }
        Ok(g.key_of(slot))
    }
    /// Number of slots.
    #[getter]
    fn num_slots(&self) -> usize {
        self.inner.lock().unwrap().num_slots()
    }
    /// Slots holding a key.
    fn resident(&self) -> usize {
        self.inner.lock().unwrap().resident()
    }
    /// Slots pinned.
    fn pinned(&self) -> usize {
        self.inner.lock().unwrap().pinned()
    }
}

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
        .map_err(|e| to_py(core::StoreError::io(&path, "raw read of", e)))?;
    Ok((r.bytes, r.seconds, r.direct))
}

/// (name, dtype, shape, offset_in_record, nbytes, section) for each tensor of a layout.
fn layout_list<'py>(py: Python<'py>, layout: &RecordLayout) -> PyResult<Bound<'py, PyList>> {
    let items: Vec<_> = layout
        .tensors
        .iter()
        .map(|t| {
            (
                t.spec.name.clone(),
                t.spec.dtype.name(),
                t.spec.shape.clone(),
                t.offset,
                t.nbytes,
                t.spec.section.name(),
            )
        })
        .collect();
    PyList::new(py, items)
}

/// The record layout of a schema, without a store: (tensor layout as `tensor_layout()` lists it,
/// record_bytes, weights_bytes). The one place record sizes are computed; Python asks this.
#[pyfunction]
fn record_layout<'py>(
    py: Python<'py>,
    schema: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyList>, usize, usize)> {
    let layout = RecordLayout::new(&parse_schema(schema)?).map_err(to_py)?;
    Ok((
        layout_list(py, &layout)?,
        layout.record_bytes,
        layout.weights_bytes,
    ))
}

/// fdatasync + drop a file's clean pages from the page cache (no root needed).
#[pyfunction]
fn drop_cache(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    py.detach(|| core::io::drop_cache(&path))
        .map_err(|e| to_py(core::StoreError::io(&path, "drop page cache of", e)))
}

/// Register the store classes in `gmtier._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyExpertStore>()?;
    m.add_class::<PyTicket>()?;
    m.add_class::<PySlotPool>()?;
    m.add("StoreError", m.py().get_type::<StoreError>())?;
    m.add_function(wrap_pyfunction!(raw_read, m)?)?;
    m.add_function(wrap_pyfunction!(drop_cache, m)?)?;
    m.add_function(wrap_pyfunction!(record_layout, m)?)?;
    let _ = PyTuple::empty(m.py());
    Ok(())
}
