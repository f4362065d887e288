//! One fused pass over a run of blocks: gradient in -> dequantize m, v -> AdamW in fp32 ->
//! stochastic rounding of the new bf16 weight -> requantize m, v with fresh absmax scales.
//!
//! This file's body is the portable path and the reference: plain Rust, one element at a time.
//! The SIMD paths (`avx512`, `avx2`) are intrinsics doing the same operations in the same order
//! on 16 or 8 elements at once. Every operation is IEEE-exact (`mul_add` is a fused
//! multiply-add on every path), so the three paths give the same bits.

use super::quant::{decode_m, decode_v, encode_m, encode_v, sr_bf16, sr_bits_lo, sr_lane_keys};
use crate::adam::convert::bf16_to_f32;
use crate::adam::dispatch::{Coefs, GradDtype};
use crate::adam::Simd;

/// The largest block the kernel's stack buffers hold.
pub const MAX_BLOCK: usize = 2048;

pub(super) const G_F32: u8 = 0;
pub(super) const G_BF16: u8 = 1;
pub(super) const G_F16: u8 = 2;

/// The new m and v of a block in fp32, requantized in a second pass once the block's absmax is
/// known: 16 KiB that stay in L1, zeroed once per run rather than per block.
#[repr(C, align(64))]
pub(super) struct Bufs {
    pub m: [f32; MAX_BLOCK],
    pub v: [f32; MAX_BLOCK],
}

impl Bufs {
    pub fn new() -> Bufs {
        Bufs {
            m: [0.0; MAX_BLOCK],
            v: [0.0; MAX_BLOCK],
        }
    }
}

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

/// Whether a block's values times `inv` are all normal codes (>= `min_normal`, <= 1 + 2^-23):
/// its smallest magnitude `min` times `inv` is (multiplying by a positive number is monotonic),
/// and `inv` = 1 / absmax is finite, so that the largest is at most 1 + 2^-23. A NaN in the
/// block makes the absmax NaN and `inv` NaN: no. (The SIMD paths' test.)
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn all_normal(min: u32, inv: f32, min_normal: f32) -> bool {
    inv.is_finite() && f32::from_bits(min) * inv >= min_normal
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
    bufs: &mut Bufs,
) {
    let n = w.len();
    let (mq, vq) = (&mut mq[..n], &mut vq[..n]);
    let (m_scale, v_scale) = (*ms, *vs);
    let (k1, k2) = sr_lane_keys(key, first);
    let lo = first as u32;
    let (mbuf, vbuf) = (&mut bufs.m[..n], &mut bufs.v[..n]);
    // max of |m| and of v as fp32 bit patterns: an integer max of non-negative floats orders as
    // the values and vectorizes as a reduction (a float max with NaN rules does not)
    let (mut m_max, mut v_max) = (0u32, 0u32);
    for j in 0..n {
        let grad = load_grad::<G>(g, j) * c.gscale;
        let mi = decode_m(mq[j]) * m_scale;
        let vi = decode_v(vq[j]) * v_scale;
        // the fp32 path's operation order (see `dispatch::Coefs`), but one division in the update
        let pi = bf16_to_f32(w[j]) * c.decay;
        let base = if c.lerp_small { mi } else { grad };
        let mi = c.lerp_coeff.mul_add(grad - mi, base);
        let vi = (c.omb2 * grad).mul_add(grad, vi * c.beta2);
        let pi = pi + (c.neg_step_bc2 * mi) / (vi.sqrt() + c.eps_bc2);
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
    let mut bufs = Bufs::new();
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

/// The portable path.
unsafe fn run_scalar(c: &Coefs, r: &Run) {
    match r.grad_dtype {
        GradDtype::F32 => run_blocks::<G_F32>(c, r),
        GradDtype::Bf16 => run_blocks::<G_BF16>(c, r),
        GradDtype::F16 => run_blocks::<G_F16>(c, r),
    }
}

/// Update the run with path `simd`.
///
/// # Safety
/// The run's pointers valid for its elements and blocks, disjoint from other runs; `simd`
/// available; `r.block` a power of two <= [`MAX_BLOCK`]; `r.first` a multiple of it.
pub(super) unsafe fn run(simd: Simd, c: &Coefs, r: &Run) {
    match simd {
        Simd::Scalar => run_scalar(c, r),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => super::avx2::run(c, r),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => super::avx512::run(c, r),
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
