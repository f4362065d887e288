//! The compact-state AdamW against a float64 reference of the same algorithm (dequantize, update,
//! stochastic rounding, requantize) on fresh random inputs, for every SIMD path this CPU has;
//! the maps, the rounding's unbiasedness, reproducibility across thread counts and the skip.

// the reference loops index several arrays at once; the helpers take a step's whole context
#![allow(
    clippy::needless_range_loop,
    clippy::too_many_arguments,
    clippy::type_complexity
)]

use gmtier_core::adam::compact::quant::{
    decode_m, decode_v, encode_m, encode_v, m_map, sr_bits, sr_key, v_map, M_MAX_CODE, V_MAX_CODE,
};
use gmtier_core::adam::{
    adamw_compact_step_groups, bf16_to_f32, compact_blocks, f16_to_f32, f32_to_bf16, f32_to_f16,
    AdamConfig, CompactParam, Grad, GradDtype, Simd,
};

/// splitmix64 seeded from the clock: fresh inputs every run; the seed is printed on failure.
struct Rng(u64);

impl Rng {
    fn fresh() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(t ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// A compact tensor's state.
#[derive(Clone, PartialEq, Debug)]
struct State {
    w: Vec<u16>,
    mq: Vec<u8>,
    vq: Vec<u8>,
    ms: Vec<f32>,
    vs: Vec<f32>,
    step: i64,
}

/// A gradient in one of the three dtypes, with its values as the kernel reads them.
struct G {
    dtype: GradDtype,
    f32s: Vec<f32>,
    halfs: Vec<u16>,
}

impl G {
    fn new(dtype: GradDtype, vals: &[f32]) -> G {
        let halfs = match dtype {
            GradDtype::F32 => vec![],
            GradDtype::Bf16 => vals.iter().map(|&x| f32_to_bf16(x)).collect(),
            GradDtype::F16 => vals.iter().map(|&x| f32_to_f16(x)).collect(),
        };
        G {
            dtype,
            f32s: vals.to_vec(),
            halfs,
        }
    }
    fn grad(&self) -> Grad<'_> {
        match self.dtype {
            GradDtype::F32 => Grad::F32(&self.f32s),
            GradDtype::Bf16 => Grad::Bf16(&self.halfs),
            GradDtype::F16 => Grad::F16(&self.halfs),
        }
    }
    fn value(&self, i: usize) -> f64 {
        (match self.dtype {
            GradDtype::F32 => self.f32s[i],
            GradDtype::Bf16 => bf16_to_f32(self.halfs[i]),
            GradDtype::F16 => f16_to_f32(self.halfs[i]),
        }) as f64
    }
}

/// A random state: weights ~ N(0, 1), codes over the valid ranges, positive scales.
fn random_state(rng: &mut Rng, n: usize, block: usize, step: i64) -> State {
    let nb = compact_blocks(n, block);
    State {
        w: (0..n).map(|_| f32_to_bf16(rng.normal())).collect(),
        mq: (0..n)
            .map(|_| {
                let mag = (rng.next() % (M_MAX_CODE as u64 + 1)) as u8;
                mag | if rng.next() & 1 == 1 && mag > 0 {
                    0x80
                } else {
                    0
                }
            })
            .collect(),
        vq: (0..n)
            .map(|_| (rng.next() % (V_MAX_CODE as u64 + 1)) as u8)
            .collect(),
        ms: (0..nb).map(|_| rng.uniform() as f32 * 0.1).collect(),
        vs: (0..nb).map(|_| rng.uniform() as f32 * 0.01).collect(),
        step,
    }
}

fn step(
    s: &mut State,
    g: &G,
    cfg: &AdamConfig,
    block: usize,
    seed: u64,
    stream: u64,
    simd: Simd,
    threads: usize,
) -> bool {
    try_step(s, g, cfg, block, seed, stream, Some(simd), threads).unwrap()[0]
}

/// One group of one tensor through the kernel, its result as the kernel gives it.
fn try_step(
    s: &mut State,
    g: &G,
    cfg: &AdamConfig,
    block: usize,
    seed: u64,
    stream: u64,
    simd: Option<Simd>,
    threads: usize,
) -> Result<Vec<bool>, gmtier_core::adam::AdamError> {
    let mut p = [CompactParam {
        weight: &mut s.w,
        m_codes: &mut s.mq,
        v_codes: &mut s.vq,
        m_scales: &mut s.ms,
        v_scales: &mut s.vs,
        grad: g.grad(),
        step: &mut s.step,
        stream,
    }];
    adamw_compact_step_groups(&mut p, &[1], cfg, block, seed, simd, threads)
}

/// Nearest code of `x` in f64 by search over the map's produced codes (ties: either).
fn nearest(map: &[f32; 256], codes: impl Iterator<Item = u8>, x: f64) -> f64 {
    codes
        .map(|c| (map[c as usize] as f64 - x).abs())
        .fold(f64::INFINITY, f64::min)
}

fn m_codes() -> impl Iterator<Item = u8> + Clone {
    (0..=M_MAX_CODE as u8).chain(0x81..=0x80 | M_MAX_CODE as u8)
}

fn v_codes() -> impl Iterator<Item = u8> + Clone {
    0..=V_MAX_CODE as u8
}

#[test]
fn maps_round_trip_and_encode_to_the_nearest_code() {
    let (mm, vm) = (m_map(), v_map());
    for c in m_codes() {
        assert_eq!(encode_m(decode_m(c)), c, "m code {c}");
    }
    for c in v_codes() {
        assert_eq!(encode_v(decode_v(c)), c, "v code {c}");
    }
    assert_eq!(decode_m(M_MAX_CODE as u8), 1.0);
    assert_eq!(decode_v(V_MAX_CODE as u8), 1.0);
    // monotone: the maps are sorted by magnitude
    assert!((1..=M_MAX_CODE as usize).all(|c| mm[c] > mm[c - 1]));
    assert!((1..=V_MAX_CODE as usize).all(|c| vm[c] > vm[c - 1]));
    let mut rng = Rng::fresh();
    let seed = rng.0;
    for _ in 0..200_000 {
        // log-uniform magnitudes over the maps' ranges and beyond, both signs for m
        let mag = 2f64.powf(-40.0 * rng.uniform()).min(1.0);
        let x = if rng.next() & 1 == 1 { -mag } else { mag } as f32;
        let got = (decode_m(encode_m(x)) as f64 - x as f64).abs();
        let best = nearest(&mm, m_codes(), x as f64);
        assert_eq!(got, best, "seed {seed}: m of {x}");
        let xv = mag as f32;
        let got = (decode_v(encode_v(xv)) as f64 - xv as f64).abs();
        let best = nearest(&vm, v_codes(), xv as f64);
        assert_eq!(got, best, "seed {seed}: v of {xv}");
    }
}

/// The float64 reference of one step.
struct Reference {
    /// Rounded bf16 bits of the new weights.
    w: Vec<u16>,
    /// New m and v in f64.
    m: Vec<f64>,
    v: Vec<f64>,
    /// New block scales.
    ms: Vec<f64>,
    vs: Vec<f64>,
    /// Per element, the sum of the magnitudes of the terms that make the new weight, m and v: a
    /// kernel computing in fp32 is off by a few fp32 ulps of that, which is far more than an
    /// ulp of the result where the terms cancel.
    w_terms: Vec<f64>,
    m_terms: Vec<f64>,
    v_terms: Vec<f64>,
}

fn reference(
    s: &State,
    g: &G,
    cfg: &AdamConfig,
    block: usize,
    seed: u64,
    stream: u64,
) -> Reference {
    let n = s.w.len();
    let t = s.step + 1;
    let key = sr_key(seed, stream, t);
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    let gs = cfg.clip_coef / cfg.grad_scale;
    let (mut w, mut m, mut v) = (vec![0u16; n], vec![0f64; n], vec![0f64; n]);
    let (mut w_terms, mut m_terms, mut v_terms) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
    for i in 0..n {
        let b = i / block;
        let gi = g.value(i) * gs;
        let mi = decode_m(s.mq[i]) as f64 * s.ms[b] as f64;
        let vi = decode_v(s.vq[i]) as f64 * s.vs[b] as f64;
        let pi = bf16_to_f32(s.w[i]) as f64 * (1.0 - cfg.lr * cfg.weight_decay);
        m[i] = b1 * mi + (1.0 - b1) * gi;
        v[i] = b2 * vi + (1.0 - b2) * gi * gi;
        let update = cfg.lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + cfg.eps);
        let p = pi - update;
        w[i] = sr_ref(p, sr_bits(key, i as u64) >> 16);
        m_terms[i] = (b1 * mi).abs() + ((1.0 - b1) * gi).abs();
        v_terms[i] = b2 * vi + (1.0 - b2) * gi * gi;
        w_terms[i] = pi.abs() + update.abs();
    }
    let nb = compact_blocks(n, block);
    let ms = (0..nb)
        .map(|b| {
            m[b * block..n.min(b * block + block)]
                .iter()
                .fold(0.0, |a: f64, x| a.max(x.abs()))
        })
        .collect();
    let vs = (0..nb)
        .map(|b| {
            v[b * block..n.min(b * block + block)]
                .iter()
                .fold(0.0, |a: f64, &x| a.max(x))
        })
        .collect();
    Reference {
        w,
        m,
        v,
        ms,
        vs,
        w_terms,
        m_terms,
        v_terms,
    }
}

/// A few fp32 ulps of `terms`: how far fp32 arithmetic may be from f64 on them.
fn fp32_slack(terms: f64) -> f64 {
    16.0 * f32::EPSILON as f64 * terms
}

/// Stochastic rounding of an f64 to bf16 with 16 random bits `r`: up (in magnitude) iff
/// r + the fraction of an ulp above the truncated value (in 1/65536) reaches 65536.
fn sr_ref(p: f64, r: u32) -> u16 {
    let a = p.abs();
    let e = a.log2().floor() as i32;
    let ulp = 2f64.powi(e - 7);
    let lo = (a / ulp).floor() * ulp;
    let up = (a - lo) / ulp * 65536.0 + r as f64 >= 65536.0;
    let x = if up { lo + ulp } else { lo };
    f32_to_bf16((x as f32).copysign(p as f32))
}

fn cfg() -> AdamConfig {
    AdamConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_scale: 4.0,
        clip_coef: 0.5,
        check_finite: true,
        ..AdamConfig::default()
    }
}

#[test]
fn kernel_matches_the_float64_reference_on_every_path() {
    let mut rng = Rng::fresh();
    let seed = rng.0;
    let cfg = cfg();
    for &block in &[256usize, 1024, 2048] {
        for &n in &[1usize, 100, 3 * block + 17, 5000] {
            for dtype in [GradDtype::F32, GradDtype::Bf16, GradDtype::F16] {
                let t0 = (rng.next() % 20) as i64;
                let s0 = random_state(&mut rng, n, block, t0);
                let gv: Vec<f32> = (0..n).map(|_| rng.normal() * 0.1).collect();
                let g = G::new(dtype, &gv);
                let stream = rng.next();
                let r = reference(&s0, &g, &cfg, block, 7, stream);
                let (w, m, v, ms, vs) = (&r.w, &r.m, &r.v, &r.ms, &r.vs);
                let mut first: Option<State> = None;
                for simd in Simd::available() {
                    let mut s = s0.clone();
                    let ctx = format!("seed {seed} block {block} n {n} {dtype:?} {simd:?}");
                    assert!(!step(&mut s, &g, &cfg, block, 7, stream, simd, 2), "{ctx}");
                    assert_eq!(s.step, s0.step + 1, "{ctx}");
                    // every path: the same bits
                    match &first {
                        None => first = Some(s.clone()),
                        Some(f) => assert_eq!(&s, f, "{ctx}: differs from {:?}", Simd::best()),
                    }
                    // scales: the block absmax, fp32 vs f64 arithmetic
                    // (and the fp32 slack of the block's largest terms, where m or v cancel)
                    let block_slack = |terms: &[f64]| -> Vec<f64> {
                        terms
                            .chunks(block)
                            .map(|c| fp32_slack(c.iter().fold(0.0, |a: f64, &x| a.max(x))))
                            .collect()
                    };
                    let slack: Vec<f64> = block_slack(&r.m_terms)
                        .into_iter()
                        .chain(block_slack(&r.v_terms))
                        .collect();
                    for (b, (&got, &want)) in
                        s.ms.iter().zip(ms).chain(s.vs.iter().zip(vs)).enumerate()
                    {
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * want + slack[b],
                            "{ctx}: scale {b}: {got} vs {want}"
                        );
                    }
                    // weights: the same SR bits, so equal unless fp32 and f64 straddle a threshold
                    let mut diff = 0;
                    for i in 0..n {
                        if s.w[i] != w[i] {
                            diff += 1;
                            let (a, b) = (bf16_to_f32(s.w[i]), bf16_to_f32(w[i]));
                            let ulp = 2f32.powi(a.abs().max(b.abs()).log2().floor() as i32 - 7);
                            let slack = fp32_slack(r.w_terms[i]);
                            assert!(
                                ((a - b).abs() as f64) <= ulp as f64 + slack,
                                "{ctx}: weight {i}: {a} vs {b}"
                            );
                        }
                    }
                    // (one in a thousand, and one in a small tensor, as for the codes below)
                    assert!(diff * 1000 <= n.max(1000), "{ctx}: {diff} weights differ");
                    // codes: the nearest of the f64 moment, up to fp32's last bits at a tie
                    let mut diff = 0;
                    for i in 0..n {
                        let b = i / block;
                        let (xm, xv) = (m[i] / ms[b], v[i] / vs[b]);
                        let em = (decode_m(s.mq[i]) as f64 - xm).abs();
                        let ev = (decode_v(s.vq[i]) as f64 - xv).abs();
                        let (bm, bv) = (
                            nearest(&m_map(), m_codes(), xm),
                            nearest(&v_map(), v_codes(), xv),
                        );
                        if em > bm || ev > bv {
                            diff += 1;
                            assert!(
                                em <= bm + 1e-5 * xm.abs() + fp32_slack(r.m_terms[i]) / ms[b]
                                    && ev <= bv + 1e-5 * xv + fp32_slack(r.v_terms[i]) / vs[b],
                                "{ctx}: codes of {i}: m {} ({em} vs {bm}), v {} ({ev} vs {bv})",
                                s.mq[i],
                                s.vq[i]
                            );
                        }
                    }
                    assert!(
                        diff * 1000 <= n.max(1000),
                        "{ctx}: {diff} codes not nearest"
                    );
                }
            }
        }
    }
}

#[test]
fn stochastic_rounding_is_unbiased() {
    // Every element the same weight, moments and gradient: the same fp32 new weight, rounded
    // with each element's own random bits; their mean estimates the fp32 value.
    let n = 200_000;
    let block = 2048;
    let cfg = AdamConfig {
        lr: 1e-3,
        weight_decay: 0.0,
        ..AdamConfig::default()
    };
    let mut s = State {
        w: vec![f32_to_bf16(1.0); n],
        mq: vec![0; n],
        vq: vec![0; n],
        ms: vec![0.0; compact_blocks(n, block)],
        vs: vec![0.0; compact_blocks(n, block)],
        step: 0,
    };
    let g = G::new(GradDtype::F32, &vec![0.3; n]);
    step(&mut s, &g, &cfg, block, 1234, 5, Simd::best(), 2);
    // step 1 from zero moments: m / (sqrt(v) + eps) = g / |g| up to eps: p = 1 - lr
    let exact = 1.0 - 1e-3 * 0.3 / (0.3 + 1e-8 / (0.001f64).sqrt() * 0.001f64.sqrt());
    let (lo, hi) = (0.99609375f64, 1.0f64); // the two bf16 around it
    let ups = s.w.iter().filter(|&&w| bf16_to_f32(w) as f64 == hi).count();
    assert!(s
        .w
        .iter()
        .all(|&w| [lo, hi].contains(&(bf16_to_f32(w) as f64))));
    let mean: f64 = s.w.iter().map(|&w| bf16_to_f32(w) as f64).sum::<f64>() / n as f64;
    let q = (exact - lo) / (hi - lo);
    let se = (q * (1.0 - q) / n as f64).sqrt() * (hi - lo);
    assert!(
        (mean - exact).abs() <= 4.0 * se,
        "mean {mean} vs {exact} (se {se}, {ups} of {n} up)"
    );
}

#[test]
fn results_are_the_same_bits_for_any_thread_count_and_repeat() {
    let mut rng = Rng::fresh();
    let seed = rng.0;
    let cfg = cfg();
    let block = 1024;
    let n = 300_001;
    let s0 = random_state(&mut rng, n, block, 3);
    let g = G::new(
        GradDtype::Bf16,
        &(0..n).map(|_| rng.normal()).collect::<Vec<_>>(),
    );
    let mut outs = Vec::new();
    for threads in [1, 2, 3, 1] {
        let mut s = s0.clone();
        step(&mut s, &g, &cfg, block, 99, 11, Simd::best(), threads);
        step(&mut s, &g, &cfg, block, 99, 11, Simd::best(), threads);
        outs.push(s);
    }
    assert!(outs.windows(2).all(|w| w[0] == w[1]), "seed {seed}");
    // another seed or stream: other rounding bits
    let mut s = s0.clone();
    step(&mut s, &g, &cfg, block, 99, 12, Simd::best(), 2);
    let mut t = s0.clone();
    step(&mut t, &g, &cfg, block, 99, 11, Simd::best(), 2);
    assert_ne!(s.w, t.w);
    assert_eq!(
        (s.mq, s.ms),
        (t.mq, t.ms),
        "the moments do not depend on the stream"
    );
}

#[test]
fn a_group_with_a_non_finite_gradient_is_skipped_untouched() {
    let mut rng = Rng::fresh();
    let cfg = cfg();
    let block = 256;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for simd in Simd::available() {
            let s0 = random_state(&mut rng, 70_000, block, 5);
            let t0 = random_state(&mut rng, 1000, block, 9);
            let mut gv: Vec<f32> = (0..70_000).map(|_| rng.normal()).collect();
            gv[69_999] = bad;
            let (g, h) = (
                G::new(GradDtype::F16, &gv),
                G::new(GradDtype::F16, &vec![0.5; 1000]),
            );
            let (mut s, mut t) = (s0.clone(), t0.clone());
            let mut p = [
                CompactParam {
                    weight: &mut s.w,
                    m_codes: &mut s.mq,
                    v_codes: &mut s.vq,
                    m_scales: &mut s.ms,
                    v_scales: &mut s.vs,
                    grad: g.grad(),
                    step: &mut s.step,
                    stream: 0,
                },
                CompactParam {
                    weight: &mut t.w,
                    m_codes: &mut t.mq,
                    v_codes: &mut t.vq,
                    m_scales: &mut t.ms,
                    v_scales: &mut t.vs,
                    grad: h.grad(),
                    step: &mut t.step,
                    stream: 1,
                },
            ];
            let skipped =
                adamw_compact_step_groups(&mut p, &[1, 2], &cfg, block, 0, Some(simd), 2).unwrap();
            assert_eq!(skipped, vec![true, false], "{bad} {simd:?}");
            assert_eq!(s, s0, "{bad} {simd:?}: the skipped group was written");
            assert_eq!(t.step, 10);
            assert_ne!(t.w, t0.w);
        }
    }
}

#[test]
fn bad_arguments_are_refused() {
    let mut s = State {
        w: vec![0; 1000],
        mq: vec![0; 1000],
        vq: vec![0; 1000],
        ms: vec![0.0; 4],
        vs: vec![0.0; 3],
        step: 0,
    };
    let g = G::new(GradDtype::F32, &[0.0; 1000]);
    for block in [128, 300, 4096] {
        let mut p = [CompactParam {
            weight: &mut s.w,
            m_codes: &mut s.mq,
            v_codes: &mut s.vq,
            m_scales: &mut s.ms,
            v_scales: &mut s.vs,
            grad: g.grad(),
            step: &mut s.step,
            stream: 0,
        }];
        let e = adamw_compact_step_groups(&mut p, &[1], &cfg(), block, 0, None, 1).unwrap_err();
        assert!(e.to_string().contains("block size"), "{e}");
    }
    let mut p = [CompactParam {
        weight: &mut s.w,
        m_codes: &mut s.mq,
        v_codes: &mut s.vq,
        m_scales: &mut s.ms,
        v_scales: &mut s.vs,
        grad: g.grad(),
        step: &mut s.step,
        stream: 0,
    }];
    let e = adamw_compact_step_groups(&mut p, &[1], &cfg(), 256, 0, None, 1).unwrap_err();
    assert!(e.to_string().contains("v_scales"), "{e}");
}

#[test]
fn a_corrupt_block_scale_is_refused_before_anything_is_written() {
    let mut rng = Rng::fresh();
    let (n, block) = (3000, 256);
    let g = G::new(GradDtype::F32, &vec![1e-3; n]);
    for (which, bad) in [
        ("m_scales", f32::NAN),
        ("v_scales", -1.0),
        ("m_scales", f32::INFINITY),
    ] {
        let mut s = random_state(&mut rng, n, block, 3);
        let b = (rng.next() % compact_blocks(n, block) as u64) as usize;
        if which == "m_scales" {
            s.ms[b] = bad;
        } else {
            s.vs[b] = bad;
        }
        let before = s.clone();
        let e = try_step(&mut s, &g, &cfg(), block, 0, 0, None, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{which}[{b}]")) && e.contains("corrupt"),
            "{e}"
        );
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let same = (&s.w, &s.mq, &s.vq, s.step) == (&before.w, &before.mq, &before.vq, before.step)
            && bits(&s.ms) == bits(&before.ms)
            && bits(&s.vs) == bits(&before.vs);
        assert!(same, "nothing may be written ({which} = {bad})");
    }
}

/// Every SIMD path gives the scalar path's bits on inputs chosen to reach every branch of the
/// vector code: realistic moments (the second pass's normal-codes-only case) and uniformly random
/// codes of all 256 values (its general case, codes the encoder never produces included), blocks
/// of zeros, non-finite, subnormal and huge gradients and weights (no finiteness check), zero,
/// subnormal and huge scales, every tail length around the vector widths, both lerp branches.
#[test]
fn simd_paths_give_the_scalar_bits_on_edge_inputs() {
    let mut rng = Rng::fresh();
    let seed = rng.0;
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        -f32::INFINITY,
        0.0,
        -0.0,
        1e-40,
        -3e-39,
        1e30,
        -65504.0,
        1e-20,
    ];
    let paths: Vec<Simd> = Simd::available()
        .into_iter()
        .filter(|&s| s != Simd::Scalar)
        .collect();
    let mut cases = 0;
    for &block in &[256usize, 2048] {
        for &n in &[
            1usize,
            7,
            8,
            9,
            15,
            16,
            17,
            33,
            255,
            257,
            2047,
            2049,
            2 * block + 23,
        ] {
            for kind in 0..4 {
                for dtype in [GradDtype::F32, GradDtype::Bf16, GradDtype::F16] {
                    let nb = compact_blocks(n, block);
                    let mut s = match kind {
                        // codes of every value, odd scales
                        0 => State {
                            w: (0..n).map(|_| rng.next() as u16).collect(),
                            mq: (0..n).map(|_| rng.next() as u8).collect(),
                            vq: (0..n).map(|_| rng.next() as u8).collect(),
                            ms: (0..nb)
                                .map(|b| [0.0, 1e-40, 3e7, 0.5][b % 4] * rng.uniform() as f32)
                                .collect(),
                            vs: (0..nb)
                                .map(|b| [1e-38, 0.0, 1e20, 0.01][b % 4] * rng.uniform() as f32)
                                .collect(),
                            step: (rng.next() % 30) as i64,
                        },
                        // zero moments: the first step (and blocks whose new m, v are all 0)
                        1 => State {
                            w: (0..n).map(|_| f32_to_bf16(rng.normal())).collect(),
                            mq: vec![0; n],
                            vq: vec![0; n],
                            ms: vec![0.0; nb],
                            vs: vec![0.0; nb],
                            step: 0,
                        },
                        // realistic moments, then the specials sprinkled in
                        _ => random_state(&mut rng, n, block, 5),
                    };
                    let mut gv: Vec<f32> = (0..n).map(|_| rng.normal() * 1e-3).collect();
                    if kind == 1 && n > 40 {
                        gv[..40].fill(0.0); // a zero run: m = v = 0 there
                    }
                    if kind == 3 {
                        for x in gv.iter_mut() {
                            if rng.next().is_multiple_of(50) {
                                *x = specials[(rng.next() % specials.len() as u64) as usize];
                            }
                        }
                        for w in s.w.iter_mut() {
                            if rng.next().is_multiple_of(100) {
                                *w = f32_to_bf16(specials[(rng.next() % 11) as usize]);
                            }
                        }
                    }
                    if kind == 2 {
                        // realistic codes: every moment from a few steps of real updates
                        let c = AdamConfig {
                            check_finite: false,
                            ..cfg()
                        };
                        for _ in 0..3 {
                            let g = G::new(dtype, &gv);
                            step(&mut s, &g, &c, block, 3, 4, Simd::Scalar, 1);
                        }
                    }
                    let g = G::new(dtype, &gv);
                    let beta1 = if rng.next() & 1 == 0 { 0.9 } else { 0.3 };
                    let c = AdamConfig {
                        beta1,
                        check_finite: false,
                        ..cfg()
                    };
                    let mut want = s.clone();
                    step(&mut want, &g, &c, block, 21, 9, Simd::Scalar, 1);
                    for &simd in &paths {
                        let mut got = s.clone();
                        step(&mut got, &g, &c, block, 21, 9, simd, 1);
                        let ctx = format!("seed {seed} block {block} n {n} kind {kind} {dtype:?}");
                        assert_eq!(got.w, want.w, "{ctx} {simd:?}: weights");
                        assert_eq!(got.mq, want.mq, "{ctx} {simd:?}: m codes");
                        assert_eq!(got.vq, want.vq, "{ctx} {simd:?}: v codes");
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got.ms), bits(&want.ms), "{ctx} {simd:?}: m scales");
                        assert_eq!(bits(&got.vs), bits(&want.vs), "{ctx} {simd:?}: v scales");
                        cases += 1;
                    }
                }
            }
        }
    }
    assert!(paths.is_empty() || cases > 0);
}
