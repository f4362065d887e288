//! The compact AdamW pass in AVX2 + FMA + F16C intrinsics: 8 elements a vector; a block's last
//! `n % 8` elements go through zero-padded copies. The same operations in the same order as the
//! portable pass (`kernel::block`), so the same bits (see `avx512` for the steps computed
//! differently with the same result).

use core::arch::x86_64::*;

use super::kernel::{all_normal, Bufs, Run, G_BF16, G_F16, G_F32};
use super::quant::{self, sr_lane_keys};
use crate::adam::avx2::{load_grad, splat, V};
use crate::adam::dispatch::{Coefs, GradDtype};

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn ones(x: i32) -> __m256i {
    _mm256_set1_epi32(x)
}

/// `quant::decode_m` of the 8 codes in the low half of `codes` (see `avx512::decode_m`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_m(codes: __m128i) -> __m256 {
    let h = _mm_slli_epi16::<7>(_mm_cvtepi8_epi16(codes));
    _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16(0xBFFFu16 as i16)))
}

/// `quant::decode_v` of the 8 codes in the low half of `codes` (see `avx512::decode_v`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn decode_v(codes: __m128i) -> __m256 {
    let c = _mm256_cvtepu8_epi32(codes);
    let x = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32::<20>(c), ones(96 << 23)));
    let sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(ones(8), c));
    let fixed = _mm256_fmadd_ps(
        x,
        _mm256_set1_ps(2.0),
        _mm256_set1_ps(-1.0 / 1_073_741_824.0),
    );
    _mm256_blendv_ps(x, fixed, sub)
}

/// The rounding RNG of 8 lanes, shifted right 16 (see `avx512::sr_bits_hi`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn sr_bits_hi(lo: __m256i, k1: __m256i, k2: __m256i) -> __m256i {
    let (c1, c2) = (ones(0x7FEB_352D), ones(0x846C_A68Bu32 as i32));
    let mut x = _mm256_xor_si256(lo, k1);
    x = _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x));
    x = _mm256_mullo_epi32(x, c1);
    x = _mm256_xor_si256(x, _mm256_srli_epi32::<15>(x));
    x = _mm256_mullo_epi32(x, c2);
    _mm256_srli_epi32::<16>(_mm256_xor_si256(x, k2))
}

/// One vector of the fused pass: 8 elements at `w`, `mq`, `vq`, `g` (already offset), the new
/// m and v to `bufs` at `i`, folded into the absmaxes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn body<const G: u8>(
    c: &V,
    scales: (__m256, __m256),
    w: *mut u16,
    mq: *const u8,
    vq: *const u8,
    g: *const u8,
    rng: (__m256i, __m256i, __m256i),
    bufs: (*mut f32, *mut f32),
    max: &mut (__m256i, __m256i),
    min: &mut (__m256i, __m256i),
) {
    let grad = _mm256_mul_ps(load_grad::<G>(g, 0), c.gscale);
    let mi = _mm256_mul_ps(decode_m(_mm_loadl_epi64(mq as *const __m128i)), scales.0);
    let vi = _mm256_mul_ps(decode_v(_mm_loadl_epi64(vq as *const __m128i)), scales.1);
    let wraw = _mm_loadu_si128(w as *const __m128i);
    let pi = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(wraw)));
    let pi = _mm256_mul_ps(pi, c.decay);
    let base = if c.lerp_small { mi } else { grad };
    let mi = _mm256_fmadd_ps(c.lerp_coeff, _mm256_sub_ps(grad, mi), base);
    let vi = _mm256_fmadd_ps(
        _mm256_mul_ps(c.omb2, grad),
        grad,
        _mm256_mul_ps(vi, c.beta2),
    );
    let denom = _mm256_add_ps(_mm256_sqrt_ps(vi), c.eps_bc2);
    let pi = _mm256_add_ps(pi, _mm256_div_ps(_mm256_mul_ps(c.neg_step_bc2, mi), denom));
    let r = sr_bits_hi(rng.0, rng.1, rng.2);
    let wb = _mm256_srli_epi32::<16>(_mm256_add_epi32(_mm256_castps_si256(pi), r));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(pi, pi));
    let wb = _mm256_blendv_epi8(wb, ones(0x7FC0), nan);
    // 8 x u32 (each <= 0xFFFF) -> 8 x u16: the pack works per 128-bit lane, the permute joins
    let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(wb, wb));
    _mm_storeu_si128(w as *mut __m128i, _mm256_castsi256_si128(packed));
    _mm256_store_ps(bufs.0, mi);
    _mm256_store_ps(bufs.1, vi);
    let abs = ones(0x7FFF_FFFF);
    let (am, av) = (
        _mm256_and_si256(_mm256_castps_si256(mi), abs),
        _mm256_and_si256(_mm256_castps_si256(vi), abs),
    );
    max.0 = _mm256_max_epu32(max.0, am);
    max.1 = _mm256_max_epu32(max.1, av);
    min.0 = _mm256_min_epu32(min.0, am);
    min.1 = _mm256_min_epu32(min.1, av);
}

/// See `avx512::normal_code`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn normal_code<const OFFSET: i32>(a: __m256i) -> __m256i {
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<20>(a), ones(1));
    let add = ones(0x7FFFF - (OFFSET << 23));
    _mm256_srli_epi32::<20>(_mm256_add_epi32(_mm256_add_epi32(a, lsb), add))
}

/// The code of the subnormal range: `(a + magic).bits() - magic.bits()`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn subnormal_code(a: __m256i, magic: f32) -> __m256i {
    let magic = _mm256_set1_ps(magic);
    _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), magic)),
        _mm256_castps_si256(magic),
    )
}

/// `quant::encode_m` of 8 values.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn encode_m(x: __m256) -> __m256i {
    let bits = _mm256_castps_si256(x);
    let a = _mm256_and_si256(bits, ones(0x7FFF_FFFF));
    let normal = normal_code::<{ quant::M_EXP_OFFSET as i32 }>(a);
    let sub = subnormal_code(a, quant::M_MAGIC);
    // a and the bound are below 2^31: the signed compare orders them
    let small = _mm256_cmpgt_epi32(ones(quant::M_MIN_NORMAL.to_bits() as i32), a);
    let mag = _mm256_blendv_epi8(normal, sub, small);
    let mag = _mm256_min_epu32(mag, ones(quant::M_MAX_CODE as i32));
    // the sign where the magnitude survived and x is not NaN
    let zero = _mm256_cmpeq_epi32(mag, _mm256_setzero_si256());
    let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(x, x));
    let sign = _mm256_and_si256(_mm256_srli_epi32::<24>(bits), ones(0x80));
    let sign = _mm256_and_si256(sign, ordered);
    _mm256_or_si256(mag, _mm256_andnot_si256(zero, sign))
}

/// `quant::encode_v` of 8 values.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn encode_v(x: __m256) -> __m256i {
    let a = _mm256_and_si256(_mm256_castps_si256(x), ones(0x7FFF_FFFF));
    let normal = normal_code::<{ quant::V_EXP_OFFSET as i32 }>(a);
    let sub = subnormal_code(a, quant::V_MAGIC);
    let small = _mm256_cmpgt_epi32(ones(quant::V_MIN_NORMAL.to_bits() as i32), a);
    let mag = _mm256_blendv_epi8(normal, sub, small);
    _mm256_min_epu32(mag, ones(quant::V_MAX_CODE as i32))
}

/// `encode_m` where every `|x|` is known to be in [2^-14, 1 + 2^-23] (see
/// `avx512::encode_m_normal`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn encode_m_normal(x: __m256) -> __m256i {
    let t = normal_code::<{ quant::M_EXP_OFFSET as i32 }>(_mm256_castps_si256(x));
    let sign = _mm256_and_si256(_mm256_srli_epi32::<4>(t), ones(0x80));
    _mm256_or_si256(_mm256_and_si256(t, ones(0x7F)), sign)
}

/// `encode_v` where every `x` is known to be in [2^-30, 1 + 2^-23].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn encode_v_normal(x: __m256) -> __m256i {
    normal_code::<{ quant::V_EXP_OFFSET as i32 }>(_mm256_castps_si256(x))
}

/// The m and v codes of 8 elements, m's in the low 8 bytes, v's in the high 8.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn pack_codes(m: __m256i, v: __m256i) -> __m128i {
    // [m0-3 v0-3 | m4-7 v4-7] as u16, then u8 (twice over per lane): dwords 0, 4 are m's
    // quarters, 1, 5 v's
    let b = _mm256_packus_epi16(_mm256_packus_epi32(m, v), _mm256_setzero_si256());
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 3, 6, 7));
    _mm256_castsi256_si128(b)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn reduce_max(x: __m256i) -> u32 {
    let x = _mm_max_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256::<1>(x));
    let x = _mm_max_epu32(x, _mm_shuffle_epi32::<0b01_00_11_10>(x));
    let x = _mm_max_epu32(x, _mm_shuffle_epi32::<0b10_11_00_01>(x));
    _mm_cvtsi128_si32(x) as u32
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn reduce_min(x: __m256i) -> u32 {
    let x = _mm_min_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256::<1>(x));
    let x = _mm_min_epu32(x, _mm_shuffle_epi32::<0b01_00_11_10>(x));
    let x = _mm_min_epu32(x, _mm_shuffle_epi32::<0b10_11_00_01>(x));
    _mm_cvtsi128_si32(x) as u32
}

/// One block of `n <= MAX_BLOCK` elements at element `off` of the run (block `b`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block<const G: u8>(c: &V, r: &Run, off: usize, n: usize, b: usize, bufs: &mut Bufs) {
    let gsize = if G == G_F32 { 4 } else { 2 };
    let (w, mq, vq) = (r.weight.add(off), r.m_codes.add(off), r.v_codes.add(off));
    let g = r.grad.add(off * gsize);
    let (ms, vs) = (r.m_scales.add(b), r.v_scales.add(b));
    let first = r.first + off as u64;
    let (k1, k2) = sr_lane_keys(r.key, first);
    let (k1, k2) = (ones(k1 as i32), ones(k2 as i32));
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut lo = _mm256_add_epi32(ones(first as u32 as i32), lanes);
    let scales = (_mm256_set1_ps(*ms), _mm256_set1_ps(*vs));
    let (pm, pv) = (bufs.m.as_mut_ptr(), bufs.v.as_mut_ptr());
    let mut max = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut min = (ones(-1), ones(-1));
    let full = n & !7;
    let mut i = 0;
    while i < full {
        let (wi, mi, vi, gi) = (w.add(i), mq.add(i), vq.add(i), g.add(i * gsize));
        body::<G>(
            c,
            scales,
            wi,
            mi,
            vi,
            gi,
            (lo, k1, k2),
            (pm.add(i), pv.add(i)),
            &mut max,
            &mut min,
        );
        lo = _mm256_add_epi32(lo, ones(8));
        i += 8;
    }
    let rem = n - full;
    if rem > 0 {
        // zero-padded copies: zero codes, gradient and weight give m = v = 0 in the padding
        let (mut wt, mut mt, mut vt, mut gt) = ([0u16; 8], [0u8; 8], [0u8; 8], [0u8; 32]);
        std::ptr::copy_nonoverlapping(w.add(i), wt.as_mut_ptr(), rem);
        std::ptr::copy_nonoverlapping(mq.add(i), mt.as_mut_ptr(), rem);
        std::ptr::copy_nonoverlapping(vq.add(i), vt.as_mut_ptr(), rem);
        std::ptr::copy_nonoverlapping(g.add(i * gsize), gt.as_mut_ptr(), rem * gsize);
        let (wp, mp, vp, gp) = (wt.as_mut_ptr(), mt.as_ptr(), vt.as_ptr(), gt.as_ptr());
        // the padding's zeros are not the block's: the minimums of the real lanes only
        let mut tmin = (ones(-1), ones(-1));
        let bp = (pm.add(i), pv.add(i));
        body::<G>(
            c,
            scales,
            wp,
            mp,
            vp,
            gp,
            (lo, k1, k2),
            bp,
            &mut max,
            &mut tmin,
        );
        let real = _mm256_cmpgt_epi32(ones(rem as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        min.0 = _mm256_min_epu32(
            min.0,
            _mm256_or_si256(tmin.0, _mm256_andnot_si256(real, ones(-1))),
        );
        min.1 = _mm256_min_epu32(
            min.1,
            _mm256_or_si256(tmin.1, _mm256_andnot_si256(real, ones(-1))),
        );
        std::ptr::copy_nonoverlapping(wt.as_ptr(), w.add(i), rem);
    }
    let (m_max, v_max) = (reduce_max(max.0), reduce_max(max.1));
    let (m_new, v_new) = (f32::from_bits(m_max), f32::from_bits(v_max));
    let m_inv = if m_max == 0 { 0.0 } else { 1.0 / m_new };
    let v_inv = if v_max == 0 { 0.0 } else { 1.0 / v_new };
    let m_fast = all_normal(reduce_min(min.0), m_inv, quant::M_MIN_NORMAL);
    let v_fast = all_normal(reduce_min(min.1), v_inv, quant::V_MIN_NORMAL);
    let (m_inv, v_inv) = (_mm256_set1_ps(m_inv), _mm256_set1_ps(v_inv));
    let mut i = 0;
    while i < n {
        let x = _mm256_mul_ps(_mm256_load_ps(pm.add(i)), m_inv);
        let mc = if m_fast {
            encode_m_normal(x)
        } else {
            encode_m(x)
        };
        let x = _mm256_mul_ps(_mm256_load_ps(pv.add(i)), v_inv);
        let vc = if v_fast {
            encode_v_normal(x)
        } else {
            encode_v(x)
        };
        let codes = pack_codes(mc, vc);
        if i + 8 <= n {
            _mm_storel_epi64(mq.add(i) as *mut __m128i, codes);
            _mm_storel_epi64(vq.add(i) as *mut __m128i, _mm_unpackhi_epi64(codes, codes));
        } else {
            let mut t = [0u8; 16];
            _mm_storeu_si128(t.as_mut_ptr() as *mut __m128i, codes);
            std::ptr::copy_nonoverlapping(t.as_ptr(), mq.add(i), n - i);
            std::ptr::copy_nonoverlapping(t.as_ptr().add(8), vq.add(i), n - i);
        }
        i += 8;
    }
    *ms = m_new;
    *vs = v_new;
}

#[target_feature(enable = "avx2,fma,f16c")]
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
/// The CPU has AVX2, FMA and F16C; the run as `kernel::run` requires.
pub(super) unsafe fn run(c: &Coefs, r: &Run) {
    match r.grad_dtype {
        GradDtype::F32 => run_g::<G_F32>(c, r),
        GradDtype::Bf16 => run_g::<G_BF16>(c, r),
        GradDtype::F16 => run_g::<G_F16>(c, r),
    }
}
