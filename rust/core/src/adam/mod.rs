//! Fused multi-threaded SIMD AdamW for experts whose fp32 master weights and moments live in
//! host memory.
//!
//! One pass per chunk of a tensor: gradient in (fp32, bf16 or fp16) -> decoupled-weight-decay
//! AdamW update of the fp32 master weight and the two moments -> optional bf16/fp16 copy of the
//! new weight (round to nearest even), all written in the same pass. The math is that of
//! `torch.optim.AdamW`:
//!
//! ```text
//! g      = grad * clip_coef / grad_scale
//! p      = p * (1 - lr * weight_decay)
//! m      = beta1 * m + (1 - beta1) * g
//! v      = beta2 * v + (1 - beta2) * g * g
//! denom  = sqrt(v) / sqrt(1 - beta2^step) + eps
//! p      = p - lr / (1 - beta1^step) * m / denom
//! half   = round_to_nearest_even(p)
//! ```
//!
//! `step` is per parameter (per expert): the caller keeps an `i64` per expert; a call increments
//! each distinct step counter once (several tensors of one expert may share one counter) and uses
//! the new value for the bias correction. Tensors not passed to a call are untouched (lazy Adam).
//!
//! Chunks of [`CHUNK`] elements are spread over a rayon pool of a configurable size; the SIMD
//! path (AVX-512, AVX2+FMA+F16C, portable scalar) is chosen at run time or forced.
//!
//! Where things are: `api` (the entry points and their argument types), `job` (a step started
//! now and waited on later), `pool` (the thread pools and the parallel passes over chunks),
//! `dispatch` (the SIMD path, coefficients, store policy, one chunk to a kernel), `avx512`,
//! `avx2`, `scalar` (the kernels), `convert` (fp32 <-> bf16/f16), `bandwidth` (memory bandwidth
//! probes), `compact` (the compact-state path: bf16 weights, 8-bit block-quantized moments).

mod api;
mod bandwidth;
pub mod compact;
mod convert;
mod dispatch;
mod groups;
mod job;
mod pool;
mod scalar;

/// `kernel!(Name, vec_bytes)` in a SIMD backend: the unit type `Name` implementing `dispatch::Kernel` with
/// that module's `#[target_feature]` `run::<G, H, S>`.
#[cfg(target_arch = "x86_64")]
macro_rules! kernel {
    ($name:ident, $vec_bytes:expr) => {
        /// The backend for `dispatch::simd_step`.
        pub(crate) struct $name;

        impl super::dispatch::Kernel for $name {
            const VEC_BYTES: usize = $vec_bytes;

            #[inline(always)]
            unsafe fn run<const G: u8, const H: u8, const S: u8>(
                c: &Coefs,
                p: *mut f32,
                m: *mut f32,
                v: *mut f32,
                g: *const u8,
                h: *mut u16,
                n: usize,
            ) {
                run::<G, H, S>(c, p, m, v, g, h, n)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

pub use crate::error::AdamError;
pub use api::{
    adamw_step, adamw_step_groups_raw, adamw_step_raw, grad_stats, grad_stats_raw, AdamConfig,
    Grad, Half, Param, RawGrad, RawParam, StepOutcome,
};
pub use bandwidth::{memory_bandwidth, Bandwidth};
pub use compact::{
    adamw_compact_step_groups, adamw_compact_step_groups_raw, compact_blocks, CompactParam,
    RawCompactParam, DEFAULT_BLOCK, MAX_BLOCK, MIN_BLOCK,
};
pub use convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use dispatch::{GradDtype, HalfDtype, Simd, StorePolicy, STREAM_MIN_BYTES};
pub use job::{adamw_step_raw_async, AdamJob};
pub use pool::thread_pool;

/// Elements per parallel task: 16 Ki elements = 64 KiB of each fp32 array, ~450 KiB of traffic
/// per task for a bf16 gradient and bf16 copy, enough to hide rayon's per-task overhead while
/// keeping the working set of one task inside L2.
pub const CHUNK: usize = 16 * 1024;

/// Elements per task of the gradient read pass (sum of squares / finite check): it moves only
/// the gradient, so its tasks are larger.
pub const STATS_CHUNK: usize = 256 * 1024;

/// Calls with at most this many elements in all run on the calling thread.
pub const INLINE_MAX: usize = CHUNK;
