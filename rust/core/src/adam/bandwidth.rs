//! Multi-threaded memory bandwidth probes (the physical limit the AdamW kernel is measured
//! against): a parallel copy and a STREAM-like triad over buffers far larger than the caches.

use std::time::Instant;

use rayon::prelude::*;

use super::{thread_pool, AdamError};

/// Best-of-`repeats` bandwidths in GB/s (1e9 bytes/s), counting bytes read + bytes written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bandwidth {
    /// `dst = src` (memcpy per thread; glibc picks its own store strategy).
    pub copy_gbps: f64,
    /// `a = b + s * c` over f32 arrays (2 reads + 1 write per element).
    pub triad_gbps: f64,
    /// Median copy over the repeats.
    pub copy_median_gbps: f64,
    pub threads: usize,
    pub bytes: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Measure with `threads` workers (0 = all CPUs), arrays of `bytes` each, `repeats` timed runs.
pub fn memory_bandwidth(
    bytes: usize,
    threads: usize,
    repeats: usize,
) -> Result<Bandwidth, AdamError> {
    let pool = thread_pool(threads)?;
    let nthreads = pool.current_num_threads();
    let n = (bytes / 4).max(1024);
    let repeats = repeats.max(1);
    pool.install(|| {
        let mut a = vec![0f32; n];
        let mut b = vec![0f32; n];
        let mut c = vec![0f32; n];
        // First touch from the workers that will use the pages.
        let piece = n.div_ceil(nthreads);
        a.par_chunks_mut(piece).for_each(|x| x.fill(1.0));
        b.par_chunks_mut(piece).for_each(|x| x.fill(2.0));
        c.par_chunks_mut(piece).for_each(|x| x.fill(3.0));
        let mut copy = Vec::new();
        let mut triad = Vec::new();
        for _ in 0..repeats + 1 {
            let t = Instant::now();
            a.par_chunks_mut(piece)
                .zip(b.par_chunks(piece))
                .for_each(|(d, s)| d.copy_from_slice(s));
            copy.push((2 * n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            let s = std::hint::black_box(0.5f32);
            a.par_chunks_mut(piece)
                .zip(b.par_chunks(piece))
                .zip(c.par_chunks(piece))
                .for_each(|((x, y), z)| {
                    for ((x, y), z) in x.iter_mut().zip(y).zip(z) {
                        *x = *y + s * *z;
                    }
                });
            triad.push((3 * n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        std::hint::black_box(&a);
        // Drop the warm-up run.
        copy.remove(0);
        triad.remove(0);
        let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        Ok(Bandwidth {
            copy_gbps: best(&copy),
            triad_gbps: best(&triad),
            copy_median_gbps: median(copy),
            threads: nthreads,
            bytes: n * 4,
        })
    })
}
