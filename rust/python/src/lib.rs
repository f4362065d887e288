//! `gmtier._core`: thin PyO3 layer over gmtier-core. It converts types and releases the GIL;
//! all logic lives in the core crate.
use pyo3::prelude::*;

mod adam;
mod store;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    store::register(m)?;
    adam::register(m)?;
    Ok(())
}
