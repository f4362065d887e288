//! `gmtier._core`: thin PyO3 layer over gmtier-core. It converts types and releases the GIL;
//! all logic lives in the core crate. One file per concern: the store (`store`, `ticket`,
//! `slot_pool`, `gpu_slots`, `layout`, `raw_io`), the AdamW (`adam`, its compact-state path `adam_compact`),
//! the activation spill file and its aligned buffers (`spill`) and the exceptions (`error`).
use pyo3::prelude::*;

mod adam;
mod adam_compact;
mod error;
mod gpu_slots;
mod layout;
mod raw_io;
mod slot_pool;
mod spill;
mod store;
mod ticket;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    error::register(m)?;
    store::register(m)?;
    ticket::register(m)?;
    slot_pool::register(m)?;
    gpu_slots::register(m)?;
    raw_io::register(m)?;
    layout::register(m)?;
    adam::register(m)?;
    adam_compact::register(m)?;
    spill::register(m)?;
    Ok(())
}
