//! The 8-bit maps of the compact moments, the counter-based RNG and stochastic rounding to bf16.
//!
//! Both maps are small floats (exponent + mantissa, with subnormals) of `|x| / absmax` in [0, 1],
//! so encoding is a round-to-nearest-even of the fp32 bits (no table search) and decoding is
//! arithmetic (no gather): both vectorize.
//!
//! * m (signed): sign + E4M3, bias 15: 1.0 is code 120, the smallest step 2^-17 (~7.6e-6) of the
//!   block's absmax, 3 mantissa bits (relative error <= 1/16) everywhere above 2^-14.
//! * v (unsigned, v >= 0, all 8 bits magnitude): E5M3, bias 31: 1.0 is code 248, the smallest step
//!   2^-33. v is a square, so it needs twice m's range in exponent: sqrt(v)'s range (~2^-16.5)
//!   then matches m's, and an element whose m survives does not see its v flushed to zero (which
//!   would turn m / (sqrt(v) + eps) into a huge step).
//!
//! Codes above 120 (m) and 248 (v) decode to values > 1 and are never produced.

/// Largest magnitude code of m (1.0).
pub const M_MAX_CODE: u32 = 120;
/// Largest code of v (1.0).
pub const V_MAX_CODE: u32 = 248;

// fp32 exponent offsets: code = (fp32 bits >> 20) - OFFSET << 3 for normal values.
pub(super) const M_EXP_OFFSET: u32 = 127 - 15;
pub(super) const V_EXP_OFFSET: u32 = 127 - 31;
// Smallest normals and the magic addends whose fp32 ulp is the subnormal step (2^-17, 2^-33):
// `(x + MAGIC).bits() - MAGIC.bits()` is the nearest subnormal code.
pub(super) const M_MIN_NORMAL: f32 = 1.0 / 16384.0; // 2^-14
pub(super) const M_MAGIC: f32 = 64.0; // 2^6: ulp 2^-17
pub(super) const V_MIN_NORMAL: f32 = 1.0 / 1_073_741_824.0; // 2^-30
pub(super) const V_MAGIC: f32 = 1.0 / 1024.0; // 2^-10: ulp 2^-33

/// Round the fp32 bits of a normal value to 3 mantissa bits, nearest even: `exp8 << 3 | mant3`.
#[inline(always)]
fn round_e_m3(bits: u32) -> u32 {
    (bits.wrapping_add(0x7FFFF + ((bits >> 20) & 1))) >> 20
}

/// Nearest m code of `x` (a value already divided by the block's absmax, |x| <= 1).
#[inline(always)]
pub fn encode_m(x: f32) -> u8 {
    let bits = x.to_bits();
    let a = f32::from_bits(bits & 0x7FFF_FFFF);
    let normal = round_e_m3(a.to_bits()).wrapping_sub(M_EXP_OFFSET << 3);
    let sub = (a + M_MAGIC).to_bits().wrapping_sub(M_MAGIC.to_bits());
    let mag = if a < M_MIN_NORMAL { sub } else { normal }.min(M_MAX_CODE);
    // zero has one code (no -0): the sign only where the magnitude survived; a NaN (a block
    // gone bad) is +1, whatever its sign bit (which the arithmetic before does not fix)
    let sign = if mag == 0 || x.is_nan() {
        0
    } else {
        (bits >> 24) & 0x80
    };
    (mag | sign) as u8
}

/// The value of m code `c` (times the block scale gives m).
#[inline(always)]
pub fn decode_m(c: u8) -> f32 {
    let c = c as u32;
    let mag = c & 0x7F;
    let normal = f32::from_bits((mag << 20).wrapping_add(M_EXP_OFFSET << 23));
    let sub = mag as f32 * (1.0 / 131072.0); // 2^-17
    let x = if mag < 8 { sub } else { normal };
    f32::from_bits(x.to_bits() | ((c & 0x80) << 24))
}

/// Nearest v code of `x` (v divided by the block's max, 0 <= x <= 1).
#[inline(always)]
pub fn encode_v(x: f32) -> u8 {
    let a = f32::from_bits(x.to_bits() & 0x7FFF_FFFF);
    let normal = round_e_m3(a.to_bits()).wrapping_sub(V_EXP_OFFSET << 3);
    let sub = (a + V_MAGIC).to_bits().wrapping_sub(V_MAGIC.to_bits());
    (if a < V_MIN_NORMAL { sub } else { normal }).min(V_MAX_CODE) as u8
}

/// The value of v code `c`.
#[inline(always)]
pub fn decode_v(c: u8) -> f32 {
    let c = c as u32;
    let normal = f32::from_bits((c << 20).wrapping_add(V_EXP_OFFSET << 23));
    let sub = c as f32 * (1.0 / 8_589_934_592.0); // 2^-33
    if c < 8 {
        sub
    } else {
        normal
    }
}

/// The 256 values of the m map (index = code).
pub fn m_map() -> [f32; 256] {
    std::array::from_fn(|c| decode_m(c as u8))
}

/// The 256 values of the v map (index = code).
pub fn v_map() -> [f32; 256] {
    std::array::from_fn(|c| decode_v(c as u8))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-(seed, stream, step) key of the rounding RNG, computed once per tensor and call.
pub fn sr_key(seed: u64, stream: u64, step: i64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ step as u64)
}

/// A 32-bit integer hash with low bias (xorshift-multiply with two 32-bit multiplies, a
/// bijection: cheap in SIMD lanes, unlike 64-bit multiplies).
#[inline(always)]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// 32 random bits for element `index` of a tensor under `key` (see [`sr_key`]): a pure function
/// of (seed, stream, step, index), hence independent of threads and chunking.
#[inline(always)]
pub fn sr_bits(key: u64, index: u64) -> u32 {
    let (k1, k2) = sr_lane_keys(key, index);
    sr_bits_lo(k1, k2, index as u32)
}

/// The two 32-bit keys of [`sr_bits`] for indices sharing `index >> 32` (a whole block: block
/// sizes are powers of two): the high half of the index folds into the second key, so that the
/// per-element work is 32-bit only.
#[inline(always)]
pub fn sr_lane_keys(key: u64, index: u64) -> (u32, u32) {
    let k2 = (key >> 32) as u32 ^ ((index >> 32) as u32).wrapping_mul(0x9E37_79B9);
    (key as u32, k2)
}

/// [`sr_bits`] from the lane keys and the low half of the index: one hash of the keyed index
/// (a different permutation of the indices for each (seed, stream, step), so the bits of one
/// element are unrelated from step to step), the second key folded in after it. One hash
/// rather than two: its multiplies were a fifth of the compact kernel's work.
#[inline(always)]
pub fn sr_bits_lo(k1: u32, k2: u32, lo: u32) -> u32 {
    mix32(lo ^ k1) ^ k2
}

/// Round fp32 `x` to bf16 stochastically: up with probability (distance to the lower bf16) / ulp,
/// using the top 16 bits of `r`. NaN -> 0x7FC0.
#[inline(always)]
pub fn sr_bf16(x: f32, r: u32) -> u16 {
    if x.is_nan() {
        0x7FC0
    } else {
        (x.to_bits().wrapping_add(r >> 16) >> 16) as u16
    }
}
