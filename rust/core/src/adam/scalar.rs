//! Portable AdamW kernel (any target): the reference the SIMD paths must agree with.

use super::convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use super::dispatch::{Coefs, GradDtype, HalfDtype};

#[inline]
unsafe fn load_grad(g: *const u8, dtype: GradDtype, i: usize) -> f32 {
    match dtype {
        GradDtype::F32 => (g as *const f32).add(i).read_unaligned(),
        GradDtype::Bf16 => bf16_to_f32((g as *const u16).add(i).read_unaligned()),
        GradDtype::F16 => f16_to_f32((g as *const u16).add(i).read_unaligned()),
    }
}

/// Update `n` elements.
///
/// # Safety
/// Every non-null pointer valid for `n` elements; `h` may be null (no half copy).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn step(
    c: &Coefs,
    p: *mut f32,
    m: *mut f32,
    v: *mut f32,
    g: *const u8,
    gd: GradDtype,
    h: *mut u16,
    hd: HalfDtype,
    n: usize,
) {
    for i in 0..n {
        let grad = load_grad(g, gd, i) * c.gscale;
        let pi = p.add(i).read_unaligned() * c.decay;
        let mi = m.add(i).read_unaligned();
        let base = if c.lerp_small { mi } else { grad };
        let mi = c.lerp_coeff.mul_add(grad - mi, base);
        // torch's `v * beta2 + (omb2 * g) * g`, contracted to one FMA as its build does
        let vi = (c.omb2 * grad).mul_add(grad, v.add(i).read_unaligned() * c.beta2);
        let denom = vi.sqrt() / c.bc2_sqrt + c.eps;
        let pi = pi + (c.neg_step_size * mi) / denom;
        p.add(i).write_unaligned(pi);
        m.add(i).write_unaligned(mi);
        v.add(i).write_unaligned(vi);
        if !h.is_null() {
            let half = match hd {
                HalfDtype::Bf16 => f32_to_bf16(pi),
                HalfDtype::F16 => f32_to_f16(pi),
            };
            h.add(i).write_unaligned(half);
        }
    }
}

/// Sum of squares (f64) and whether any element is inf/NaN.
///
/// # Safety
/// `g` valid for `n` elements of `dtype`.
pub(crate) unsafe fn grad_stats(g: *const u8, dtype: GradDtype, n: usize) -> (f64, bool) {
    let mut acc = [0f32; 4];
    let mut nonfinite = false;
    let mut i = 0;
    while i + 4 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let x = load_grad(g, dtype, i + k);
            nonfinite |= !x.is_finite();
            *a += x * x;
        }
        i += 4;
    }
    let mut s: f64 = acc.iter().map(|&a| a as f64).sum();
    while i < n {
        let x = load_grad(g, dtype, i);
        nonfinite |= !x.is_finite();
        s += (x * x) as f64;
        i += 1;
    }
    (s, nonfinite)
}
