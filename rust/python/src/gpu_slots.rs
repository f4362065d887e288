//! Bindings of the GPU tier's accounting: `GpuSlots`, and the launch of the CUDA host function
//! that reports a copy done.

use crate::error;
use crate::store::PyExpertStore;
use gmtier_core::store::gpu::{self as core, CopyId, Prefetch};
use gmtier_core::store::{GpuSlots, Key};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// `cuLaunchHostFunc` (driver API) and `cudaLaunchHostFunc` (runtime API) have this signature.
type LaunchHostFunc =
    unsafe extern "C" fn(*mut c_void, unsafe extern "C" fn(*mut c_void), *mut c_void) -> i32;

/// The GPU tier's slot states, pins, prefetch policy and copies in flight, kept by the store
/// under its own lock (see gmtier_core::store::gpu). Python issues the copies it is told to
/// and reports each done: `signal_done` on a CUDA stream, `copy_done` from the CPU emulation.
#[pyclass(module = "gmtier._core", name = "GpuSlots", frozen)]
pub struct PyGpuSlots {
    inner: GpuSlots,
    /// Address of the host function launcher (0 until `use_launcher`).
    launcher: AtomicUsize,
}

#[pymethods]
impl PyGpuSlots {
    /// The accounting of `store`'s GPU tier with `num_slots` weight slots (0: no GPU tier,
    /// acquires only pin RAM records). Once per open store.
    #[new]
    fn new(store: &Bound<'_, PyExpertStore>, num_slots: usize) -> PyResult<Self> {
        let inner = store
            .get()
            .core()
            .gpu_slots(num_slots)
            .map_err(error::store)?;
        Ok(PyGpuSlots {
            inner,
            launcher: AtomicUsize::new(0),
        })
    }

    /// Weight slots (0: no GPU tier).
    #[getter]
    fn num_slots(&self) -> usize {
        self.inner.num_slots()
    }

    /// Acquire `key`, whose RAM record is pinned in `ram_slot` (the pin passes to the tier):
    /// None without a GPU tier, else (GPU slot, copy id to issue from ram_slot, or None).
    #[pyo3(signature = (key, ram_slot, need_hit=false))]
    fn acquire(
        &self,
        key: Key,
        ram_slot: usize,
        need_hit: bool,
    ) -> PyResult<Option<(usize, Option<CopyId>)>> {
        Ok(self
            .inner
            .acquire(key, ram_slot, need_hit)
            .map_err(error::store)?
            .map(|a| (a.slot, a.copy)))
    }

    /// Acquire without RAM records those of `keys` (at most `limit`) whose current weights the
    /// tier holds: [(position in keys, GPU slot)].
    fn acquire_resident(&self, keys: Vec<Key>, limit: usize) -> PyResult<Vec<(usize, usize)>> {
        self.inner
            .acquire_resident(&keys, limit)
            .map_err(error::store)
    }

    /// Release one acquire per key (keys not acquired: plain RAM releases); returns the GPU
    /// slots released.
    fn release(&self, keys: Vec<Key>) -> PyResult<Vec<usize>> {
        self.inner.release(&keys).map_err(error::store)
    }

    /// Start a prefetch copy of `key` (RAM record pinned by the caller): ("copied", slot,
    /// copy id), or ("held" | "busy", None, None), the RAM pin then dropped.
    fn prefetch(
        &self,
        key: Key,
        priority: i64,
        max_in_flight: usize,
        reserve: usize,
    ) -> PyResult<(&'static str, Option<usize>, Option<CopyId>)> {
        Ok(
            match self
                .inner
                .prefetch(key, priority, max_in_flight, reserve)
                .map_err(error::store)?
            {
                Prefetch::Copied { slot, copy } => ("copied", Some(slot), Some(copy)),
                Prefetch::Held => ("held", None, None),
                Prefetch::Busy => ("busy", None, None),
            },
        )
    }

    /// Whether a prefetch copy may start now.
    fn can_prefetch(&self, max_in_flight: usize, reserve: usize) -> bool {
        self.inner.can_prefetch(max_in_flight, reserve)
    }

    /// Wrong guesses: their unused prefetched copies become the first evicted.
    fn demote(&self, keys: Vec<Key>) {
        self.inner.demote(&keys)
    }

    /// Whether the tier holds a current copy of `key`'s weights.
    fn holds(&self, key: Key) -> bool {
        self.inner.holds(key)
    }

    /// The acquired `key`'s RAM record changed: (GPU slot, RAM slot, copy id) of the copy to
    /// issue over its GPU copy, or None when the tier holds none.
    fn refresh(&self, key: Key) -> PyResult<Option<(usize, usize, CopyId)>> {
        self.inner.refresh(key).map_err(error::store)
    }

    /// The RAM records of these experts changed: their GPU copies are stale.
    fn invalidate(&self, keys: Vec<Key>) {
        self.inner.invalidate(&keys)
    }

    /// The RAM slot of the acquired `key`'s record, or None when no acquire of it pins it.
    fn ram_slot(&self, key: Key) -> Option<usize> {
        self.inner.ram_slot(key)
    }

    /// Copy `copy` is done (the CPU emulation's report): its RAM pins are dropped.
    fn copy_done(&self, copy: CopyId) -> PyResult<()> {
        self.inner.copy_done(copy).map_err(error::store)
    }

    /// Use the host function launcher at `address` (of `cuLaunchHostFunc` or
    /// `cudaLaunchHostFunc`) for `signal_done`.
    fn use_launcher(&self, address: usize) -> PyResult<()> {
        if address == 0 {
            return Err(PyValueError::new_err(
                "the host function launcher's address is 0",
            ));
        }
        self.launcher.store(address, Ordering::Relaxed);
        Ok(())
    }

    /// Queue on CUDA stream `stream` (its handle, `torch.cuda.Stream.cuda_stream`) a host
    /// function reporting `copy` done once the work queued before it has finished.
    fn signal_done(&self, copy: CopyId, stream: usize) -> PyResult<()> {
        let address = self.launcher.load(Ordering::Relaxed);
        if address == 0 {
            return Err(PyRuntimeError::new_err(
                "GpuSlots.signal_done before use_launcher(): no host function launcher",
            ));
        }
        // SAFETY: `use_launcher` was given the address of a function of this signature.
        let launch: LaunchHostFunc = unsafe { std::mem::transmute(address) };
        let token = self.inner.done_token(copy);
        let rc = unsafe { launch(stream as *mut c_void, core::copy_done_host_fn, token) };
        if rc != 0 {
            // SAFETY: not launched, so the host function will never free it.
            unsafe { core::drop_done_token(token) };
            return Err(PyRuntimeError::new_err(format!(
                "launching the host function that reports GPU copy {copy} done failed with CUDA error {rc}"
            )));
        }
        Ok(())
    }

    /// Block (GIL released) until every copy started is reported done; `timeout` (seconds)
    /// raises TimeoutError instead of waiting for ever.
    #[pyo3(signature = (timeout=None))]
    fn wait_copies(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let timeout = timeout.map(Duration::from_secs_f64);
        py.detach(|| self.inner.wait_copies(timeout))
            .map_err(error::store)
    }

    /// The state of GPU slot `slot`: "free", "copying", "ready", "stale" or "prefetched".
    fn state(&self, slot: usize) -> PyResult<&'static str> {
        use core::GpuSlotState as S;
        Ok(match self.inner.state(slot).map_err(error::store)? {
            S::Free => "free",
            S::Copying => "copying",
            S::Ready => "ready",
            S::Stale => "stale",
            S::Prefetched => "prefetched",
        })
    }

    /// The slot holding `key` (current or stale), or None.
    fn lookup(&self, key: Key) -> Option<usize> {
        self.inner.lookup(key)
    }

    /// Slots pinned by acquires.
    fn pinned(&self) -> usize {
        self.inner.pinned()
    }

    /// Counters: hits, misses, prefetch_copies, prefetch_hits, prefetch_wasted,
    /// prefetch_demoted, copies_in_flight.
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.inner.metrics();
        let d = PyDict::new(py);
        d.set_item("hits", m.hits)?;
        d.set_item("misses", m.misses)?;
        d.set_item("prefetch_copies", m.prefetch_copies)?;
        d.set_item("prefetch_hits", m.prefetch_hits)?;
        d.set_item("prefetch_wasted", m.prefetch_wasted)?;
        d.set_item("prefetch_demoted", m.prefetch_demoted)?;
        d.set_item("copies_in_flight", m.copies_in_flight)?;
        Ok(d)
    }
}

/// Register `GpuSlots` in `gmtier._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyGpuSlots>()
}
