//! The fused AdamW against a float64 scalar reference on fresh random inputs, for every SIMD path
//! this CPU has.

use gmtier_core::adam::{
    adamw_step, adamw_step_groups_raw, adamw_step_raw, adamw_step_raw_async, bf16_to_f32,
    f16_to_f32, f32_to_bf16, f32_to_f16, grad_stats, AdamConfig, Grad, GradDtype, Half, HalfDtype,
    Param, RawParam, Simd,
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
    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

fn encode(g: &[f32], dtype: GradDtype) -> (Vec<f32>, Vec<u16>, Vec<f32>) {
    // (fp32 storage, half storage, the fp32 values the kernel sees)
    match dtype {
        GradDtype::F32 => (g.to_vec(), vec![], g.to_vec()),
        GradDtype::Bf16 => {
            let h: Vec<u16> = g.iter().map(|&x| f32_to_bf16(x)).collect();
            let seen = h.iter().map(|&b| bf16_to_f32(b)).collect();
            (vec![], h, seen)
        }
        GradDtype::F16 => {
            let h: Vec<u16> = g.iter().map(|&x| f32_to_f16(x)).collect();
            let seen = h.iter().map(|&b| f16_to_f32(b)).collect();
            (vec![], h, seen)
        }
    }
}

struct Ref {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Ref {
    /// Exact (f64) arithmetic on the coefficients the kernel is given in fp32, as torch's fused
    /// kernel is (rounding `1 - lr * wd` to fp32 alone drifts the weight ~3e-6 over 100 steps).
    fn step(&mut self, cfg: &AdamConfig, g: &[f32], step: i64) {
        let f = |x: f64| x as f32 as f64;
        let bc1 = 1.0 - cfg.beta1.powi(step as i32);
        let bc2 = 1.0 - cfg.beta2.powi(step as i32);
        let (decay, b1, omb1) = (
            f(1.0 - cfg.lr * cfg.weight_decay),
            f(cfg.beta1),
            f(1.0 - cfg.beta1),
        );
        let (b2, omb2, eps) = (f(cfg.beta2), f(1.0 - cfg.beta2), f(cfg.eps));
        let (step_size, inv_bc2_sqrt) = (f(cfg.lr / bc1), f(1.0 / bc2.sqrt()));
        let gscale = f(cfg.clip_coef / cfg.grad_scale);
        for i in 0..g.len() {
            let g = g[i] as f64 * gscale;
            self.p[i] *= decay;
            self.m[i] = b1 * self.m[i] + omb1 * g;
            self.v[i] = b2 * self.v[i] + omb2 * g * g;
            let denom = self.v[i].sqrt() * inv_bc2_sqrt + eps;
            self.p[i] -= step_size * self.m[i] / denom;
        }
    }
}

/// Max over elements of |x - r| / (|r| + floor): relative error, with a floor for values that
/// cancel to ~0 (their absolute error is that of the terms).
fn rel_err(x: &[f32], r: &[f64], floor: f64) -> f64 {
    x.iter()
        .zip(r)
        .map(|(&x, &r)| (x as f64 - r).abs() / (r.abs() + floor))
        .fold(0.0, f64::max)
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    rng: &mut Rng,
    simd: Simd,
    n: usize,
    steps: usize,
    gd: GradDtype,
    hd: Option<HalfDtype>,
    cfg: &AdamConfig,
    threads: usize,
) {
    let mut p = rng.normals(n, 1.0);
    let mut m = vec![0f32; n];
    let mut v = vec![0f32; n];
    let mut h = vec![0u16; n];
    let mut step = 0i64;
    let mut r = Ref {
        p: p.iter().map(|&x| x as f64).collect(),
        m: vec![0.0; n],
        v: vec![0.0; n],
    };
    for s in 1..=steps {
        let graw = rng.normals(n, 0.1 * cfg.grad_scale as f32);
        let (g32, g16, seen) = encode(&graw, gd);
        let grad = match gd {
            GradDtype::F32 => Grad::F32(&g32),
            GradDtype::Bf16 => Grad::Bf16(&g16),
            GradDtype::F16 => Grad::F16(&g16),
        };
        let half = hd.map(|hd| match hd {
            HalfDtype::Bf16 => Half::Bf16(&mut h),
            HalfDtype::F16 => Half::F16(&mut h),
        });
        let mut params = [Param {
            master: &mut p,
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            grad,
            half,
            step: &mut step,
        }];
        let out = adamw_step(&mut params, cfg, Some(simd), threads).unwrap();
        assert!(!out.skipped);
        assert_eq!(out.simd, simd);
        assert_eq!(step, s as i64);
        r.step(cfg, &seen, s as i64);
    }
    let ctx = format!(
        "simd={simd:?} n={n} grad={gd:?} half={hd:?} seed={:#x}",
        rng.0
    );
    let ep = rel_err(&p, &r.p, 0.1); // weights ~N(0, 1): floor at a tenth of their scale
    if std::env::var("ADAM_DEBUG").is_ok() {
        let (i, e) = p
            .iter()
            .zip(&r.p)
            .map(|(&x, &r)| (x as f64 - r).abs())
            .enumerate()
            .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
        let ulps = (p[i] as f64 - r.p[i]) / (p[i].abs() as f64 * f32::EPSILON as f64);
        eprintln!(
            "{ctx}: max abs err {e:e} at p={} ({ulps} ulp) rel {ep:e}",
            p[i]
        );
    }
    // Moments: relative to the gradient's scale (m is a difference of such terms, v their squares).
    let gs = 0.1 * cfg.clip_coef;
    let em = rel_err(&m, &r.m, gs);
    let ev = rel_err(&v, &r.v, 1e-2 * gs * gs);
    // An fp32 weight updated 100 times drifts from the exact result by a random walk of
    // half-ulp roundings (~5 ulps typical, ~15 at worst over thousands of elements, ~1e-6):
    // the bound against exact arithmetic is 4e-6. Against torch's fp32 AdamW (the same operation
    // order) the Python tests hold 1e-6; across the SIMD paths `adam_paths_agree` holds bit-exact.
    assert!(ep < 4e-6, "master rel err {ep:e} {ctx}");
    assert!(em < 1e-5, "exp_avg rel err {em:e} {ctx}");
    assert!(ev < 1e-5, "exp_avg_sq rel err {ev:e} {ctx}");
    if let Some(hd) = hd {
        for i in 0..n {
            let want = match hd {
                HalfDtype::Bf16 => f32_to_bf16(p[i]),
                HalfDtype::F16 => f32_to_f16(p[i]),
            };
            assert_eq!(h[i], want, "half copy at {i}: {} {ctx}", p[i]);
        }
    }
}

#[test]
fn adam_every_path_matches_f64_reference_over_100_steps() {
    let mut rng = Rng::fresh();
    let cfg = AdamConfig {
        lr: 1e-3,
        weight_decay: 0.1,
        ..Default::default()
    };
    for simd in Simd::available() {
        // a size with a ragged tail inside a chunk and one spanning several chunks
        run_case(
            &mut rng,
            simd,
            1000 + 37,
            100,
            GradDtype::F32,
            None,
            &cfg,
            2,
        );
        run_case(
            &mut rng,
            simd,
            2 * 16384 + 123,
            20,
            GradDtype::Bf16,
            Some(HalfDtype::Bf16),
            &cfg,
            2,
        );
        run_case(
            &mut rng,
            simd,
            777,
            100,
            GradDtype::Bf16,
            Some(HalfDtype::Bf16),
            &cfg,
            1,
        );
        run_case(
            &mut rng,
            simd,
            501,
            100,
            GradDtype::F16,
            Some(HalfDtype::F16),
            &cfg,
            2,
        );
        run_case(
            &mut rng,
            simd,
            333,
            30,
            GradDtype::F32,
            Some(HalfDtype::F16),
            &cfg,
            1,
        );
        run_case(
            &mut rng,
            simd,
            15,
            30,
            GradDtype::F16,
            Some(HalfDtype::Bf16),
            &cfg,
            1,
        );
    }
}

#[test]
fn adam_grad_scale_and_clip() {
    let mut rng = Rng::fresh();
    let cfg = AdamConfig {
        lr: 3e-4,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.0,
        grad_scale: 1024.0,
        clip_coef: 0.5,
        check_finite: true,
        ..Default::default()
    };
    for simd in Simd::available() {
        run_case(
            &mut rng,
            simd,
            4099,
            50,
            GradDtype::F16,
            Some(HalfDtype::F16),
            &cfg,
            2,
        );
        run_case(&mut rng, simd, 99, 50, GradDtype::F32, None, &cfg, 1);
    }
}

#[test]
fn adam_paths_agree_closely() {
    // All paths on the same inputs: within a few ulps of each other after 10 steps.
    let mut rng = Rng::fresh();
    let n = 16384 + 9;
    let p0 = rng.normals(n, 1.0);
    let grads: Vec<Vec<f32>> = (0..10).map(|_| rng.normals(n, 0.1)).collect();
    let cfg = AdamConfig::default();
    let mut results = vec![];
    for simd in Simd::available() {
        let (mut p, mut m, mut v, mut step) = (p0.clone(), vec![0f32; n], vec![0f32; n], 0i64);
        for g in &grads {
            let mut params = [Param {
                master: &mut p,
                exp_avg: &mut m,
                exp_avg_sq: &mut v,
                grad: Grad::F32(g),
                half: None,
                step: &mut step,
            }];
            adamw_step(&mut params, &cfg, Some(simd), 2).unwrap();
        }
        results.push((simd, p));
    }
    for (simd, p) in &results[1..] {
        // Same operation order, FMA in the same places, IEEE sqrt/div: bit-identical.
        let diff = p
            .iter()
            .zip(&results[0].1)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            diff, 0,
            "{simd:?} vs {:?}: {diff} elements differ",
            results[0].0
        );
    }
}

#[test]
fn adam_nonfinite_grad_skips_without_writing() {
    let mut rng = Rng::fresh();
    for simd in Simd::available() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for gd in [GradDtype::F32, GradDtype::Bf16, GradDtype::F16] {
                let n = 3000;
                let p0 = rng.normals(n, 1.0);
                let (mut p, mut m, mut v, mut h) =
                    (p0.clone(), vec![0.5f32; n], vec![0.25f32; n], vec![7u16; n]);
                let mut step = 5i64;
                let mut g = rng.normals(n, 0.1);
                g[n - 3] = bad;
                let (g32, g16, _) = encode(&g, gd);
                let grad = match gd {
                    GradDtype::F32 => Grad::F32(&g32),
                    GradDtype::Bf16 => Grad::Bf16(&g16),
                    GradDtype::F16 => Grad::F16(&g16),
                };
                let cfg = AdamConfig {
                    check_finite: true,
                    ..Default::default()
                };
                let mut params = [Param {
                    master: &mut p,
                    exp_avg: &mut m,
                    exp_avg_sq: &mut v,
                    grad,
                    half: Some(Half::Bf16(&mut h)),
                    step: &mut step,
                }];
                let out = adamw_step(&mut params, &cfg, Some(simd), 2).unwrap();
                assert!(out.skipped, "{simd:?} {gd:?} {bad}");
                assert_eq!(step, 5);
                assert_eq!(p, p0);
                assert!(m.iter().all(|&x| x == 0.5) && v.iter().all(|&x| x == 0.25));
                assert!(h.iter().all(|&x| x == 7));
            }
        }
    }
}

#[test]
fn adam_shared_step_counter_increments_once() {
    let mut rng = Rng::fresh();
    let n = 100;
    let (mut p1, mut m1, mut v1) = (rng.normals(n, 1.0), vec![0f32; n], vec![0f32; n]);
    let (mut p2, mut m2, mut v2) = (
        rng.normals(2 * n, 1.0),
        vec![0f32; 2 * n],
        vec![0f32; 2 * n],
    );
    let g1 = rng.normals(n, 0.1);
    let g2 = rng.normals(2 * n, 0.1);
    let mut step = 41i64;
    let sp = &mut step as *mut i64;
    let raw = [
        RawParam {
            master: p1.as_mut_ptr(),
            exp_avg: m1.as_mut_ptr(),
            exp_avg_sq: v1.as_mut_ptr(),
            grad: g1.as_ptr() as *const u8,
            grad_dtype: GradDtype::F32,
            half: std::ptr::null_mut(),
            half_dtype: HalfDtype::Bf16,
            numel: n,
            step: sp,
        },
        RawParam {
            master: p2.as_mut_ptr(),
            exp_avg: m2.as_mut_ptr(),
            exp_avg_sq: v2.as_mut_ptr(),
            grad: g2.as_ptr() as *const u8,
            grad_dtype: GradDtype::F32,
            half: std::ptr::null_mut(),
            half_dtype: HalfDtype::Bf16,
            numel: 2 * n,
            step: sp,
        },
    ];
    unsafe { adamw_step_raw(&raw, &AdamConfig::default(), None, 2).unwrap() };
    assert_eq!(step, 42);
    let job = unsafe { adamw_step_raw_async(raw.to_vec(), AdamConfig::default(), None, 2) };
    let out = job.wait().unwrap();
    assert!(job.is_done() && !out.skipped);
    assert_eq!(step, 43);
}

type ExpertState = (
    Vec<Vec<f32>>,
    Vec<Vec<f32>>,
    Vec<Vec<f32>>,
    Vec<Vec<u16>>,
    i64,
);

/// One expert's record for the grouped step: two tensors (bf16 grads, bf16 half copies) sharing
/// the expert's step counter.
#[derive(Clone)]
struct Expert {
    p: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    g: Vec<Vec<u16>>,
    h: Vec<Vec<u16>>,
    step: Box<i64>,
}

impl Expert {
    fn new(rng: &mut Rng, sizes: &[usize], step: i64) -> Expert {
        let bf = |x: Vec<f32>| x.into_iter().map(f32_to_bf16).collect::<Vec<u16>>();
        Expert {
            p: sizes.iter().map(|&n| rng.normals(n, 1.0)).collect(),
            m: sizes.iter().map(|&n| rng.normals(n, 0.01)).collect(),
            v: sizes.iter().map(|&n| vec![1e-4f32; n]).collect(),
            g: sizes.iter().map(|&n| bf(rng.normals(n, 0.1))).collect(),
            h: sizes.iter().map(|&n| vec![0u16; n]).collect(),
            step: Box::new(step),
        }
    }

    fn raw(&mut self) -> Vec<RawParam> {
        let step: *mut i64 = &mut *self.step;
        (0..self.p.len())
            .map(|i| RawParam {
                master: self.p[i].as_mut_ptr(),
                exp_avg: self.m[i].as_mut_ptr(),
                exp_avg_sq: self.v[i].as_mut_ptr(),
                grad: self.g[i].as_ptr() as *const u8,
                grad_dtype: GradDtype::Bf16,
                half: self.h[i].as_mut_ptr(),
                half_dtype: HalfDtype::Bf16,
                numel: self.p[i].len(),
                step,
            })
            .collect()
    }

    /// Everything a step writes (master, moments, half copies, step), to compare.
    fn state(&self) -> ExpertState {
        (
            self.p.clone(),
            self.m.clone(),
            self.v.clone(),
            self.h.clone(),
            *self.step,
        )
    }
}

#[test]
fn adam_groups_skip_each_group_alone_and_match_one_call_per_group() {
    let mut rng = Rng::fresh();
    // Small groups run inline; the large ones on the pool (more than one chunk in all).
    for sizes in [vec![300usize, 77], vec![40_000, 70_001]] {
        let cfg = AdamConfig {
            check_finite: true,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut grouped: Vec<Expert> = (0..4).map(|e| Expert::new(&mut rng, &sizes, e)).collect();
        let bad = sizes[1] / 2;
        grouped[1].g[1][bad] = f32_to_bf16(f32::NAN);
        grouped[3].g[0][0] = f32_to_bf16(f32::INFINITY);
        let mut one_by_one = grouped.clone();
        let before: Vec<_> = grouped.iter().map(Expert::state).collect();
        let mut raw = vec![];
        let mut ends = vec![];
        for e in grouped.iter_mut() {
            raw.extend(e.raw());
            ends.push(raw.len());
        }
        let skipped = unsafe { adamw_step_groups_raw(&raw, &ends, &cfg, None, 3).unwrap() };
        assert_eq!(skipped, vec![false, true, false, true], "sizes {sizes:?}");
        for (i, e) in one_by_one.iter_mut().enumerate() {
            let out = unsafe { adamw_step_raw(&e.raw(), &cfg, None, 3).unwrap() };
            assert_eq!(out.skipped, skipped[i]);
            assert!(
                e.state() == grouped[i].state(),
                "expert {i}, sizes {sizes:?}"
            );
            if skipped[i] {
                assert!(
                    grouped[i].state() == before[i],
                    "skipped expert {i} was written"
                );
            } else {
                assert_eq!(*grouped[i].step, i as i64 + 1);
            }
        }
    }
    let mut e = Expert::new(&mut rng, &[10], 0);
    let bad_ends =
        unsafe { adamw_step_groups_raw(&e.raw(), &[2], &AdamConfig::default(), None, 1) };
    assert!(bad_ends.is_err());
}

#[test]
fn adam_grad_stats_matches_f64() {
    let mut rng = Rng::fresh();
    for simd in Simd::available() {
        for gd in [GradDtype::F32, GradDtype::Bf16, GradDtype::F16] {
            let g = rng.normals(3 * 16384 + 5, 2.0);
            let (g32, g16, seen) = encode(&g, gd);
            let grad = match gd {
                GradDtype::F32 => Grad::F32(&g32),
                GradDtype::Bf16 => Grad::Bf16(&g16),
                GradDtype::F16 => Grad::F16(&g16),
            };
            let (s, bad) = grad_stats(&[grad], Some(simd), 2).unwrap();
            let want: f64 = seen.iter().map(|&x| x as f64 * x as f64).sum();
            assert!(!bad);
            assert!((s - want).abs() / want < 1e-5, "{simd:?} {gd:?} {s} {want}");
        }
    }
}

#[test]
fn adam_half_rounding_is_correct() {
    // bf16: against the half crate (RNE) on random bit patterns; NaN stays NaN.
    let mut rng = Rng::fresh();
    for _ in 0..200_000 {
        let x = f32::from_bits(rng.next() as u32);
        let b = f32_to_bf16(x);
        if x.is_nan() {
            assert!(bf16_to_f32(b).is_nan());
        } else {
            assert_eq!(b, half::bf16::from_f32(x).to_bits(), "{x:e}");
        }
    }
}

#[test]
fn adam_unavailable_or_bad_options_error() {
    assert!(Simd::parse("sse9").is_err());
    assert_eq!(Simd::parse("auto").unwrap(), None);
    let (mut p, mut m, mut v, mut s) = (vec![0f32; 4], vec![0f32; 4], vec![0f32; 4], 0i64);
    let g = vec![0f32; 3];
    let mut params = [Param {
        master: &mut p,
        exp_avg: &mut m,
        exp_avg_sq: &mut v,
        grad: Grad::F32(&g),
        half: None,
        step: &mut s,
    }];
    assert!(adamw_step(&mut params, &AdamConfig::default(), None, 1).is_err());
    let g = vec![0f32; 4];
    params[0].grad = Grad::F32(&g);
    let bad = AdamConfig {
        beta1: 1.0,
        ..Default::default()
    };
    assert!(adamw_step(&mut params, &bad, None, 1).is_err());
    for simd in Simd::ALL {
        let r = adamw_step(&mut params, &AdamConfig::default(), Some(simd), 1);
        assert_eq!(r.is_ok(), simd.is_available());
    }
}
