//! Multi-threaded memory bandwidth probes (the physical limit the AdamW kernel is measured
//! against): a parallel copy and a STREAM-like triad over buffers far larger than the caches.

use std::time::Instant;

use rayon::prelude::*;

use super::{thread_pool, AdamError};

/// Best-of-`repeats` bandwidths in GB/s (1e9 bytes/s), counting bytes read + bytes written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bandwidth {
    /// `dst = src`: the best of the copy variants below.
    pub copy_gbps: f64,
    /// memcpy per thread piece (glibc picks its own store strategy).
    pub memcpy_gbps: f64,
    /// Vector loads + non-temporal (streaming) stores, no read-for-ownership of `dst` (x86 AVX;
    /// 0 elsewhere).
    pub stream_copy_gbps: f64,
    /// `a = b + s * c` over f32 arrays (2 reads + 1 write per element).
    pub triad_gbps: f64,
    /// `a *= s` in place (each line read then written back): AdamW's access pattern for the
    /// master weight and moments.
    pub inplace_gbps: f64,
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
        let mut stream = Vec::new();
        let mut triad = Vec::new();
        let mut inplace = Vec::new();
        let has_stream = stream_copy_available();
        for _ in 0..repeats + 1 {
            let t = Instant::now();
            a.par_chunks_mut(piece)
                .zip(b.par_chunks(piece))
                .for_each(|(d, s)| d.copy_from_slice(s));
            copy.push((2 * n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
            if has_stream {
                let t = Instant::now();
                a.par_chunks_mut(piece)
                    .zip(b.par_chunks(piece))
                    .for_each(|(d, s)| stream_copy(d, s));
                stream.push((2 * n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
            }
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
            let t = Instant::now();
            let s = std::hint::black_box(1.0f32);
            c.par_chunks_mut(piece).for_each(|x| {
                for x in x.iter_mut() {
                    *x *= s;
                }
            });
            inplace.push((2 * n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        std::hint::black_box(&a);
        // Drop the warm-up run.
        copy.remove(0);
        triad.remove(0);
        inplace.remove(0);
        if has_stream {
            stream.remove(0);
        }
        let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        let all: Vec<f64> = copy
            .iter()
            .zip(stream.iter().chain(std::iter::repeat(&0.0)))
            .map(|(a, b)| a.max(*b))
            .collect();
        Ok(Bandwidth {
            copy_gbps: best(&copy).max(best(&stream)),
            memcpy_gbps: best(&copy),
            stream_copy_gbps: best(&stream),
            triad_gbps: best(&triad),
            inplace_gbps: best(&inplace),
            copy_median_gbps: median(all),
            threads: nthreads,
            bytes: n * 4,
        })
    })
}

fn stream_copy_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst = src` with non-temporal stores (x86 AVX; plain copy elsewhere).
fn stream_copy(dst: &mut [f32], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx") {
            // SAFETY: AVX checked; slices of equal length.
            unsafe { stream_copy_avx(dst, src) };
            return;
        }
    }
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn stream_copy_avx(dst: &mut [f32], src: &[f32]) {
    use core::arch::x86_64::*;
    let n = dst.len().min(src.len());
    let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
    // head until dst is 32-byte aligned
    let mut i = 0;
    while i < n && !(d.add(i) as usize).is_multiple_of(32) {
        *d.add(i) = *s.add(i);
        i += 1;
    }
    while i + 32 <= n {
        let x0 = _mm256_loadu_ps(s.add(i));
        let x1 = _mm256_loadu_ps(s.add(i + 8));
        let x2 = _mm256_loadu_ps(s.add(i + 16));
        let x3 = _mm256_loadu_ps(s.add(i + 24));
        _mm256_stream_ps(d.add(i), x0);
        _mm256_stream_ps(d.add(i + 8), x1);
        _mm256_stream_ps(d.add(i + 16), x2);
        _mm256_stream_ps(d.add(i + 24), x3);
        i += 32;
    }
    while i < n {
        *d.add(i) = *s.add(i);
        i += 1;
    }
    _mm_sfence();
}
