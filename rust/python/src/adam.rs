//! Bindings of `gmtier_core::adam`. Python (`gmtier.adam`) validates the torch tensors and passes
//! raw addresses; these functions only convert and release the GIL.
use crate::error;
use gmtier_core::adam::{
    self, AdamConfig, AdamJob, GradDtype, HalfDtype, RawGrad, RawParam, Simd, StorePolicy,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub(crate) fn grad_dtype(s: &str) -> PyResult<GradDtype> {
    match s {
        "float32" => Ok(GradDtype::F32),
        "bfloat16" => Ok(GradDtype::Bf16),
        "float16" => Ok(GradDtype::F16),
        _ => Err(PyValueError::new_err(format!(
            "gradient dtype {s:?} not supported (float32, bfloat16, float16)"
        ))),
    }
}

fn half_dtype(s: &str) -> PyResult<HalfDtype> {
    match s {
        "bfloat16" => Ok(HalfDtype::Bf16),
        "float16" => Ok(HalfDtype::F16),
        _ => Err(PyValueError::new_err(format!(
            "half copy dtype {s:?} not supported (bfloat16, float16)"
        ))),
    }
}

pub(crate) fn simd(s: &str) -> PyResult<Option<Simd>> {
    Simd::parse(s).map_err(error::adam)
}

/// (master, exp_avg, exp_avg_sq, grad, grad_dtype, half (0 = none), half_dtype, numel, step)
type Spec = (
    usize,
    usize,
    usize,
    usize,
    String,
    usize,
    String,
    usize,
    usize,
);

fn raw_params(specs: Vec<Spec>) -> PyResult<Vec<RawParam>> {
    specs
        .into_iter()
        .map(|(p, m, v, g, gd, h, hd, numel, step)| {
            Ok(RawParam {
                master: p as *mut f32,
                exp_avg: m as *mut f32,
                exp_avg_sq: v as *mut f32,
                grad: g as *const u8,
                grad_dtype: grad_dtype(&gd)?,
                half: h as *mut u16,
                half_dtype: if h == 0 {
                    HalfDtype::Bf16
                } else {
                    half_dtype(&hd)?
                },
                numel,
                step: step as *mut i64,
            })
        })
        .collect()
}

/// The converted arguments of `adamw_step_groups_raw` and `adamw_step_raw_async`: parameters, SIMD
/// choice and step configuration (`stores`: "auto" | "none" | "half" | "all", see
/// `gmtier_core::adam::StorePolicy`).
#[allow(clippy::too_many_arguments)]
fn step_args(
    specs: Vec<Spec>,
    simd: &str,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    grad_scale: f64,
    clip_coef: f64,
    check_finite: bool,
    stores: &str,
) -> PyResult<(Vec<RawParam>, Option<Simd>, AdamConfig)> {
    let cfg = adam_config(
        [lr, beta1, beta2, eps, weight_decay, grad_scale, clip_coef],
        check_finite,
        StorePolicy::parse(stores).map_err(error::adam)?,
    );
    Ok((raw_params(specs)?, self::simd(simd)?, cfg))
}

/// The step configuration from the bindings' scalar arguments, in their order: lr, beta1, beta2,
/// eps, weight_decay, grad_scale, clip_coef.
pub(crate) fn adam_config(
    scalars: [f64; 7],
    check_finite: bool,
    stores: StorePolicy,
) -> AdamConfig {
    let [lr, beta1, beta2, eps, weight_decay, grad_scale, clip_coef] = scalars;
    AdamConfig {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        grad_scale,
        clip_coef,
        check_finite,
        stores,
    }
}

/// Raw fused AdamW step over groups of tensors given by address (use `gmtier.adam`, which
/// validates; `group_ends[i]`: the end of group i in `specs`), each group skipped on its own for
/// a non-finite gradient with `check_finite`. Returns a skipped flag per group. GIL released.
#[pyfunction]
#[pyo3(signature = (specs, group_ends, lr, beta1, beta2, eps, weight_decay, grad_scale=1.0,
                    clip_coef=1.0, check_finite=false, simd="auto", threads=0, stores="auto"))]
#[allow(clippy::too_many_arguments)]
fn adamw_step_groups_raw(
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
    simd: &str,
    threads: usize,
    stores: &str,
) -> PyResult<Vec<bool>> {
    let (params, s, cfg) = step_args(
        specs,
        simd,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        grad_scale,
        clip_coef,
        check_finite,
        stores,
    )?;
    py.detach(move || {
        // SAFETY: gmtier.adam checked dtypes, sizes, devices and contiguity and keeps the tensors
        // alive for the call.
        unsafe { adam::adamw_step_groups_raw(&params, &group_ends, &cfg, s, threads) }
    })
    .map_err(error::adam)
}

/// A step running on the Adam thread pool.
#[pyclass(module = "gmtier._core", name = "AdamJob")]
struct PyAdamJob {
    job: AdamJob,
}

#[pymethods]
impl PyAdamJob {
    /// Block (GIL released) until the step finished; True when it was skipped.
    fn wait(&self, py: Python<'_>) -> PyResult<bool> {
        py.detach(|| self.job.wait())
            .map(|o| o.skipped)
            .map_err(error::adam)
    }

    /// Whether the step finished.
    fn done(&self) -> bool {
        self.job.is_done()
    }
}

/// As `adamw_step_groups_raw` with one group, but returns at once with a job; the caller keeps the tensors alive
/// and untouched until `job.wait()` returned.
#[pyfunction]
#[pyo3(signature = (specs, lr, beta1, beta2, eps, weight_decay, grad_scale=1.0, clip_coef=1.0,
                    check_finite=false, simd="auto", threads=0, stores="auto"))]
#[allow(clippy::too_many_arguments)]
fn adamw_step_raw_async(
    specs: Vec<Spec>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    grad_scale: f64,
    clip_coef: f64,
    check_finite: bool,
    simd: &str,
    threads: usize,
    stores: &str,
) -> PyResult<PyAdamJob> {
    let (params, s, cfg) = step_args(
        specs,
        simd,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        grad_scale,
        clip_coef,
        check_finite,
        stores,
    )?;
    // SAFETY: gmtier.adam validated the tensors and holds them until the job is waited on.
    let job = unsafe { adam::adamw_step_raw_async(params, cfg, s, threads) };
    Ok(PyAdamJob { job })
}

/// Sum of squares (float64) of gradients given as (address, dtype, numel), and whether any
/// element is inf/NaN. GIL released.
#[pyfunction]
#[pyo3(signature = (grads, simd="auto", threads=0))]
fn grad_sumsq_raw(
    py: Python<'_>,
    grads: Vec<(usize, String, usize)>,
    simd: &str,
    threads: usize,
) -> PyResult<(f64, bool)> {
    let s = self::simd(simd)?;
    let grads = grads
        .into_iter()
        .map(|(ptr, dtype, numel)| {
            Ok(RawGrad {
                ptr: ptr as *const u8,
                dtype: grad_dtype(&dtype)?,
                numel,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    // SAFETY: gmtier.adam validated the tensors and keeps them alive for the call.
    py.detach(move || unsafe { adam::grad_stats_raw(&grads, s, threads) })
        .map_err(error::adam)
}

/// Multi-threaded memory bandwidth over arrays of `nbytes` each: dict with copy_gbps,
/// triad_gbps (best of `repeats`, bytes read + written per second), copy_median_gbps, threads.
#[pyfunction]
#[pyo3(signature = (nbytes=1 << 30, threads=0, repeats=5))]
fn memory_bandwidth<'py>(
    py: Python<'py>,
    nbytes: usize,
    threads: usize,
    repeats: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let bw = py
        .detach(move || adam::memory_bandwidth(nbytes, threads, repeats))
        .map_err(error::adam)?;
    let d = PyDict::new(py);
    d.set_item("copy_gbps", bw.copy_gbps)?;
    d.set_item("memcpy_gbps", bw.memcpy_gbps)?;
    d.set_item("stream_copy_gbps", bw.stream_copy_gbps)?;
    d.set_item("triad_gbps", bw.triad_gbps)?;
    d.set_item("inplace_gbps", bw.inplace_gbps)?;
    d.set_item("copy_median_gbps", bw.copy_median_gbps)?;
    d.set_item("threads", bw.threads)?;
    d.set_item("nbytes", bw.bytes)?;
    Ok(d)
}

/// SIMD paths this CPU can run, fastest first.
#[pyfunction]
fn adam_simd_available() -> Vec<&'static str> {
    Simd::available().into_iter().map(|s| s.name()).collect()
}

/// The path "auto" picks.
#[pyfunction]
fn adam_simd_best() -> &'static str {
    Simd::best().name()
}

/// Elements per parallel task.
#[pyfunction]
fn adam_chunk_elements() -> usize {
    adam::CHUNK
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(adamw_step_raw_async, m)?)?;
    m.add_function(wrap_pyfunction!(adamw_step_groups_raw, m)?)?;
    m.add_function(wrap_pyfunction!(grad_sumsq_raw, m)?)?;
    m.add_function(wrap_pyfunction!(memory_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(adam_simd_available, m)?)?;
    m.add_function(wrap_pyfunction!(adam_simd_best, m)?)?;
    m.add_function(wrap_pyfunction!(adam_chunk_elements, m)?)?;
    m.add_class::<PyAdamJob>()?;
    Ok(())
}
