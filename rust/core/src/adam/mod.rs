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

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use rayon::prelude::*;

mod bandwidth;
mod scalar;

/// `kernel!(Name, vec_bytes)` in a SIMD backend: the unit type `Name` implementing [`Kernel`] with
/// that module's `#[target_feature]` `run::<G, H, S>`.
#[cfg(target_arch = "x86_64")]
macro_rules! kernel {
    ($name:ident, $vec_bytes:expr) => {
        /// The backend for [`super::simd_step`].
        pub(crate) struct $name;

        impl super::Kernel for $name {
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

pub use bandwidth::{memory_bandwidth, Bandwidth};

/// Elements per parallel task: 16 Ki elements = 64 KiB of each fp32 array, ~450 KiB of traffic
/// per task for a bf16 gradient and bf16 copy, enough to hide rayon's per-task overhead while
/// keeping the working set of one task inside L2.
pub const CHUNK: usize = 16 * 1024;

/// Elements per task of the gradient read pass (sum of squares / finite check): it moves only
/// the gradient, so its tasks are larger.
pub const STATS_CHUNK: usize = 256 * 1024;

/// Calls with at most this many elements in all run on the calling thread.
pub const INLINE_MAX: usize = CHUNK;

/// [`CHUNK`], or `GMTIER_ADAM_CHUNK` (elements, a multiple of 64) for experiments.
fn chunk_len() -> usize {
    static LEN: OnceLock<usize> = OnceLock::new();
    *LEN.get_or_init(|| {
        std::env::var("GMTIER_ADAM_CHUNK")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n >= 64 && n % 64 == 0)
            .unwrap_or(CHUNK)
    })
}

/// A SIMD code path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Simd {
    /// Portable Rust, any target.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX-512 F, BW and VL.
    Avx512,
}

impl Simd {
    pub const ALL: [Simd; 3] = [Simd::Avx512, Simd::Avx2, Simd::Scalar];

    pub fn name(self) -> &'static str {
        match self {
            Simd::Scalar => "scalar",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    /// Parse `"auto"` (-> `None`), `"avx512"`, `"avx2"` or `"scalar"`.
    pub fn parse(s: &str) -> Result<Option<Simd>, AdamError> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(None),
            "scalar" | "portable" => Ok(Some(Simd::Scalar)),
            "avx2" => Ok(Some(Simd::Avx2)),
            "avx512" | "avx-512" | "avx512f" => Ok(Some(Simd::Avx512)),
            other => Err(AdamError::Invalid(format!(
                "unknown simd path {other:?}: expected \"auto\", \"avx512\", \"avx2\" or \"scalar\""
            ))),
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            Simd::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The paths this CPU can run, fastest first.
    pub fn available() -> Vec<Simd> {
        Simd::ALL.into_iter().filter(|s| s.is_available()).collect()
    }

    /// The fastest path this CPU can run.
    pub fn best() -> Simd {
        static BEST: OnceLock<Simd> = OnceLock::new();
        *BEST.get_or_init(|| Simd::available()[0])
    }

    /// `None` -> the best path; `Some(s)` -> `s` if the CPU has it, else an error.
    pub fn resolve(requested: Option<Simd>) -> Result<Simd, AdamError> {
        match requested {
            None => Ok(Simd::best()),
            Some(s) if s.is_available() => Ok(s),
            Some(s) => Err(AdamError::SimdUnavailable(s)),
        }
    }
}

/// Element type of a gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradDtype {
    F32,
    Bf16,
    F16,
}

/// Element type of the half-precision weight copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfDtype {
    Bf16,
    F16,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AdamError {
    /// The requested SIMD path needs CPU features this machine lacks.
    SimdUnavailable(Simd),
    /// Bad arguments.
    Invalid(String),
    /// A worker panicked (a bug).
    Panicked(String),
}

impl fmt::Display for AdamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdamError::SimdUnavailable(s) => write!(
                f,
                "simd path {:?} is not available on this CPU (available: {})",
                s.name(),
                Simd::available()
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            AdamError::Invalid(msg) => write!(f, "{msg}"),
            AdamError::Panicked(msg) => write!(f, "adam worker panicked: {msg}"),
        }
    }
}

impl std::error::Error for AdamError {}

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
        }
    }
}

impl AdamConfig {
    fn validate(&self) -> Result<(), AdamError> {
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
    fn grad(&self) -> RawGrad {
        RawGrad {
            ptr: self.grad,
            dtype: self.grad_dtype,
            numel: self.numel,
        }
    }
}

impl Grad<'_> {
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

/// Per-element coefficients of one tensor's update, in fp32 as the kernels use them.
///
/// The operation order is torch's fused CPU AdamW (`FusedAdamKernel.cpp`), so that the result
/// agrees with it to the last bit in almost every element:
/// `p *= decay; m = fma(lerp_coeff, g - m, lerp_small ? m : g)` (that is `m.lerp_(g, 1 - beta1)`);
/// `v = fma(omb2 * g, g, v * beta2); denom = sqrt(v) / bc2_sqrt + eps; p += (neg_step_size * m) / denom`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Coefs {
    pub gscale: f32,
    pub decay: f32,
    pub lerp_coeff: f32,
    pub lerp_small: bool,
    pub beta2: f32,
    pub omb2: f32,
    pub neg_step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// Store policy: [`STREAM_NONE`], [`STREAM_HALF`] or [`STREAM_ALL`].
    pub stream: u8,
    /// Software prefetch distance in elements (0 = off; SIMD paths only).
    pub prefetch: usize,
}

/// `GMTIER_ADAM_PREFETCH`: software prefetch distance in elements (default 0: the hardware
/// prefetchers alone), for experiments.
fn prefetch_distance() -> usize {
    static PF: OnceLock<usize> = OnceLock::new();
    *PF.get_or_init(|| {
        std::env::var("GMTIER_ADAM_PREFETCH")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .map(|n| n / 64 * 64)
            .unwrap_or(0)
    })
}

/// Regular stores.
pub(crate) const STREAM_NONE: u8 = 0;
/// Non-temporal stores for the half copy (write-only: saves its read-for-ownership).
pub(crate) const STREAM_HALF: u8 = 1;
/// Non-temporal stores for every output.
pub(crate) const STREAM_ALL: u8 = 2;

// Const-generic kernel tags of the SIMD backends: gradient dtype (G) and half-copy dtype (H).
#[cfg(target_arch = "x86_64")]
pub(crate) const G_F32: u8 = 0;
#[cfg(target_arch = "x86_64")]
pub(crate) const G_BF16: u8 = 1;
#[cfg(target_arch = "x86_64")]
pub(crate) const G_F16: u8 = 2;
#[cfg(target_arch = "x86_64")]
pub(crate) const H_NONE: u8 = 0;
#[cfg(target_arch = "x86_64")]
pub(crate) const H_BF16: u8 = 1;
#[cfg(target_arch = "x86_64")]
pub(crate) const H_F16: u8 = 2;

/// A SIMD backend: its `#[target_feature]` kernel, monomorphized per gradient dtype `G`, half
/// dtype `H` and store policy `S`, and the width of its fp32 vectors.
#[cfg(target_arch = "x86_64")]
pub(crate) trait Kernel {
    /// Bytes of one fp32 vector: streaming stores need p/m/v aligned to this, the half copy to
    /// half of it.
    const VEC_BYTES: usize;

    /// Update `n` elements (`h` null for no half copy).
    ///
    /// # Safety
    /// The CPU has the backend's features; pointers valid for `n` elements; streaming policy `S`
    /// only with the alignment above.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run<const G: u8, const H: u8, const S: u8>(
        c: &Coefs,
        p: *mut f32,
        m: *mut f32,
        v: *mut f32,
        g: *const u8,
        h: *mut u16,
        n: usize,
    );
}

/// Update `n` elements with backend `K`: picks the store policy the pointers' alignment allows
/// and dispatches (grad dtype, half dtype, policy) to `K::run`'s monomorphized kernels.
///
/// # Safety
/// The CPU has `K`'s features; pointers valid for `n` elements; `h` null for no half copy.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn simd_step<K: Kernel>(
    c: &Coefs,
    p: *mut f32,
    m: *mut f32,
    v: *mut f32,
    g: *const u8,
    gd: GradDtype,
    h: *mut u16,
    hd: HalfDtype,
    n: usize,
    stream: u8,
) {
    let hk = match (h.is_null(), hd) {
        (true, _) => H_NONE,
        (false, HalfDtype::Bf16) => H_BF16,
        (false, HalfDtype::F16) => H_F16,
    };
    // Streaming stores need full vectors at aligned addresses: one fp32 vector for p/m/v, half
    // of that for the half copy.
    let (fa, ha) = (K::VEC_BYTES, K::VEC_BYTES / 2);
    let stream = match stream {
        STREAM_ALL
            if [p, m, v].iter().all(|x| (*x as usize).is_multiple_of(fa))
                && (h as usize).is_multiple_of(ha) =>
        {
            STREAM_ALL
        }
        STREAM_ALL | STREAM_HALF if (h as usize).is_multiple_of(ha) && hk != H_NONE => STREAM_HALF,
        _ => STREAM_NONE,
    };
    macro_rules! go {
        ($g:expr, $h:expr) => {
            match stream {
                STREAM_ALL => K::run::<$g, $h, STREAM_ALL>(c, p, m, v, g, h, n),
                STREAM_HALF => K::run::<$g, $h, STREAM_HALF>(c, p, m, v, g, h, n),
                _ => K::run::<$g, $h, STREAM_NONE>(c, p, m, v, g, h, n),
            }
        };
    }
    match (gd, hk) {
        (GradDtype::F32, H_NONE) => go!(G_F32, H_NONE),
        (GradDtype::F32, H_BF16) => go!(G_F32, H_BF16),
        (GradDtype::F32, _) => go!(G_F32, H_F16),
        (GradDtype::Bf16, H_NONE) => go!(G_BF16, H_NONE),
        (GradDtype::Bf16, H_BF16) => go!(G_BF16, H_BF16),
        (GradDtype::Bf16, _) => go!(G_BF16, H_F16),
        (GradDtype::F16, H_NONE) => go!(G_F16, H_NONE),
        (GradDtype::F16, H_BF16) => go!(G_F16, H_BF16),
        (GradDtype::F16, _) => go!(G_F16, H_F16),
    }
}

/// The store policy: `GMTIER_ADAM_STREAM` = none | half | all | auto (default auto: streaming
/// stores for the half copy when a call touches more than [`STREAM_MIN_BYTES`]).
fn stream_policy(bytes: usize) -> u8 {
    static ENV: OnceLock<Option<u8>> = OnceLock::new();
    let forced = *ENV.get_or_init(|| match std::env::var("GMTIER_ADAM_STREAM").as_deref() {
        Ok("none") => Some(STREAM_NONE),
        Ok("half") => Some(STREAM_HALF),
        Ok("all") => Some(STREAM_ALL),
        _ => None,
    });
    forced.unwrap_or(if bytes >= STREAM_MIN_BYTES {
        STREAM_HALF
    } else {
        STREAM_NONE
    })
}

/// Calls touching at least this many bytes use streaming stores under the `auto` policy
/// (well above the last-level caches, whose contents would otherwise be reused).
pub const STREAM_MIN_BYTES: usize = 64 << 20;

impl Coefs {
    pub(crate) fn new(cfg: &AdamConfig, step: i64) -> Coefs {
        // As torch's fused CPU AdamW: bias corrections in double, then fp32.
        let bc1 = 1.0 - cfg.beta1.powi(step.min(i32::MAX as i64) as i32);
        let bc2 = 1.0 - cfg.beta2.powi(step.min(i32::MAX as i64) as i32);
        let w = (1.0 - cfg.beta1) as f32;
        let lerp_small = w.abs() < 0.5;
        Coefs {
            gscale: (cfg.clip_coef / cfg.grad_scale) as f32,
            decay: (1.0 - cfg.lr * cfg.weight_decay) as f32,
            lerp_coeff: if lerp_small { w } else { w - 1.0 },
            lerp_small,
            beta2: cfg.beta2 as f32,
            omb2: (1.0 - cfg.beta2) as f32,
            neg_step_size: (-(cfg.lr / bc1)) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: cfg.eps as f32,
            stream: STREAM_NONE,
            prefetch: prefetch_distance(),
        }
    }
}

/// Round an fp32 to bf16, nearest even; NaN -> the canonical quiet NaN 0x7FC0 (as torch).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        0x7FC0
    } else {
        let b = x.to_bits();
        (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// Round an fp32 to IEEE half, nearest even.
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[inline]
pub fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// Update `n` elements starting at element `off` of `p` with path `simd`.
///
/// # Safety
/// `p`'s pointers must be valid for elements `off..off + n`, and `simd` available.
unsafe fn run_chunk(simd: Simd, c: &Coefs, p: &RawParam, off: usize, n: usize) {
    let master = p.master.add(off);
    let m = p.exp_avg.add(off);
    let v = p.exp_avg_sq.add(off);
    let gsize = match p.grad_dtype {
        GradDtype::F32 => 4,
        _ => 2,
    };
    let g = p.grad.add(off * gsize);
    let h = if p.half.is_null() {
        std::ptr::null_mut()
    } else {
        p.half.add(off)
    };
    match simd {
        Simd::Scalar => scalar::step(c, master, m, v, g, p.grad_dtype, h, p.half_dtype, n),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => simd_step::<avx2::Avx2>(
            c,
            master,
            m,
            v,
            g,
            p.grad_dtype,
            h,
            p.half_dtype,
            n,
            c.stream,
        ),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => simd_step::<avx512::Avx512>(
            c,
            master,
            m,
            v,
            g,
            p.grad_dtype,
            h,
            p.half_dtype,
            n,
            c.stream,
        ),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("non-x86 SIMD paths are never resolved"),
    }
}

/// Sum of squares and "holds an inf/NaN" of `n` gradient elements.
///
/// # Safety
/// `g` must be valid for `n` elements of `dtype`; `simd` available.
unsafe fn stats_chunk(simd: Simd, g: *const u8, dtype: GradDtype, n: usize) -> (f64, bool) {
    match simd {
        Simd::Scalar => scalar::grad_stats(g, dtype, n),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => avx2::grad_stats(g, dtype, n),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => avx512::grad_stats(g, dtype, n),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("non-x86 SIMD paths are never resolved"),
    }
}

/// The rayon pool with `threads` workers (0 = one per available CPU), created once per size.
pub fn thread_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, AdamError> {
    // Keyed by (process id, threads): a fork()ed child (e.g. a DataLoader worker) inherits the
    // map but not the worker threads, so it builds its own pools instead of waiting forever.
    type Pools = HashMap<(u32, usize), Arc<rayon::ThreadPool>>;
    static POOLS: OnceLock<Mutex<Pools>> = OnceLock::new();
    // available_parallelism() reads cgroup files: once per process, not per call.
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    let threads = if threads == 0 {
        *DEFAULT.get_or_init(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    } else {
        threads
    };
    let mut pools = POOLS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = (std::process::id(), threads);
    if let Some(p) = pools.get(&key) {
        return Ok(p.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("gmtier-adam-{threads}-{i}"))
        .build()
        .map_err(|e| AdamError::Invalid(format!("cannot start {threads} threads: {e}")))?;
    let pool = Arc::new(pool);
    if pools.keys().any(|(pid, _)| *pid != key.0) {
        // Pools of the parent process: their threads do not exist here; never drop them (that
        // would wait for those threads).
        let stale: Vec<_> = pools
            .keys()
            .filter(|(pid, _)| *pid != key.0)
            .cloned()
            .collect();
        for k in stale {
            std::mem::forget(pools.remove(&k));
        }
    }
    pools.insert(key, pool.clone());
    Ok(pool)
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
    unsafe fn chunk_stats(&self, simd: Simd, off: usize) -> (f64, bool) {
        let n = STATS_CHUNK.min(self.numel - off);
        let size = match self.dtype {
            GradDtype::F32 => 4,
            _ => 2,
        };
        stats_chunk(simd, self.ptr.add(off * size), self.dtype, n)
    }
}

/// Work list of (tensor index, element offset, length) chunks over tensors of sizes `sizes`.
fn chunk_starts(sizes: impl Iterator<Item = usize>, chunk: usize) -> Vec<usize> {
    // prefix[i] = index of the first chunk of tensor i; prefix[last] = total chunks
    let mut prefix = vec![0usize];
    for n in sizes {
        let last = *prefix.last().unwrap();
        prefix.push(last + n.div_ceil(chunk));
    }
    prefix
}

fn locate(prefix: &[usize], chunk: usize, chunk_len: usize) -> (usize, usize) {
    // the tensor whose chunk range holds `chunk` (skips empty tensors)
    let t = prefix.partition_point(|&start| start <= chunk) - 1;
    (t, (chunk - prefix[t]) * chunk_len)
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

fn grad_stats_in_pool(grads: &[RawGrad], simd: Simd, parallel: bool) -> (f64, bool) {
    let prefix = chunk_starts(grads.iter().map(|g| g.numel), STATS_CHUNK);
    let total = *prefix.last().unwrap();
    let one = |ci: usize| {
        let (t, off) = locate(&prefix, ci, STATS_CHUNK);
        // SAFETY: the caller vouches for the pointers; the chunk lies within the tensor.
        unsafe { grads[t].chunk_stats(simd, off) }
    };
    let add = |a: (f64, bool), b: (f64, bool)| (a.0 + b.0, a.1 || b.1);
    if parallel {
        (0..total)
            .into_par_iter()
            .map(one)
            .reduce(|| (0.0, false), add)
    } else {
        (0..total).map(one).fold((0.0, false), add)
    }
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
    if group_ends.windows(2).any(|w| w[0] > w[1])
        || group_ends.last().copied().unwrap_or(0) != params.len()
    {
        return Err(AdamError::Invalid(format!(
            "group ends {group_ends:?} must rise to the number of tensors ({})",
            params.len()
        )));
    }
    check_pointers(params)?;
    let pool = thread_pool(threads)?;
    let parallel = params.iter().map(|p| p.numel).sum::<usize>() > INLINE_MAX;
    let run = || {
        let mut group_of = Vec::with_capacity(params.len());
        let mut start = 0;
        for (g, &end) in group_ends.iter().enumerate() {
            group_of.extend(std::iter::repeat_n(g, end - start));
            start = end;
        }
        let mut skipped = vec![false; group_ends.len()];
        if cfg.check_finite {
            let grads: Vec<RawGrad> = params.iter().map(RawParam::grad).collect();
            for (t, bad) in nonfinite_per_tensor(&grads, simd, parallel)
                .into_iter()
                .enumerate()
            {
                skipped[group_of[t]] |= bad;
            }
        }
        let live: Vec<RawParam> = params
            .iter()
            .zip(&group_of)
            .filter(|(_, &g)| !skipped[g])
            .map(|(p, _)| *p)
            .collect();
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

fn check_pointers(params: &[RawParam]) -> Result<(), AdamError> {
    for (i, p) in params.iter().enumerate() {
        if p.numel > 0
            && (p.master.is_null()
                || p.exp_avg.is_null()
                || p.exp_avg_sq.is_null()
                || p.grad.is_null())
        {
            return Err(AdamError::Invalid(format!("tensor {i}: null pointer")));
        }
        if p.step.is_null() {
            return Err(AdamError::Invalid(format!("tensor {i}: null step pointer")));
        }
    }
    Ok(())
}

unsafe fn step_in_pool(
    params: &[RawParam],
    cfg: &AdamConfig,
    simd: Simd,
    parallel: bool,
) -> Result<StepOutcome, AdamError> {
    check_pointers(params)?;
    if cfg.check_finite {
        let grads: Vec<RawGrad> = params.iter().map(RawParam::grad).collect();
        if !nonfinite_in_pool(&grads, simd, parallel) {
            // all finite: fall through
        } else {
            return Ok(StepOutcome {
                skipped: true,
                simd,
            });
        }
    }
    // Distinct step counters, each incremented once.
    let bytes: usize = params
        .iter()
        .map(|p| {
            let g = if p.grad_dtype == GradDtype::F32 { 4 } else { 2 };
            let h = if p.half.is_null() { 0 } else { 2 };
            p.numel * (24 + g + h)
        })
        .sum();
    let stream = stream_policy(bytes);
    let mut steps: Vec<(*mut i64, i64)> = Vec::new();
    let mut coefs = Vec::with_capacity(params.len());
    for p in params {
        let new = match steps.iter().find(|(ptr, _)| *ptr == p.step) {
            Some(&(_, s)) => s,
            None => {
                let s = p.step.read().saturating_add(1).max(1);
                steps.push((p.step, s));
                s
            }
        };
        let mut c = Coefs::new(cfg, new);
        c.stream = stream;
        coefs.push(c);
    }
    let chunk = chunk_len();
    let prefix = chunk_starts(params.iter().map(|p| p.numel), chunk);
    let total = *prefix.last().unwrap();
    let one = |ci: usize| {
        let (t, off) = locate(&prefix, ci, chunk);
        let p = &params[t];
        let n = chunk.min(p.numel - off);
        // SAFETY: the caller vouches for the pointers; chunks are disjoint; simd is available.
        unsafe { run_chunk(simd, &coefs[t], p, off, n) };
    };
    if parallel {
        (0..total).into_par_iter().for_each(one);
    } else {
        (0..total).for_each(one);
    }
    for (ptr, s) in steps {
        ptr.write(s);
    }
    Ok(StepOutcome {
        skipped: false,
        simd,
    })
}

/// Whether any gradient element is inf/NaN (the skip check: a read of the gradients only).
fn nonfinite_in_pool(grads: &[RawGrad], simd: Simd, parallel: bool) -> bool {
    grad_stats_in_pool(grads, simd, parallel).1
}

/// Whether each gradient holds an inf/NaN element, in one scan over all of them.
fn nonfinite_per_tensor(grads: &[RawGrad], simd: Simd, parallel: bool) -> Vec<bool> {
    let prefix = chunk_starts(grads.iter().map(|g| g.numel), STATS_CHUNK);
    let total = *prefix.last().unwrap();
    let one = |ci: usize| {
        let (t, off) = locate(&prefix, ci, STATS_CHUNK);
        // SAFETY: the caller vouches for the pointers; the chunk lies within the tensor.
        (t, unsafe { grads[t].chunk_stats(simd, off) }.1)
    };
    let found: Vec<(usize, bool)> = if parallel {
        (0..total).into_par_iter().map(one).collect()
    } else {
        (0..total).map(one).collect()
    };
    let mut bad = vec![false; grads.len()];
    for (t, b) in found {
        bad[t] |= b;
    }
    bad
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

type JobResult = Option<Result<StepOutcome, AdamError>>;

/// A step running on the thread pool; [`AdamJob::wait`] returns its outcome.
pub struct AdamJob {
    state: Arc<(Mutex<JobResult>, Condvar)>,
}

impl AdamJob {
    /// Block until the step finished; returns its outcome (every call returns the same).
    pub fn wait(&self) -> Result<StepOutcome, AdamError> {
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        while g.is_none() {
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.clone().unwrap()
    }

    /// Whether the step finished.
    pub fn is_done(&self) -> bool {
        self.state
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// Start [`adamw_step_raw`] on the thread pool and return at once.
///
/// # Safety
/// As [`adamw_step_raw`], until [`AdamJob::wait`] returned (or `is_done()` is true): the caller
/// must keep every array alive and untouched until then.
pub unsafe fn adamw_step_raw_async(
    params: Vec<RawParam>,
    cfg: AdamConfig,
    simd: Option<Simd>,
    threads: usize,
) -> AdamJob {
    let state: Arc<(Mutex<JobResult>, Condvar)> = Arc::new((Mutex::new(None), Condvar::new()));
    let job = AdamJob {
        state: state.clone(),
    };
    let finish = move |r: Result<StepOutcome, AdamError>| {
        let (lock, cv) = &*state;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        cv.notify_all();
    };
    let prepared = cfg
        .validate()
        .and_then(|_| Simd::resolve(simd))
        .and_then(|s| thread_pool(threads).map(|p| (s, p)));
    match prepared {
        Err(e) => finish(Err(e)),
        Ok((simd, pool)) => pool.spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: the caller of adamw_step_raw_async vouches for the pointers.
                unsafe { step_in_pool(&params, &cfg, simd, true) }
            }));
            finish(r.unwrap_or_else(|e| {
                let msg = e
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| e.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(AdamError::Panicked(msg))
            }))
        }),
    }
    job
}
