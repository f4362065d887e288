//! AVX-512 (F + BW + VL) AdamW kernel: 16 lanes, unrolled 4x, masked tails.

use core::arch::x86_64::*;

use super::dispatch::{Coefs, GradDtype};

use super::dispatch::{G_BF16, G_F16, G_F32, H_BF16, H_NONE, STREAM_ALL, STREAM_NONE};

#[derive(Clone, Copy)]
pub(crate) struct V {
    pub(crate) gscale: __m512,
    pub(crate) decay: __m512,
    pub(crate) lerp_coeff: __m512,
    pub(crate) lerp_small: bool,
    pub(crate) beta2: __m512,
    pub(crate) omb2: __m512,
    pub(crate) neg_step_size: __m512,
    pub(crate) bc2_sqrt: __m512,
    pub(crate) eps: __m512,
    pub(crate) neg_step_bc2: __m512,
    pub(crate) eps_bc2: __m512,
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn splat(c: &Coefs) -> V {
    V {
        gscale: _mm512_set1_ps(c.gscale),
        decay: _mm512_set1_ps(c.decay),
        lerp_coeff: _mm512_set1_ps(c.lerp_coeff),
        lerp_small: c.lerp_small,
        beta2: _mm512_set1_ps(c.beta2),
        omb2: _mm512_set1_ps(c.omb2),
        neg_step_size: _mm512_set1_ps(c.neg_step_size),
        bc2_sqrt: _mm512_set1_ps(c.bc2_sqrt),
        eps: _mm512_set1_ps(c.eps),
        neg_step_bc2: _mm512_set1_ps(c.neg_step_bc2),
        eps_bc2: _mm512_set1_ps(c.eps_bc2),
    }
}

/// 16 gradient elements at `i` as fp32 (all 16, or those of mask `k`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn load_grad<const G: u8>(g: *const u8, i: usize, k: __mmask16) -> __m512 {
    if G == G_F32 {
        _mm512_maskz_loadu_ps(k, (g as *const f32).add(i))
    } else {
        let raw = _mm256_maskz_loadu_epi16(k, (g as *const u16).add(i) as *const i16);
        if G == G_BF16 {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
        } else {
            _mm512_cvtph_ps(raw)
        }
    }
}

/// fp32 -> bf16, round to nearest even, NaN -> 0x7FC0.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn to_bf16(x: __m512) -> __m256i {
    let bits = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    let r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
    _mm512_cvtepi32_epi16(r)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn body<const G: u8, const H: u8, const S: u8>(
    c: &V,
    p: *mut f32,
    m: *mut f32,
    v: *mut f32,
    g: *const u8,
    h: *mut u16,
    i: usize,
    k: __mmask16,
) {
    let grad = _mm512_mul_ps(load_grad::<G>(g, i, k), c.gscale);
    let pv = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), c.decay);
    let mv = _mm512_maskz_loadu_ps(k, m.add(i));
    let base = if c.lerp_small { mv } else { grad };
    let mv = _mm512_fmadd_ps(c.lerp_coeff, _mm512_sub_ps(grad, mv), base);
    // torch's `v * beta2 + (omb2 * g) * g`, contracted to one FMA as its build does
    let vv = _mm512_fmadd_ps(
        _mm512_mul_ps(c.omb2, grad),
        grad,
        _mm512_mul_ps(_mm512_maskz_loadu_ps(k, v.add(i)), c.beta2),
    );
    let denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), c.bc2_sqrt), c.eps);
    let pv = _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(c.neg_step_size, mv), denom));
    if S == STREAM_ALL {
        // full vectors at 64-byte aligned addresses (checked by `step`)
        _mm512_stream_ps(p.add(i), pv);
        _mm512_stream_ps(m.add(i), mv);
        _mm512_stream_ps(v.add(i), vv);
    } else {
        _mm512_mask_storeu_ps(p.add(i), k, pv);
        _mm512_mask_storeu_ps(m.add(i), k, mv);
        _mm512_mask_storeu_ps(v.add(i), k, vv);
    }
    if H != H_NONE {
        let hv = if H == H_BF16 {
            to_bf16(pv)
        } else {
            _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(pv)
        };
        if S == STREAM_NONE {
            _mm256_mask_storeu_epi16(h.add(i) as *mut i16, k, hv);
        } else {
            _mm256_stream_si256(h.add(i) as *mut __m256i, hv);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn run<const G: u8, const H: u8, const S: u8>(
    c: &Coefs,
    p: *mut f32,
    m: *mut f32,
    v: *mut f32,
    g: *const u8,
    h: *mut u16,
    n: usize,
) {
    let c = splat(c);
    let all: __mmask16 = 0xFFFF;
    let mut i = 0;
    while i + 64 <= n {
        body::<G, H, S>(&c, p, m, v, g, h, i, all);
        body::<G, H, S>(&c, p, m, v, g, h, i + 16, all);
        body::<G, H, S>(&c, p, m, v, g, h, i + 32, all);
        body::<G, H, S>(&c, p, m, v, g, h, i + 48, all);
        i += 64;
    }
    while i + 16 <= n {
        body::<G, H, S>(&c, p, m, v, g, h, i, all);
        i += 16;
    }
    if i < n {
        let k: __mmask16 = ((1u32 << (n - i)) - 1) as __mmask16;
        body::<G, H, STREAM_NONE>(&c, p, m, v, g, h, i, k);
    }
    if S != STREAM_NONE {
        _mm_sfence();
    }
}

kernel!(Avx512, 64);

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn stats<const G: u8>(g: *const u8, n: usize) -> (f64, bool) {
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut maxbits = _mm512_setzero_si512();
    let absmask = _mm512_set1_epi32(0x7FFF_FFFF);
    let mut i = 0;
    let all: __mmask16 = 0xFFFF;
    while i + 64 <= n {
        for (u, a) in acc.iter_mut().enumerate() {
            let x = load_grad::<G>(g, i + 16 * u, all);
            *a = _mm512_fmadd_ps(x, x, *a);
            maxbits = _mm512_max_epu32(maxbits, _mm512_and_si512(_mm512_castps_si512(x), absmask));
        }
        i += 64;
    }
    while i < n {
        let k: __mmask16 = if n - i >= 16 {
            all
        } else {
            ((1u32 << (n - i)) - 1) as __mmask16
        };
        let x = load_grad::<G>(g, i, k);
        acc[0] = _mm512_fmadd_ps(x, x, acc[0]);
        maxbits = _mm512_max_epu32(maxbits, _mm512_and_si512(_mm512_castps_si512(x), absmask));
        i += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(sum));
    let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
        _mm512_castps_pd(sum),
    )));
    let s = _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
    let mx = _mm512_reduce_max_epu32(maxbits);
    (s, mx >= 0x7F80_0000)
}

/// Sum of squares (f64) and whether any element is inf/NaN.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; `g` valid for `n` elements of `dtype`.
pub(crate) unsafe fn grad_stats(g: *const u8, dtype: GradDtype, n: usize) -> (f64, bool) {
    match dtype {
        GradDtype::F32 => stats::<G_F32>(g, n),
        GradDtype::Bf16 => stats::<G_BF16>(g, n),
        GradDtype::F16 => stats::<G_F16>(g, n),
    }
}
