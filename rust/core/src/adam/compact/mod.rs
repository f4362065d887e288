//! The compact-state AdamW: bf16 weights that are their own master copy, m and v in 8 bits with
//! one fp32 scale per block, all updated in one fused pass per block.
//!
//! Per element, in fp32 (the same math and order as the fp32-state path, see `super`):
//!
//! ```text
//! m, v   = decode_m(m_code) * m_scale[block], decode_v(v_code) * v_scale[block]
//! p      = bf16 weight -> fp32, AdamW step with the expert's own step count
//! weight = stochastic_round_bf16(p, rng(seed, stream, step, element index))
//! m_scale[block], v_scale[block] = max |m|, max v over the block (new values)
//! m_code, v_code = nearest codes of m / m_scale, v / v_scale
//! ```
//!
//! The maps and the RNG are in `quant`, the pass in `kernel` (portable, the reference) and in
//! `avx512` and `avx2` (intrinsics, the same bits). Blocks are spread over the fp32
//! path's thread pool in tasks of about [`super::CHUNK`] elements; a block's result depends on
//! that block only, so the output is the same bits for any thread count.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod kernel;
pub mod quant;

use super::dispatch::Coefs;
use super::groups::{check_group_ends, live, next_steps, skipped_groups};
use super::pool::{chunk_starts, locate, thread_pool};
use super::{AdamConfig, AdamError, Grad, GradDtype, RawGrad, Simd, CHUNK, INLINE_MAX};
use kernel::Run;
use rayon::prelude::*;

pub use kernel::MAX_BLOCK;

/// Smallest block size.
pub const MIN_BLOCK: usize = 256;
/// The block size until measured otherwise: fewest scales (4 B per 2048 elements per moment).
pub const DEFAULT_BLOCK: usize = 2048;

/// One tensor's compact update, by raw pointers (what the Python bindings pass).
///
/// `weight`: `numel` bf16 (the master, updated in place); `m_codes`, `v_codes`: `numel` bytes;
/// `m_scales`, `v_scales`: `numel.div_ceil(block)` fp32; `grad`: `numel` of `grad_dtype`;
/// `step`: the (possibly shared) step counter; `stream`: the tensor's RNG stream id (say
/// `(layer * experts + expert) * tensors + tensor`): two tensors stepped with the same seed,
/// stream and step get the same rounding bits.
#[derive(Clone, Copy, Debug)]
pub struct RawCompactParam {
    pub weight: *mut u16,
    pub m_codes: *mut u8,
    pub v_codes: *mut u8,
    pub m_scales: *mut f32,
    pub v_scales: *mut f32,
    pub grad: *const u8,
    pub grad_dtype: GradDtype,
    pub numel: usize,
    pub step: *mut i64,
    pub stream: u64,
}

// SAFETY: as RawParam: the caller vouches for the pointers; tasks never overlap.
unsafe impl Send for RawCompactParam {}
unsafe impl Sync for RawCompactParam {}

/// One tensor's compact update, by safe borrows.
pub struct CompactParam<'a> {
    pub weight: &'a mut [u16],
    pub m_codes: &'a mut [u8],
    pub v_codes: &'a mut [u8],
    pub m_scales: &'a mut [f32],
    pub v_scales: &'a mut [f32],
    pub grad: Grad<'a>,
    pub step: &'a mut i64,
    pub stream: u64,
}

/// Scales per moment of a tensor of `numel` elements.
pub fn compact_blocks(numel: usize, block: usize) -> usize {
    numel.div_ceil(block)
}

fn check_block(block: usize) -> Result<(), AdamError> {
    if (MIN_BLOCK..=MAX_BLOCK).contains(&block) && block.is_power_of_two() {
        Ok(())
    } else {
        Err(AdamError::Invalid(format!(
            "compact block size {block}: must be a power of two in {MIN_BLOCK}..={MAX_BLOCK}"
        )))
    }
}

fn check_pointers(params: &[RawCompactParam]) -> Result<(), AdamError> {
    for (i, p) in params.iter().enumerate() {
        let null = p.weight.is_null()
            || p.m_codes.is_null()
            || p.v_codes.is_null()
            || p.m_scales.is_null()
            || p.v_scales.is_null()
            || p.grad.is_null();
        if p.numel > 0 && null {
            return Err(AdamError::Invalid(format!("tensor {i}: null pointer")));
        }
        if p.step.is_null() {
            return Err(AdamError::Invalid(format!("tensor {i}: null step pointer")));
        }
    }
    Ok(())
}

/// Every block scale must be a finite, non-negative number (an absmax): anything else is a
/// damaged state, refused before a single element is stepped. Cheap: one scale per block.
fn check_scales(params: &[RawCompactParam], block: usize) -> Result<(), AdamError> {
    for (i, p) in params.iter().enumerate() {
        let nb = compact_blocks(p.numel, block);
        for (what, ptr) in [("m_scales", p.m_scales), ("v_scales", p.v_scales)] {
            if nb == 0 {
                continue;
            }
            // SAFETY: the caller vouches for `nb` scales at `ptr`.
            let scales = unsafe { std::slice::from_raw_parts(ptr, nb) };
            if let Some(b) = scales.iter().position(|s| !(s.is_finite() && *s >= 0.0)) {
                return Err(AdamError::Invalid(format!(
                    "tensor {i}: {what}[{b}] = {} is not a finite non-negative block scale: the \
                     compact optimizer state is corrupt (restore the store from a backup or \
                     retrain the expert)",
                    scales[b]
                )));
            }
        }
    }
    Ok(())
}

/// One compact AdamW step over groups of tensors (one group per expert), each group skipped on
/// its own, untouched, when its gradients hold an inf/NaN (with `cfg.check_finite`), as
/// [`super::adamw_step_groups_raw`]. A block scale that is negative or not finite is an error
/// (a corrupt state), before anything is written. `cfg.stores` is ignored (regular stores). Each distinct
/// step counter of a live group is incremented once. Returns whether each group was skipped.
///
/// # Safety
/// Every pointer valid for its length (see [`RawCompactParam`]) for the call; written arrays
/// disjoint from each other and from every gradient; nothing else accesses them meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn adamw_compact_step_groups_raw(
    params: &[RawCompactParam],
    group_ends: &[usize],
    cfg: &AdamConfig,
    block: usize,
    seed: u64,
    simd: Option<Simd>,
    threads: usize,
) -> Result<Vec<bool>, AdamError> {
    cfg.validate()?;
    check_block(block)?;
    let simd = Simd::resolve(simd)?;
    check_group_ends(group_ends, params.len())?;
    check_pointers(params)?;
    check_scales(params, block)?;
    let pool = thread_pool(threads)?;
    let parallel = params.iter().map(|p| p.numel).sum::<usize>() > INLINE_MAX;
    let run = || {
        let grads: Vec<RawGrad> = params
            .iter()
            .map(|p| RawGrad {
                ptr: p.grad,
                dtype: p.grad_dtype,
                numel: p.numel,
            })
            .collect();
        let (group_of, skipped) =
            skipped_groups(&grads, group_ends, cfg.check_finite, simd, parallel);
        let live = live(params, &group_of, &skipped);
        step_live(&live, cfg, block, seed, simd, parallel);
        skipped
    };
    Ok(if parallel { pool.install(run) } else { run() })
}

/// The parallel pass over the blocks of `params`, then the step counters.
unsafe fn step_live(
    params: &[RawCompactParam],
    cfg: &AdamConfig,
    block: usize,
    seed: u64,
    simd: Simd,
    parallel: bool,
) {
    let (new_steps, steps) = next_steps(params.iter().map(|p| p.step));
    let coefs: Vec<(Coefs, u64)> = params
        .iter()
        .zip(new_steps)
        .map(|(p, new)| (Coefs::new(cfg, new), quant::sr_key(seed, p.stream, new)))
        .collect();
    // Tasks of whole blocks, about CHUNK elements each.
    let task = block * (CHUNK / block).max(1);
    let prefix = chunk_starts(params.iter().map(|p| p.numel), task);
    let one = |ti: usize| {
        let (t, off) = locate(&prefix, ti, task);
        let p = &params[t];
        let gsize = if p.grad_dtype == GradDtype::F32 { 4 } else { 2 };
        let (c, key) = &coefs[t];
        let r = Run {
            weight: p.weight.add(off),
            m_codes: p.m_codes.add(off),
            v_codes: p.v_codes.add(off),
            m_scales: p.m_scales.add(off / block),
            v_scales: p.v_scales.add(off / block),
            grad: p.grad.add(off * gsize),
            grad_dtype: p.grad_dtype,
            n: task.min(p.numel - off),
            first: off as u64,
            block,
            key: *key,
        };
        // SAFETY: the caller vouches for the pointers; tasks cover disjoint whole blocks.
        unsafe { kernel::run(simd, c, &r) };
    };
    let total = *prefix.last().unwrap();
    if parallel {
        (0..total).into_par_iter().for_each(one);
    } else {
        (0..total).for_each(one);
    }
    for (ptr, s) in steps {
        ptr.write(s);
    }
}

impl CompactParam<'_> {
    fn raw(&mut self, block: usize) -> Result<RawCompactParam, AdamError> {
        let n = self.weight.len();
        let nb = compact_blocks(n, block);
        let (grad, grad_dtype, glen) = self.grad.parts();
        for (what, len, want) in [
            ("m_codes", self.m_codes.len(), n),
            ("v_codes", self.v_codes.len(), n),
            ("grad", glen, n),
            ("m_scales", self.m_scales.len(), nb),
            ("v_scales", self.v_scales.len(), nb),
        ] {
            if len != want {
                return Err(AdamError::Invalid(format!(
                    "{what} has {len} elements, expected {want} (weight {n}, block {block})"
                )));
            }
        }
        Ok(RawCompactParam {
            weight: self.weight.as_mut_ptr(),
            m_codes: self.m_codes.as_mut_ptr(),
            v_codes: self.v_codes.as_mut_ptr(),
            m_scales: self.m_scales.as_mut_ptr(),
            v_scales: self.v_scales.as_mut_ptr(),
            grad,
            grad_dtype,
            numel: n,
            step: self.step as *mut i64,
            stream: self.stream,
        })
    }
}

/// Safe wrapper of [`adamw_compact_step_groups_raw`].
#[allow(clippy::too_many_arguments)]
pub fn adamw_compact_step_groups(
    params: &mut [CompactParam<'_>],
    group_ends: &[usize],
    cfg: &AdamConfig,
    block: usize,
    seed: u64,
    simd: Option<Simd>,
    threads: usize,
) -> Result<Vec<bool>, AdamError> {
    check_block(block)?;
    let raw = params
        .iter_mut()
        .map(|p| p.raw(block))
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: the exclusive borrows outlive the call and cannot overlap.
    unsafe { adamw_compact_step_groups_raw(&raw, group_ends, cfg, block, seed, simd, threads) }
}
