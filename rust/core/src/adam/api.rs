//! The AdamW's public entry points and their argument types: hyper-parameters, tensors by
//! pointer or by borrow, and what a step did.

use super::dispatch::stats_chunk;
use super::groups::{check_group_ends, live, skipped_groups};
use super::pool::{check_pointers, grad_stats_in_pool, step_in_pool, thread_pool};
use super::{AdamError, GradDtype, HalfDtype, Simd, StorePolicy, INLINE_MAX, STATS_CHUNK};

/// Hyper-parameters and per-call options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The fp16 loss scale the gradients carry; they are multiplied by `1 / grad_scale`.
    pub grad_scale: f64,
    /// Gradient clipping multiplier (from a global norm the caller computed); 1 = no clipping.
    pub clip_coef: f64,
    /// Scan the gradients first; if any is inf/NaN, skip the whole call without writing anything.
    pub check_finite: bool,
    /// Which outputs use streaming stores.
    pub stores: StorePolicy,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            grad_scale: 1.0,
            clip_coef: 1.0,
            check_finite: false,
            stores: StorePolicy::Auto,
        }
    }
}

impl AdamConfig {
    pub(super) fn validate(&self) -> Result<(), AdamError> {
        let bad = |what: &str, v: f64| Err(AdamError::Invalid(format!("invalid {what}: {v}")));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr (must be finite and >= 0)", self.lr);
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1 (must be in [0, 1))", self.beta1);
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2 (must be in [0, 1))", self.beta2);
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps (must be finite and >= 0)", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay (must be finite and >= 0)", self.weight_decay);
        }
        if !(self.grad_scale.is_finite() && self.grad_scale > 0.0) {
            return bad("grad_scale (must be finite and > 0)", self.grad_scale);
        }
        if !(self.clip_coef.is_finite() && self.clip_coef >= 0.0) {
            return bad("clip_coef (must be finite and >= 0)", self.clip_coef);
        }
        Ok(())
    }
}

/// One tensor's update, by raw pointers (what the Python bindings pass).
///
/// `master`, `exp_avg`, `exp_avg_sq` are fp32 arrays of `numel` elements; `grad` holds `numel`
/// elements of `grad_dtype`; `half` is null or `numel` elements of `half_dtype`; `step` points to
/// the tensor's (possibly shared) step counter.
#[derive(Clone, Copy, Debug)]
pub struct RawParam {
    pub master: *mut f32,
    pub exp_avg: *mut f32,
    pub exp_avg_sq: *mut f32,
    pub grad: *const u8,
    pub grad_dtype: GradDtype,
    pub half: *mut u16,
    pub half_dtype: HalfDtype,
    pub numel: usize,
    pub step: *mut i64,
}

// SAFETY: a RawParam is a bundle of pointers whose validity the creator of the step vouches for
// (see `adamw_step_raw`); chunks given to different threads never overlap.
unsafe impl Send for RawParam {}
unsafe impl Sync for RawParam {}

/// A gradient, borrowed.
pub enum Grad<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
    /// IEEE half bit patterns.
    F16(&'a [u16]),
}

impl RawParam {
    pub(super) fn grad(&self) -> RawGrad {
        RawGrad {
            ptr: self.grad,
            dtype: self.grad_dtype,
            numel: self.numel,
        }
    }
}

impl Grad<'_> {
    /// (pointer, dtype, elements), for the compact path's safe wrapper.
    pub(super) fn parts(&self) -> (*const u8, GradDtype, usize) {
        let (p, d) = self.raw();
        (p, d, self.len())
    }

    fn len(&self) -> usize {
        match self {
            Grad::F32(g) => g.len(),
            Grad::Bf16(g) | Grad::F16(g) => g.len(),
        }
    }

    fn raw(&self) -> (*const u8, GradDtype) {
        match self {
            Grad::F32(g) => (g.as_ptr() as *const u8, GradDtype::F32),
            Grad::Bf16(g) => (g.as_ptr() as *const u8, GradDtype::Bf16),
            Grad::F16(g) => (g.as_ptr() as *const u8, GradDtype::F16),
        }
    }
}

/// The half-precision weight copy, borrowed mutably.
pub enum Half<'a> {
    Bf16(&'a mut [u16]),
    F16(&'a mut [u16]),
}

/// One tensor's update, by safe borrows.
pub struct Param<'a> {
    pub master: &'a mut [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    pub grad: Grad<'a>,
    pub half: Option<Half<'a>>,
    pub step: &'a mut i64,
}

impl Param<'_> {
    fn raw(&mut self) -> Result<RawParam, AdamError> {
        let n = self.master.len();
        let check = |what: &str, len: usize| {
            if len == n {
                Ok(())
            } else {
                Err(AdamError::Invalid(format!(
                    "{what} has {len} elements, the master weight {n}"
                )))
            }
        };
        check("exp_avg", self.exp_avg.len())?;
        check("exp_avg_sq", self.exp_avg_sq.len())?;
        check("grad", self.grad.len())?;
        let (grad, grad_dtype) = self.grad.raw();
        let (half, half_dtype) = match &mut self.half {
            None => (std::ptr::null_mut(), HalfDtype::Bf16),
            Some(Half::Bf16(h)) => {
                check("half", h.len())?;
                (h.as_mut_ptr(), HalfDtype::Bf16)
            }
            Some(Half::F16(h)) => {
                check("half", h.len())?;
                (h.as_mut_ptr(), HalfDtype::F16)
            }
        };
        Ok(RawParam {
            master: self.master.as_mut_ptr(),
            exp_avg: self.exp_avg.as_mut_ptr(),
            exp_avg_sq: self.exp_avg_sq.as_mut_ptr(),
            grad,
            grad_dtype,
            half,
            half_dtype,
            numel: n,
            step: self.step as *mut i64,
        })
    }
}

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepOutcome {
    /// The gradients held an inf/NaN (with `check_finite`): nothing was written.
    pub skipped: bool,
    /// The SIMD path that ran.
    pub simd: Simd,
}

/// A gradient to measure, by raw pointer.
#[derive(Clone, Copy, Debug)]
pub struct RawGrad {
    pub ptr: *const u8,
    pub dtype: GradDtype,
    pub numel: usize,
}

unsafe impl Send for RawGrad {}
unsafe impl Sync for RawGrad {}

impl RawGrad {
    /// Sum of squares and "holds an inf/NaN" of the [`STATS_CHUNK`] elements from `off`.
    ///
    /// # Safety
    /// The pointer must be valid for `numel` elements; `off < numel`; `simd` available.
    pub(super) unsafe fn chunk_stats(&self, simd: Simd, off: usize) -> (f64, bool) {
        let n = STATS_CHUNK.min(self.numel - off);
        let size = match self.dtype {
            GradDtype::F32 => 4,
            _ => 2,
        };
        stats_chunk(simd, self.ptr.add(off * size), self.dtype, n)
    }
}

/// Sum of squares of all gradients (in f64) and whether any element is inf/NaN.
///
/// # Safety
/// Every `RawGrad` must be valid for reads of `numel` elements during the call.
pub unsafe fn grad_stats_raw(
    grads: &[RawGrad],
    simd: Option<Simd>,
    threads: usize,
) -> Result<(f64, bool), AdamError> {
    let simd = Simd::resolve(simd)?;
    let pool = thread_pool(threads)?;
    let total: usize = grads.iter().map(|g| g.numel).sum();
    if total <= INLINE_MAX {
        return Ok(grad_stats_in_pool(grads, simd, false));
    }
    Ok(pool.install(|| grad_stats_in_pool(grads, simd, true)))
}

/// Sum of squares of gradients (safe wrapper of [`grad_stats_raw`]).
pub fn grad_stats(
    grads: &[Grad<'_>],
    simd: Option<Simd>,
    threads: usize,
) -> Result<(f64, bool), AdamError> {
    let raw: Vec<RawGrad> = grads
        .iter()
        .map(|g| {
            let (ptr, dtype) = g.raw();
            RawGrad {
                ptr,
                dtype,
                numel: g.len(),
            }
        })
        .collect();
    // SAFETY: the borrows outlive the call.
    unsafe { grad_stats_raw(&raw, simd, threads) }
}

/// One AdamW step over many tensors.
///
/// # Safety
/// Every pointer of every `RawParam` must be valid for `numel` elements (of its dtype) for the
/// duration of the call, the written arrays (master, moments, half) must not overlap each other,
/// another tensor's arrays or any gradient, and nothing else may access them meanwhile. `step`
/// pointers may be shared between tensors (each distinct counter is incremented once).
pub unsafe fn adamw_step_raw(
    params: &[RawParam],
    cfg: &AdamConfig,
    simd: Option<Simd>,
    threads: usize,
) -> Result<StepOutcome, AdamError> {
    cfg.validate()?;
    let simd = Simd::resolve(simd)?;
    let pool = thread_pool(threads)?;
    let total: usize = params.iter().map(|p| p.numel).sum();
    if total <= INLINE_MAX {
        // Small calls run on the caller's thread: waking the pool costs more than the work.
        return step_in_pool(params, cfg, simd, false);
    }
    pool.install(|| step_in_pool(params, cfg, simd, true))
}

/// One AdamW step over groups of tensors (one group per expert, say), where each group is
/// skipped on its own when its gradients hold an inf/NaN (with `check_finite`): one scan and one
/// parallel pass for all groups, rather than a call (and a wake-up of the pool) per group.
/// Group `i` is `params[group_ends[i - 1]..group_ends[i]]`. Returns whether each group was skipped.
///
/// # Safety
/// As [`adamw_step_raw`].
pub unsafe fn adamw_step_groups_raw(
    params: &[RawParam],
    group_ends: &[usize],
    cfg: &AdamConfig,
    simd: Option<Simd>,
    threads: usize,
) -> Result<Vec<bool>, AdamError> {
    cfg.validate()?;
    let simd = Simd::resolve(simd)?;
    check_group_ends(group_ends, params.len())?;
    check_pointers(params)?;
    let pool = thread_pool(threads)?;
    let parallel = params.iter().map(|p| p.numel).sum::<usize>() > INLINE_MAX;
    let run = || {
        let grads: Vec<RawGrad> = params.iter().map(RawParam::grad).collect();
        let (group_of, skipped) =
            skipped_groups(&grads, group_ends, cfg.check_finite, simd, parallel);
        let live = live(params, &group_of, &skipped);
        let unchecked = AdamConfig {
            check_finite: false,
            ..*cfg
        };
        step_in_pool(&live, &unchecked, simd, parallel).map(|_| skipped)
    };
    if parallel {
        pool.install(run)
    } else {
        run()
    }
}

/// One AdamW step over many tensors (safe wrapper of [`adamw_step_raw`]).
pub fn adamw_step(
    params: &mut [Param<'_>],
    cfg: &AdamConfig,
    simd: Option<Simd>,
    threads: usize,
) -> Result<StepOutcome, AdamError> {
    let raw = params
        .iter_mut()
        .map(|p| p.raw())
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: the exclusive borrows outlive the call and cannot overlap (Rust's aliasing rules).
    unsafe { adamw_step_raw(&raw, cfg, simd, threads) }
}
