//! Bindings of a store request: `Ticket`.

use crate::error;
use crate::store::PyExpertStore;
use gmtier_core::store::{self as core, Key};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::sync::Mutex;
use std::time::Duration;

/// An asynchronous request; wait() returns the RAM slot per key.
#[pyclass(module = "gmtier._core", name = "Ticket", frozen)]
pub struct PyTicket {
    pub(crate) ticket: Mutex<Option<core::Ticket>>,
    pub(crate) sections: &'static str,
    pub(crate) store: Py<PyExpertStore>,
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
        res.map_err(error::store)
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

/// Register `Ticket` in `gmtier._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTicket>()
}
