//! Scalar conversions between fp32 and the 16-bit formats (bf16, IEEE half), rounding as torch.

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
