//! Choosing and running a kernel: the SIMD path, the per-tensor coefficients, the store
//! policy, and the dispatch of one chunk to the monomorphized kernel of a backend.

#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use super::{scalar, AdamConfig, AdamError, RawParam};
use std::sync::OnceLock;

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

/// Per-element coefficients of one tensor's update, in fp32 as the kernels use them.
///
/// The operation order is torch's fused CPU AdamW (`FusedAdamKernel.cpp`), so that the result
/// agrees with it to the last bit in almost every element:
/// `p *= decay; m = fma(lerp_coeff, g - m, lerp_small ? m : g)` (that is `m.lerp_(g, 1 - beta1)`);
/// `v = fma(omb2 * g, g, v * beta2); denom = sqrt(v) / bc2_sqrt + eps; p += (neg_step_size * m) / denom`.
/// The compact kernel's last line is the same update with one division instead of two:
/// `p += (neg_step_bc2 * m) / (sqrt(v) + eps_bc2)` (both scaled by `bc2_sqrt`).
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
    /// `neg_step_size * bc2_sqrt` and `eps * bc2_sqrt`, rounded once from double (compact kernel).
    pub neg_step_bc2: f32,
    pub eps_bc2: f32,
    /// Store policy: [`STREAM_NONE`], [`STREAM_HALF`] or [`STREAM_ALL`].
    pub stream: u8,
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

/// Calls touching at least this many bytes use streaming stores under the `auto` policy
/// (well above the last-level caches, whose contents would otherwise be reused).
pub const STREAM_MIN_BYTES: usize = 64 << 20;

/// Which outputs of a step use non-temporal (streaming) stores, which bypass the caches: a
/// win where the arrays are far larger than the last-level cache and are not read again soon,
/// a loss where they are. Part of [`AdamConfig`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StorePolicy {
    /// Streaming stores for the half copy when a call touches at least [`STREAM_MIN_BYTES`]
    /// (the half copy is write-only, so they save its read-for-ownership); regular ones below.
    #[default]
    Auto,
    /// Regular stores for every output.
    Regular,
    /// Streaming stores for the half copy.
    StreamHalf,
    /// Streaming stores for every output (master weight, moments, half copy).
    StreamAll,
}

impl StorePolicy {
    /// Parse `"auto"`, `"none"` (regular stores), `"half"` or `"all"`.
    pub fn parse(s: &str) -> Result<StorePolicy, AdamError> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(StorePolicy::Auto),
            "none" | "regular" => Ok(StorePolicy::Regular),
            "half" => Ok(StorePolicy::StreamHalf),
            "all" => Ok(StorePolicy::StreamAll),
            other => Err(AdamError::Invalid(format!(
                "unknown store policy {other:?}: expected \"auto\", \"none\", \"half\" or \"all\""
            ))),
        }
    }

    /// The kernels' store tag for a call that touches `bytes` bytes.
    pub(crate) fn for_call(self, bytes: usize) -> u8 {
        match self {
            StorePolicy::Auto if bytes >= STREAM_MIN_BYTES => STREAM_HALF,
            StorePolicy::Auto | StorePolicy::Regular => STREAM_NONE,
            StorePolicy::StreamHalf => STREAM_HALF,
            StorePolicy::StreamAll => STREAM_ALL,
        }
    }
}

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
            neg_step_bc2: (-(cfg.lr / bc1) * bc2.sqrt()) as f32,
            eps_bc2: (cfg.eps * bc2.sqrt()) as f32,
            stream: STREAM_NONE,
        }
    }
}

/// Update `n` elements starting at element `off` of `p` with path `simd`.
///
/// # Safety
/// `p`'s pointers must be valid for elements `off..off + n`, and `simd` available.
pub(super) unsafe fn run_chunk(simd: Simd, c: &Coefs, p: &RawParam, off: usize, n: usize) {
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
pub(super) unsafe fn stats_chunk(
    simd: Simd,
    g: *const u8,
    dtype: GradDtype,
    n: usize,
) -> (f64, bool) {
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
