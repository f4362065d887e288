//! Schemas and record layouts: parsing a Python schema, listing a layout, `record_layout`.

use crate::error;
use gmtier_core::store::format::{RecordLayout, TensorSpec};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

/// A schema of (name, dtype, shape[, section]) entries.
pub fn parse_schema(schema: &Bound<'_, PyAny>) -> PyResult<Vec<TensorSpec>> {
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

/// (name, dtype, shape, offset_in_record, nbytes, section) for each tensor of a layout.
pub fn layout_list<'py>(py: Python<'py>, layout: &RecordLayout) -> PyResult<Bound<'py, PyList>> {
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
    let layout = RecordLayout::new(&parse_schema(schema)?).map_err(error::store)?;
    Ok((
        layout_list(py, &layout)?,
        layout.record_bytes,
        layout.weights_bytes,
    ))
}

/// Register `record_layout` in `gmtier._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(record_layout, m)?)
}
