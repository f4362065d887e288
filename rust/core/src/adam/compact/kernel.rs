//! One fused pass over a run of blocks: gradient in -> dequantize m, v -> AdamW in fp32 ->
//! stochastic rounding of the new bf16 weight -> requantize m, v with fresh absmax scales.
//!
//! The body is plain Rust written to auto-vectorize (no table lookups, integer max for the
//! absmax, branch-free selects), compiled three times: under AVX-512, under AVX2+FMA and
//! portable. Every operation is IEEE-exact (`mul_add` is a fused multiply-add on every path), so
//! the three paths give the same bits.

use super::quant::{decode_m, decode_v, encode_m, encode_v, sr_bf16, sr_bits_lo, sr_lane_keys};
use crate::adam::convert::bf16_to_f32;
use crate::adam::dispatch::{Coefs, GradDtype};
use crate::adam::Simd;

/// The largest block the kernel's stack buffers hold.
pub const MAX_BLOCK: usize = 2048;

const G_F32: u8 = 0;
const G_BF16: u8 = 1;
const G_F16: u8 = 2;

/// A run of whole blocks of one tensor (the last may be short), by raw pointers at its start.
#[derive(Clone, Copy)]
pub(super) struct Run {
    pub weight: *mut u16,
    pub m_codes: *mut u8,
    pub v_codes: *mut u8,
    pub m_scales: *mut f32,
    pub v_scales: *mut f32,
    pub grad: *const u8,
    pub grad_dtype: GradDtype,
    /// Elements in the run.
    pub n: usize,
    /// Index in the tensor of the run's first element (for the rounding RNG).
    pub first: u64,
    pub block: usize,
    /// The rounding RNG's key (`quant::sr_key`).
    pub key: u64,
}

/// IEEE half -> fp32 by integer arithmetic and selects (vectorizes; `half`'s does not here).
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let shifted = (h & 0x7FFF) << 13; // exponent + mantissa in fp32 position, exponent rebias below
    let exp = shifted & 0x0F80_0000;
    let rebiased = shifted + ((127 - 15) << 23);
    let mag = if exp == 0x0F80_0000 {
        // inf / NaN: exponent all ones
        f32::from_bits(rebiased + ((128 - 16) << 23))
    } else if exp == 0 {
        // zero / subnormal: renormalize by subtracting the implicit one
        f32::from_bits(rebiased + (1 << 23)) - f32::from_bits(113 << 23)
    } else {
        f32::from_bits(rebiased)
    };
    f32::from_bits(mag.to_bits() | sign)
}

#[inline(always)]
unsafe fn load_grad<const G: u8>(g: *const u8, i: usize) -> f32 {
    match G {
        G_F32 => (g as *const f32).add(i).read_unaligned(),
        G_BF16 => bf16_to_f32((g as *const u16).add(i).read_unaligned()),
        _ => f16_bits_to_f32((g as *const u16).add(i).read_unaligned()),
    }
}

/// One block of `n <= MAX_BLOCK` elements starting at element `first` of the tensor.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const G: u8>(
    c: &Coefs,
    w: &mut [u16],
    mq: &mut [u8],
    vq: &mut [u8],
    ms: &mut f32,
    vs: &mut f32,
    g: *const u8,
    first: u64,
    key: u64,
    bufs: &mut [[f32; MAX_BLOCK]; 2],
) {
    let n = w.len();
    let (mq, vq) = (&mut mq[..n], &mut vq[..n]);
    let (m_scale, v_scale) = (*ms, *vs);
    let (k1, k2) = sr_lane_keys(key, first);
    let lo = first as u32;
    let [mbuf, vbuf] = bufs;
    let (mbuf, vbuf) = (&mut mbuf[..n], &mut vbuf[..n]);
    // max of |m| and of v as fp32 bit patterns: an integer max of non-negative floats orders as
    // the values and vectorizes as a reduction (a float max with NaN rules does not)
    let (mut m_max, mut v_max) = (0u32, 0u32);
    for j in 0..n {
        let grad = load_grad::<G>(g, j) * c.gscale;
        let mi = decode_m(mq[j]) * m_scale;
        let vi = decode_v(vq[j]) * v_scale;
        // the fp32 path's operation order (see `dispatch::Coefs`)
        let pi = bf16_to_f32(w[j]) * c.decay;
        let base = if c.lerp_small { mi } else { grad };
        let mi = c.lerp_coeff.mul_add(grad - mi, base);
        let vi = (c.omb2 * grad).mul_add(grad, vi * c.beta2);
        let denom = vi.sqrt() / c.bc2_sqrt + c.eps;
        let pi = pi + (c.neg_step_size * mi) / denom;
        w[j] = sr_bf16(pi, sr_bits_lo(k1, k2, lo.wrapping_add(j as u32)));
        mbuf[j] = mi;
        vbuf[j] = vi;
        m_max = m_max.max(mi.to_bits() & 0x7FFF_FFFF);
        v_max = v_max.max(vi.to_bits() & 0x7FFF_FFFF);
    }
    let (m_new, v_new) = (f32::from_bits(m_max), f32::from_bits(v_max));
    // an all-zero block keeps scale 0 and codes 0 (multiplying by 0 instead of 1/0)
    let m_inv = if m_max == 0 { 0.0 } else { 1.0 / m_new };
    let v_inv = if v_max == 0 { 0.0 } else { 1.0 / v_new };
    for j in 0..n {
        mq[j] = encode_m(mbuf[j] * m_inv);
        vq[j] = encode_v(vbuf[j] * v_inv);
    }
    *ms = m_new;
    *vs = v_new;
}

#[inline(always)]
unsafe fn run_blocks<const G: u8>(c: &Coefs, r: &Run) {
    // The new moments of a block in fp32, requantized in a second pass once the block's absmax
    // is known: 16 KiB that stay in L1, zeroed once per run rather than per block.
    let mut bufs = [[0f32; MAX_BLOCK]; 2];
    let mut off = 0;
    let mut b = 0;
    while off < r.n {
        let n = r.block.min(r.n - off);
        block::<G>(
            c,
            std::slice::from_raw_parts_mut(r.weight.add(off), n),
            std::slice::from_raw_parts_mut(r.m_codes.add(off), n),
            std::slice::from_raw_parts_mut(r.v_codes.add(off), n),
            &mut *r.m_scales.add(b),
            &mut *r.v_scales.add(b),
            r.grad.add(off * if G == G_F32 { 4 } else { 2 }),
            r.first + off as u64,
            r.key,
            &mut bufs,
        );
        off += n;
        b += 1;
    }
}

#[inline(always)]
unsafe fn run_any(c: &Coefs, r: &Run) {
    match r.grad_dtype {
        GradDtype::F32 => run_blocks::<G_F32>(c, r),
        GradDtype::Bf16 => run_blocks::<G_BF16>(c, r),
        GradDtype::F16 => run_blocks::<G_F16>(c, r),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn run_avx512(c: &Coefs, r: &Run) {
    run_any(c, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(c: &Coefs, r: &Run) {
    run_any(c, r)
}

/// Update the run with path `simd`.
///
/// # Safety
/// The run's pointers valid for its elements and blocks, disjoint from other runs; `simd`
/// available; `r.block` a power of two <= [`MAX_BLOCK`]; `r.first` a multiple of it.
pub(super) unsafe fn run(simd: Simd, c: &Coefs, r: &Run) {
    match simd {
        Simd::Scalar => run_any(c, r),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => run_avx2(c, r),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => run_avx512(c, r),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("non-x86 SIMD paths are never resolved"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn f16_conversion_matches_half_for_every_value() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = super::f16_bits_to_f32(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} != {want}"
            );
        }
    }
}
