//! AVX2 + FMA + F16C AdamW kernel: 8 lanes, unrolled 4x; the tail goes through stack buffers so
//! it runs the same vector code.

use core::arch::x86_64::*;

use super::dispatch::{Coefs, GradDtype};

use super::dispatch::{G_BF16, G_F16, G_F32, H_BF16, H_NONE, STREAM_ALL, STREAM_NONE};

#[derive(Clone, Copy)]
pub(crate) struct V {
    pub(crate) gscale: __m256,
    pub(crate) decay: __m256,
    pub(crate) lerp_coeff: __m256,
    pub(crate) lerp_small: bool,
    pub(crate) beta2: __m256,
    pub(crate) omb2: __m256,
    pub(crate) neg_step_size: __m256,
    pub(crate) bc2_sqrt: __m256,
    pub(crate) eps: __m256,
    pub(crate) neg_step_bc2: __m256,
    pub(crate) eps_bc2: __m256,
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn splat(c: &Coefs) -> V {
    V {
        gscale: _mm256_set1_ps(c.gscale),
        decay: _mm256_set1_ps(c.decay),
        lerp_coeff: _mm256_set1_ps(c.lerp_coeff),
        lerp_small: c.lerp_small,
        beta2: _mm256_set1_ps(c.beta2),
        omb2: _mm256_set1_ps(c.omb2),
        neg_step_size: _mm256_set1_ps(c.neg_step_size),
        bc2_sqrt: _mm256_set1_ps(c.bc2_sqrt),
        eps: _mm256_set1_ps(c.eps),
        neg_step_bc2: _mm256_set1_ps(c.neg_step_bc2),
        eps_bc2: _mm256_set1_ps(c.eps_bc2),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn load_grad<const G: u8>(g: *const u8, i: usize) -> __m256 {
    if G == G_F32 {
        _mm256_loadu_ps((g as *const f32).add(i))
    } else {
        let raw = _mm_loadu_si128((g as *const u16).add(i) as *const __m128i);
        if G == G_BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
        } else {
            _mm256_cvtph_ps(raw)
        }
    }
}

/// fp32 -> bf16, round to nearest even, NaN -> 0x7FC0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn to_bf16(x: __m256) -> __m128i {
    let bits = _mm256_castps_si256(x);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
    let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
    let r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r))
}

#[target_feature(enable = "avx2,fma,f16c")]
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
) {
    let grad = _mm256_mul_ps(load_grad::<G>(g, i), c.gscale);
    let pv = _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), c.decay);
    let mv = _mm256_loadu_ps(m.add(i));
    let base = if c.lerp_small { mv } else { grad };
    let mv = _mm256_fmadd_ps(c.lerp_coeff, _mm256_sub_ps(grad, mv), base);
    // torch's `v * beta2 + (omb2 * g) * g`, contracted to one FMA as its build does
    let vv = _mm256_fmadd_ps(
        _mm256_mul_ps(c.omb2, grad),
        grad,
        _mm256_mul_ps(_mm256_loadu_ps(v.add(i)), c.beta2),
    );
    let denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vv), c.bc2_sqrt), c.eps);
    let pv = _mm256_add_ps(pv, _mm256_div_ps(_mm256_mul_ps(c.neg_step_size, mv), denom));
    if S == STREAM_ALL {
        // 32-byte aligned addresses (checked by `step`)
        _mm256_stream_ps(p.add(i), pv);
        _mm256_stream_ps(m.add(i), mv);
        _mm256_stream_ps(v.add(i), vv);
    } else {
        _mm256_storeu_ps(p.add(i), pv);
        _mm256_storeu_ps(m.add(i), mv);
        _mm256_storeu_ps(v.add(i), vv);
    }
    if H != H_NONE {
        let hv = if H == H_BF16 {
            to_bf16(pv)
        } else {
            _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(pv)
        };
        if S == STREAM_NONE {
            _mm_storeu_si128(h.add(i) as *mut __m128i, hv);
        } else {
            _mm_stream_si128(h.add(i) as *mut __m128i, hv);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
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
    let mut i = 0;
    while i + 32 <= n {
        body::<G, H, S>(&c, p, m, v, g, h, i);
        body::<G, H, S>(&c, p, m, v, g, h, i + 8);
        body::<G, H, S>(&c, p, m, v, g, h, i + 16);
        body::<G, H, S>(&c, p, m, v, g, h, i + 24);
        i += 32;
    }
    while i + 8 <= n {
        body::<G, H, S>(&c, p, m, v, g, h, i);
        i += 8;
    }
    if S != STREAM_NONE {
        _mm_sfence();
    }
    let r = n - i;
    if r > 0 {
        // Tail: copy to 8-element buffers, run the same vector code, copy back.
        let mut pb = [0f32; 8];
        let mut mb = [0f32; 8];
        let mut vb = [0f32; 8];
        let mut gb = [0u32; 8]; // room for 8 fp32 or 8 half elements
        let mut hb = [0u16; 8];
        let gsize = if G == G_F32 { 4 } else { 2 };
        core::ptr::copy_nonoverlapping(p.add(i), pb.as_mut_ptr(), r);
        core::ptr::copy_nonoverlapping(m.add(i), mb.as_mut_ptr(), r);
        core::ptr::copy_nonoverlapping(v.add(i), vb.as_mut_ptr(), r);
        core::ptr::copy_nonoverlapping(g.add(i * gsize), gb.as_mut_ptr() as *mut u8, r * gsize);
        body::<G, H, STREAM_NONE>(
            &c,
            pb.as_mut_ptr(),
            mb.as_mut_ptr(),
            vb.as_mut_ptr(),
            gb.as_ptr() as *const u8,
            hb.as_mut_ptr(),
            0,
        );
        core::ptr::copy_nonoverlapping(pb.as_ptr(), p.add(i), r);
        core::ptr::copy_nonoverlapping(mb.as_ptr(), m.add(i), r);
        core::ptr::copy_nonoverlapping(vb.as_ptr(), v.add(i), r);
        if H != H_NONE {
            core::ptr::copy_nonoverlapping(hb.as_ptr(), h.add(i), r);
        }
    }
}

kernel!(Avx2, 32);

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn stats<const G: u8>(g: *const u8, n: usize) -> (f64, bool) {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut maxbits = _mm256_setzero_si256();
    let absmask = _mm256_set1_epi32(0x7FFF_FFFF);
    let mut i = 0;
    while i + 32 <= n {
        for (u, a) in acc.iter_mut().enumerate() {
            let x = load_grad::<G>(g, i + 8 * u);
            *a = _mm256_fmadd_ps(x, x, *a);
            maxbits = _mm256_max_epu32(maxbits, _mm256_and_si256(_mm256_castps_si256(x), absmask));
        }
        i += 32;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut bits = [0u32; 8];
    _mm256_storeu_si256(bits.as_mut_ptr() as *mut __m256i, maxbits);
    let mut s: f64 = lanes.iter().map(|&x| x as f64).sum();
    let mut nonfinite = bits.iter().any(|&b| b >= 0x7F80_0000);
    let (ts, tn) = super::scalar::grad_stats(
        g.add(i * if G == G_F32 { 4 } else { 2 }),
        match G {
            G_F32 => GradDtype::F32,
            G_BF16 => GradDtype::Bf16,
            _ => GradDtype::F16,
        },
        n - i,
    );
    s += ts;
    nonfinite |= tn;
    (s, nonfinite)
}

/// Sum of squares (f64) and whether any element is inf/NaN.
///
/// # Safety
/// The CPU has AVX2/FMA/F16C; `g` valid for `n` elements of `dtype`.
pub(crate) unsafe fn grad_stats(g: *const u8, dtype: GradDtype, n: usize) -> (f64, bool) {
    match dtype {
        GradDtype::F32 => stats::<G_F32>(g, n),
        GradDtype::Bf16 => stats::<G_BF16>(g, n),
        GradDtype::F16 => stats::<G_F16>(g, n),
    }
}
