//! Bindings of `gmtier_core::adam::compact`, the compact-state AdamW. Python
//! (`gmtier.compact_adam`) validates the tensors and passes raw addresses; these functions only
//! convert and release the GIL.
use crate::adam::{adam_config, grad_dtype};
use crate::error;
use gmtier_core::adam::compact::quant;
use gmtier_core::adam::{self, RawCompactParam, StorePolicy};
use pyo3::prelude::*;

/// (weight, m_codes, v_codes, m_scales, v_scales, grad, grad_dtype, numel, step, stream)
type Spec = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    String,
    usize,
    usize,
    u64,
);

/// Raw compact AdamW step over groups of tensors given by address (use
/// `gmtier.compact_adam`, which validates), each group skipped on its own for a non-finite
/// gradient with `check_finite`. Returns a skipped flag per group. GIL released.
#[pyfunction]
#[pyo3(signature = (specs, group_ends, lr, beta1, beta2, eps, weight_decay, grad_scale=1.0,
                    clip_coef=1.0, check_finite=false, block=adam::DEFAULT_BLOCK, seed=0,
                    simd="auto", threads=0))]
#[allow(clippy::too_many_arguments)]
fn adamw_compact_step_groups_raw(
    py: Python<'_>,
    specs: Vec<Spec>,
    group_ends: Vec<usize>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    grad_scale: f64,
    clip_coef: f64,
    check_finite: bool,
    block: usize,
    seed: u64,
    simd: &str,
    threads: usize,
) -> PyResult<Vec<bool>> {
    // The compact path writes codes and bf16 weights with plain stores: no store policy.
    let cfg = adam_config(
        [lr, beta1, beta2, eps, weight_decay, grad_scale, clip_coef],
        check_finite,
        StorePolicy::Regular,
    );
    let s = crate::adam::simd(simd)?;
    let params = specs
        .into_iter()
        .map(|(w, mq, vq, ms, vs, g, gd, numel, step, stream)| {
            Ok(RawCompactParam {
                weight: w as *mut u16,
                m_codes: mq as *mut u8,
                v_codes: vq as *mut u8,
                m_scales: ms as *mut f32,
                v_scales: vs as *mut f32,
                grad: g as *const u8,
                grad_dtype: grad_dtype(&gd)?,
                numel,
                step: step as *mut i64,
                stream,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    py.detach(move || {
        // SAFETY: gmtier.compact_adam checked dtypes, sizes, devices and contiguity and keeps the
        // tensors alive for the call.
        unsafe {
            adam::adamw_compact_step_groups_raw(&params, &group_ends, &cfg, block, seed, s, threads)
        }
    })
    .map_err(error::adam)
}

/// The 256 values of the m map and of the v map (index = code; times the block scale).
#[pyfunction]
fn adam_compact_maps() -> (Vec<f32>, Vec<f32>) {
    (quant::m_map().to_vec(), quant::v_map().to_vec())
}

/// The rounding RNG's per-(seed, stream, step) key.
#[pyfunction]
fn adam_compact_sr_key(seed: u64, stream: u64, step: i64) -> u64 {
    quant::sr_key(seed, stream, step)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(adamw_compact_step_groups_raw, m)?)?;
    m.add_function(wrap_pyfunction!(adam_compact_maps, m)?)?;
    m.add_function(wrap_pyfunction!(adam_compact_sr_key, m)?)?;
    m.add(
        "ADAM_COMPACT_BLOCKS",
        (adam::MIN_BLOCK, adam::MAX_BLOCK, adam::DEFAULT_BLOCK),
    )?;
    Ok(())
}
