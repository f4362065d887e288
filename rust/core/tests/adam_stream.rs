//! Streaming (non-temporal) stores give the same bits as regular ones.

use gmtier_core::adam::{adamw_step, AdamConfig, Grad, Half, Param, Simd, StorePolicy};

/// A 64-byte aligned slice of `n` elements inside `buf`.
fn aligned<T: Copy + Default>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    buf.resize(n + 64, T::default());
    let off = buf.as_ptr().align_offset(64);
    &mut buf[off..off + n]
}

#[test]
fn adam_streaming_stores_match_regular_stores() {
    let cfg = AdamConfig {
        stores: StorePolicy::StreamAll,
        ..Default::default()
    };
    // sizes: a ragged tail; and more than the auto threshold
    for n in [16384 * 3 + 40, 5_000_003] {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let p0: Vec<f32> = (0..n).map(|_| rnd()).collect();
        let g: Vec<u16> = (0..n)
            .map(|_| (rnd() * 0.01).to_bits().wrapping_shr(16) as u16)
            .collect();
        let mut results = vec![];
        for simd in Simd::available() {
            let (mut pb, mut mb, mut vb, mut hb) = (vec![], vec![], vec![], vec![]);
            let p = aligned(&mut pb, n);
            p.copy_from_slice(&p0);
            let m = aligned(&mut mb, n);
            let v = aligned(&mut vb, n);
            let h = aligned::<u16>(&mut hb, n);
            let mut step = 0i64;
            for _ in 0..3 {
                let mut params = [Param {
                    master: &mut *p,
                    exp_avg: &mut *m,
                    exp_avg_sq: &mut *v,
                    grad: Grad::Bf16(&g),
                    half: Some(Half::Bf16(&mut *h)),
                    step: &mut step,
                }];
                adamw_step(&mut params, &cfg, Some(simd), 2).unwrap();
            }
            results.push((simd, p.to_vec(), m.to_vec(), v.to_vec(), h.to_vec()));
        }
        let r0 = &results[0];
        for r in &results[1..] {
            assert!(
                r.1 == r0.1 && r.2 == r0.2 && r.3 == r0.3 && r.4 == r0.4,
                "{:?} vs {:?} n={n}",
                r.0,
                r0.0
            );
        }
    }
}
