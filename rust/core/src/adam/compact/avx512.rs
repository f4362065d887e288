//! The compact AdamW pass in AVX-512 (F + BW + VL) intrinsics: 16 elements a vector, masked
//! tails. The same operations in the same order as the portable pass (`kernel::block`), so the
//! same bits; where a step is computed differently (the maps' decoding through F16C and a masked
//! FMA, the hash's last xor-shift that the rounding does not see, the second pass's encoders
//! reduced to the normal codes' arithmetic where a block has no smaller magnitude), the result is
//! the same value.

use core::arch::x86_64::*;

use super::kernel::{all_normal, Bufs, Run, G_BF16, G_F16, G_F32};
use super::quant::{self, sr_lane_keys};
use crate::adam::avx512::{splat, V};
use crate::adam::dispatch::{Coefs, GradDtype};

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn ones(x: i32) -> __m512i {
    _mm512_set1_epi32(x)
}

/// 16 bf16 -> fp32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
fn bf16_to_f32(raw: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
}

/// 16 gradient elements at element `i` as fp32; `k`: the lanes to load (the rest are 0).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn load_grad<const G: u8, const TAIL: bool>(g: *const u8, i: usize, k: __mmask16) -> __m512 {
    if G == G_F32 {
        let p = (g as *const f32).add(i);
        if TAIL {
            _mm512_maskz_loadu_ps(k, p)
        } else {
            _mm512_loadu_ps(p)
        }
    } else {
        let p = (g as *const u16).add(i);
        let raw = if TAIL {
            _mm256_maskz_loadu_epi16(k, p as *const i16)
        } else {
            _mm256_loadu_si256(p as *const __m256i)
        };
        if G == G_BF16 {
            bf16_to_f32(raw)
        } else {
            // exact for every half; a signalling NaN comes out quiet, as the first multiply
            // makes it on the portable path
            _mm512_cvtph_ps(raw)
        }
    }
}

/// `quant::decode_m` of 16 codes: sign + E4M3 with bias 15 and subnormals is an IEEE half's
/// layout with a 3-bit mantissa, so the code shifted into a half's bits converts exactly.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn decode_m(codes: __m128i) -> __m512 {
    // sign-extended to 16 bits: `s<<15 | 0x7F80*s | mag`; << 7 puts mag in the half's exponent
    // and top mantissa bits, the sign at bit 15 and a stray copy at bit 14, cleared
    let h = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(codes));
    _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(0xBFFFu16 as i16)))
}

/// `quant::decode_v` of 16 codes: E5M3 with bias 31 as fp32 bits; codes 0..8 (subnormal) come
/// out as 2^-31 + c 2^-34 from the same formula, and 2 x - 2^-30 (one exact FMA) is c 2^-33.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn decode_v(codes: __m128i) -> __m512 {
    let c = _mm512_cvtepu8_epi32(codes);
    let x = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32::<20>(c), ones(96 << 23)));
    let sub = _mm512_testn_epi32_mask(c, ones(0xF8));
    _mm512_mask_fmadd_ps(
        x,
        sub,
        _mm512_set1_ps(2.0),
        _mm512_set1_ps(-1.0 / 1_073_741_824.0),
    )
}

/// The rounding RNG (`quant::sr_bits_lo`) of 16 lanes, shifted right 16 (what the rounding
/// uses: the hash's last `x ^ x >> 16` does not change the top half, so it is left out).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn sr_bits_hi(lo: __m512i, k1: __m512i, k2: __m512i) -> __m512i {
    let (c1, c2) = (ones(0x7FEB_352D), ones(0x846C_A68Bu32 as i32));
    let mut x = _mm512_xor_si512(lo, k1);
    x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
    x = _mm512_mullo_epi32(x, c1);
    x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
    x = _mm512_mullo_epi32(x, c2);
    _mm512_srli_epi32::<16>(_mm512_xor_si512(x, k2))
}

/// One vector of the fused pass at element `i` of the block: AdamW, the rounded weight
/// stored, the new m and v stored to the block's buffers and folded into the absmaxes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn body<const G: u8, const TAIL: bool>(
    c: &V,
    scales: (__m512, __m512),
    w: *mut u16,
    mq: *const u8,
    vq: *const u8,
    g: *const u8,
    i: usize,
    k: __mmask16,
    rng: (__m512i, __m512i, __m512i),
    bufs: (*mut f32, *mut f32),
    max: &mut (__m512i, __m512i),
    min: &mut (__m512i, __m512i),
) {
    let (wraw, mraw, vraw) = if TAIL {
        (
            _mm256_maskz_loadu_epi16(k, w.add(i) as *const i16),
            _mm_maskz_loadu_epi8(k, mq.add(i) as *const i8),
            _mm_maskz_loadu_epi8(k, vq.add(i) as *const i8),
        )
    } else {
        (
            _mm256_loadu_si256(w.add(i) as *const __m256i),
            _mm_loadu_si128(mq.add(i) as *const __m128i),
            _mm_loadu_si128(vq.add(i) as *const __m128i),
        )
    };
    let grad = _mm512_mul_ps(load_grad::<G, TAIL>(g, i, k), c.gscale);
    let mi = _mm512_mul_ps(decode_m(mraw), scales.0);
    let vi = _mm512_mul_ps(decode_v(vraw), scales.1);
    let pi = _mm512_mul_ps(bf16_to_f32(wraw), c.decay);
    let base = if c.lerp_small { mi } else { grad };
    let mi = _mm512_fmadd_ps(c.lerp_coeff, _mm512_sub_ps(grad, mi), base);
    let vi = _mm512_fmadd_ps(
        _mm512_mul_ps(c.omb2, grad),
        grad,
        _mm512_mul_ps(vi, c.beta2),
    );
    let denom = _mm512_add_ps(_mm512_sqrt_ps(vi), c.eps_bc2);
    let pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(c.neg_step_bc2, mi), denom));
    // stochastic rounding to bf16 (`quant::sr_bf16`)
    let r = sr_bits_hi(rng.0, rng.1, rng.2);
    let wb = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_castps_si512(pi), r));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(pi, pi);
    let wb = _mm512_mask_mov_epi32(wb, nan, ones(0x7FC0));
    if TAIL {
        _mm512_mask_cvtepi32_storeu_epi16(w.add(i) as *mut i16, k, wb);
    } else {
        _mm256_storeu_si256(w.add(i) as *mut __m256i, _mm512_cvtepi32_epi16(wb));
    }
    // masked-off lanes are 0 (zero codes, gradient and weight): no effect on the absmaxes
    _mm512_store_ps(bufs.0.add(i), mi);
    _mm512_store_ps(bufs.1.add(i), vi);
    let abs = ones(0x7FFF_FFFF);
    let (am, av) = (
        _mm512_and_si512(_mm512_castps_si512(mi), abs),
        _mm512_and_si512(_mm512_castps_si512(vi), abs),
    );
    max.0 = _mm512_max_epu32(max.0, am);
    max.1 = _mm512_max_epu32(max.1, av);
    // the smallest magnitudes, of the lanes in the block only
    min.0 = _mm512_mask_min_epu32(min.0, k, min.0, am);
    min.1 = _mm512_mask_min_epu32(min.1, k, min.1, av);
}

/// `quant::round_e_m3(a) - (offset << 3)` for `a >= offset + 1 << 23` (a normal code): the
/// offset folded into the rounding addend.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn normal_code<const OFFSET: i32>(a: __m512i) -> __m512i {
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<20>(a), ones(1));
    let add = ones(0x7FFFF - (OFFSET << 23));
    _mm512_srli_epi32::<20>(_mm512_add_epi32(_mm512_add_epi32(a, lsb), add))
}

/// `quant::encode_m` of 16 values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn encode_m(x: __m512) -> __m512i {
    let bits = _mm512_castps_si512(x);
    let a = _mm512_and_si512(bits, ones(0x7FFF_FFFF));
    let normal = normal_code::<{ quant::M_EXP_OFFSET as i32 }>(a);
    let magic = _mm512_set1_ps(quant::M_MAGIC);
    let sub = _mm512_sub_epi32(
        _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), magic)),
        _mm512_castps_si512(magic),
    );
    let small = _mm512_cmplt_epu32_mask(a, ones(quant::M_MIN_NORMAL.to_bits() as i32));
    let mag = _mm512_mask_blend_epi32(small, normal, sub);
    let mag = _mm512_min_epu32(mag, ones(quant::M_MAX_CODE as i32));
    // the sign (bit 31 >> 24) where the magnitude survived and x is not NaN
    let nz = _mm512_test_epi32_mask(mag, mag);
    let nz = _mm512_mask_cmp_ps_mask::<_CMP_ORD_Q>(nz, x, x);
    _mm512_mask_ternarylogic_epi32::<0xF8>(mag, nz, _mm512_srli_epi32::<24>(bits), ones(0x80))
}

/// `quant::encode_v` of 16 values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn encode_v(x: __m512) -> __m512i {
    let a = _mm512_and_si512(_mm512_castps_si512(x), ones(0x7FFF_FFFF));
    let normal = normal_code::<{ quant::V_EXP_OFFSET as i32 }>(a);
    let magic = _mm512_set1_ps(quant::V_MAGIC);
    let sub = _mm512_sub_epi32(
        _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), magic)),
        _mm512_castps_si512(magic),
    );
    let small = _mm512_cmplt_epu32_mask(a, ones(quant::V_MIN_NORMAL.to_bits() as i32));
    let mag = _mm512_mask_blend_epi32(small, normal, sub);
    _mm512_min_epu32(mag, ones(quant::V_MAX_CODE as i32))
}

/// `encode_m` where every `|x|` is known to be in [2^-14, 1 + 2^-23] (a normal code, at most
/// 120): the rounding on the signed bits leaves the sign at bit 11, moved to bit 7.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn encode_m_normal(x: __m512) -> __m512i {
    let t = normal_code::<{ quant::M_EXP_OFFSET as i32 }>(_mm512_castps_si512(x));
    // bit 7 from t >> 4 (the sign), bits 0..7 from t (the magnitude, < 128)
    _mm512_ternarylogic_epi32::<0xE4>(_mm512_srli_epi32::<4>(t), t, ones(0x80))
}

/// `encode_v` where every `x` is known to be in [2^-30, 1 + 2^-23].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn encode_v_normal(x: __m512) -> __m512i {
    normal_code::<{ quant::V_EXP_OFFSET as i32 }>(_mm512_castps_si512(x))
}

/// Store 16 codes (the lanes of `k` if `tail`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn store_codes(p: *mut u8, c: __m512i, tail: bool, k: __mmask16) {
    if tail {
        _mm512_mask_cvtepi32_storeu_epi8(p as *mut i8, k, c);
    } else {
        _mm_storeu_si128(p as *mut __m128i, _mm512_cvtepi32_epi8(c));
    }
}

/// One block of `n <= MAX_BLOCK` elements at element `off` of the run (block `b`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
#[inline]
unsafe fn block<const G: u8>(c: &V, r: &Run, off: usize, n: usize, b: usize, bufs: &mut Bufs) {
    let gsize = if G == G_F32 { 4 } else { 2 };
    let (w, mq, vq) = (r.weight.add(off), r.m_codes.add(off), r.v_codes.add(off));
    let g = r.grad.add(off * gsize);
    let (ms, vs) = (r.m_scales.add(b), r.v_scales.add(b));
    let first = r.first + off as u64;
    let (k1, k2) = sr_lane_keys(r.key, first);
    let (k1, k2) = (ones(k1 as i32), ones(k2 as i32));
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut lo = _mm512_add_epi32(ones(first as u32 as i32), lanes);
    let scales = (_mm512_set1_ps(*ms), _mm512_set1_ps(*vs));
    let pb = (bufs.m.as_mut_ptr(), bufs.v.as_mut_ptr());
    let mut max = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let mut min = (ones(-1), ones(-1));
    let full = n & !15;
    let mut i = 0;
    while i < full {
        body::<G, false>(
            c,
            scales,
            w,
            mq,
            vq,
            g,
            i,
            !0,
            (lo, k1, k2),
            pb,
            &mut max,
            &mut min,
        );
        lo = _mm512_add_epi32(lo, ones(16));
        i += 16;
    }
    let k: __mmask16 = (1u32 << (n - full)).wrapping_sub(1) as u16;
    if k != 0 {
        body::<G, true>(
            c,
            scales,
            w,
            mq,
            vq,
            g,
            i,
            k,
            (lo, k1, k2),
            pb,
            &mut max,
            &mut min,
        );
    }
    let (m_max, v_max) = (
        _mm512_reduce_max_epu32(max.0),
        _mm512_reduce_max_epu32(max.1),
    );
    let (m_new, v_new) = (f32::from_bits(m_max), f32::from_bits(v_max));
    // an all-zero block keeps scale 0 and codes 0 (multiplying by 0 instead of 1/0)
    let m_inv = if m_max == 0 { 0.0 } else { 1.0 / m_new };
    let v_inv = if v_max == 0 { 0.0 } else { 1.0 / v_new };
    let (m_min, v_min) = (
        _mm512_reduce_min_epu32(min.0),
        _mm512_reduce_min_epu32(min.1),
    );
    // the second pass: the general encoders, or (the common case: no magnitude below the
    // smallest normal code in the block) the normal codes' arithmetic alone
    let m_fast = all_normal(m_min, m_inv, quant::M_MIN_NORMAL);
    let v_fast = all_normal(v_min, v_inv, quant::V_MIN_NORMAL);
    let (m_inv, v_inv) = (_mm512_set1_ps(m_inv), _mm512_set1_ps(v_inv));
    let mut i = 0;
    while i < n {
        let x = _mm512_mul_ps(_mm512_load_ps(pb.0.add(i)), m_inv);
        let mc = if m_fast {
            encode_m_normal(x)
        } else {
            encode_m(x)
        };
        let x = _mm512_mul_ps(_mm512_load_ps(pb.1.add(i)), v_inv);
        let vc = if v_fast {
            encode_v_normal(x)
        } else {
            encode_v(x)
        };
        let tail = i + 16 > n;
        store_codes(mq.add(i), mc, tail, k);
        store_codes(vq.add(i), vc, tail, k);
        i += 16;
    }
    *ms = m_new;
    *vs = v_new;
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn run_g<const G: u8>(c: &Coefs, r: &Run) {
    let v = splat(c);
    let mut bufs = Bufs::new();
    let (mut off, mut b) = (0, 0);
    while off < r.n {
        let n = r.block.min(r.n - off);
        block::<G>(&v, r, off, n, b, &mut bufs);
        off += n;
        b += 1;
    }
}

/// Update the run.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL, AVX2, FMA and F16C; the run as `kernel::run` requires.
pub(super) unsafe fn run(c: &Coefs, r: &Run) {
    match r.grad_dtype {
        GradDtype::F32 => run_g::<G_F32>(c, r),
        GradDtype::Bf16 => run_g::<G_BF16>(c, r),
        GradDtype::F16 => run_g::<G_F16>(c, r),
    }
}
