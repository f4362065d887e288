//! The thread pools and the parallel passes over chunks of many tensors: the step itself and
//! the gradient scans (sum of squares, inf/NaN per tensor).

use super::dispatch::{run_chunk, Coefs};
use super::groups::next_steps;
use super::{
    AdamConfig, AdamError, GradDtype, RawGrad, RawParam, Simd, StepOutcome, CHUNK, STATS_CHUNK,
};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The rayon pool with `threads` workers (0 = one per available CPU), created once per size.
pub fn thread_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, AdamError> {
    // Keyed by (process id, threads): a fork()ed child (e.g. a DataLoader worker) inherits the
    // map but not the worker threads, so it builds its own pools instead of waiting forever.
    type Pools = HashMap<(u32, usize), Arc<rayon::ThreadPool>>;
    static POOLS: OnceLock<Mutex<Pools>> = OnceLock::new();
    // available_parallelism() reads cgroup files: once per process, not per call.
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    let threads = if threads == 0 {
        *DEFAULT.get_or_init(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    } else {
        threads
    };
    let mut pools = POOLS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = (std::process::id(), threads);
    if let Some(p) = pools.get(&key) {
        return Ok(p.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("gmtier-adam-{threads}-{i}"))
        .build()
        .map_err(|e| AdamError::Invalid(format!("cannot start {threads} threads: {e}")))?;
    let pool = Arc::new(pool);
    if pools.keys().any(|(pid, _)| *pid != key.0) {
        // Pools of the parent process: their threads do not exist here; never drop them (that
        // would wait for those threads).
        let stale: Vec<_> = pools
            .keys()
            .filter(|(pid, _)| *pid != key.0)
            .cloned()
            .collect();
        for k in stale {
            std::mem::forget(pools.remove(&k));
        }
    }
    pools.insert(key, pool.clone());
    Ok(pool)
}

/// Work list of (tensor index, element offset, length) chunks over tensors of sizes `sizes`.
/// The first chunk of each tensor when every tensor is cut into `chunk`-element pieces (the
/// last entry is the total), so one flat index range spans all tensors' chunks.
pub(super) fn chunk_starts(sizes: impl Iterator<Item = usize>, chunk: usize) -> Vec<usize> {
    // prefix[i] = index of the first chunk of tensor i; prefix[last] = total chunks
    let mut prefix = vec![0usize];
    for n in sizes {
        let last = *prefix.last().unwrap();
        prefix.push(last + n.div_ceil(chunk));
    }
    prefix
}

/// (tensor, element offset) of flat chunk `chunk` under `chunk_starts`'s prefix.
pub(super) fn locate(prefix: &[usize], chunk: usize, chunk_len: usize) -> (usize, usize) {
    // the tensor whose chunk range holds `chunk` (skips empty tensors)
    let t = prefix.partition_point(|&start| start <= chunk) - 1;
    (t, (chunk - prefix[t]) * chunk_len)
}

pub(super) fn grad_stats_in_pool(grads: &[RawGrad], simd: Simd, parallel: bool) -> (f64, bool) {
    let prefix = chunk_starts(grads.iter().map(|g| g.numel), STATS_CHUNK);
    let total = *prefix.last().unwrap();
    let one = |ci: usize| {
        let (t, off) = locate(&prefix, ci, STATS_CHUNK);
        // SAFETY: the caller vouches for the pointers; the chunk lies within the tensor.
        unsafe { grads[t].chunk_stats(simd, off) }
    };
    let add = |a: (f64, bool), b: (f64, bool)| (a.0 + b.0, a.1 || b.1);
    if parallel {
        (0..total)
            .into_par_iter()
            .map(one)
            .reduce(|| (0.0, false), add)
    } else {
        (0..total).map(one).fold((0.0, false), add)
    }
}

pub(super) fn check_pointers(params: &[RawParam]) -> Result<(), AdamError> {
    for (i, p) in params.iter().enumerate() {
        if p.numel > 0
            && (p.master.is_null()
                || p.exp_avg.is_null()
                || p.exp_avg_sq.is_null()
                || p.grad.is_null())
        {
            return Err(AdamError::Invalid(format!("tensor {i}: null pointer")));
        }
        if p.step.is_null() {
            return Err(AdamError::Invalid(format!("tensor {i}: null step pointer")));
        }
    }
    Ok(())
}

pub(super) unsafe fn step_in_pool(
    params: &[RawParam],
    cfg: &AdamConfig,
    simd: Simd,
    parallel: bool,
) -> Result<StepOutcome, AdamError> {
    check_pointers(params)?;
    if cfg.check_finite {
        let grads: Vec<RawGrad> = params.iter().map(RawParam::grad).collect();
        if !nonfinite_in_pool(&grads, simd, parallel) {
            // all finite: fall through
        } else {
            return Ok(StepOutcome {
                skipped: true,
                simd,
            });
        }
    }
    // Distinct step counters, each incremented once.
    let bytes: usize = params
        .iter()
        .map(|p| {
            let g = if p.grad_dtype == GradDtype::F32 { 4 } else { 2 };
            let h = if p.half.is_null() { 0 } else { 2 };
            p.numel * (24 + g + h)
        })
        .sum();
    let stream = cfg.stores.for_call(bytes);
    let (new_steps, steps) = next_steps(params.iter().map(|p| p.step));
    let coefs: Vec<Coefs> = new_steps
        .iter()
        .map(|&new| {
            let mut c = Coefs::new(cfg, new);
            c.stream = stream;
            c
        })
        .collect();
    let chunk = CHUNK;
    let prefix = chunk_starts(params.iter().map(|p| p.numel), chunk);
    let total = *prefix.last().unwrap();
    let one = |ci: usize| {
        let (t, off) = locate(&prefix, ci, chunk);
        let p = &params[t];
        let n = chunk.min(p.numel - off);
        // SAFETY: the caller vouches for the pointers; chunks are disjoint; simd is available.
        unsafe { run_chunk(simd, &coefs[t], p, off, n) };
    };
    if parallel {
        (0..total).into_par_iter().for_each(one);
    } else {
        (0..total).for_each(one);
    }
    for (ptr, s) in steps {
        ptr.write(s);
    }
    Ok(StepOutcome {
        skipped: false,
        simd,
    })
}

/// Whether any gradient element is inf/NaN (the skip check: a read of the gradients only).
fn nonfinite_in_pool(grads: &[RawGrad], simd: Simd, parallel: bool) -> bool {
    grad_stats_in_pool(grads, simd, parallel).1
}

/// Whether each gradient holds an inf/NaN element, in one scan over all of them.
pub(super) fn nonfinite_per_tensor(grads: &[RawGrad], simd: Simd, parallel: bool) -> Vec<bool> {
    let prefix = chunk_starts(grads.iter().map(|g| g.numel), STATS_CHUNK);
    let total = *prefix.last().unwrap();
    let one = |ci: usize| {
        let (t, off) = locate(&prefix, ci, STATS_CHUNK);
        // SAFETY: the caller vouches for the pointers; the chunk lies within the tensor.
        (t, unsafe { grads[t].chunk_stats(simd, off) }.1)
    };
    let found: Vec<(usize, bool)> = if parallel {
        (0..total).into_par_iter().map(one).collect()
    } else {
        (0..total).map(one).collect()
    };
    let mut bad = vec![false; grads.len()];
    for (t, b) in found {
        bad[t] |= b;
    }
    bad
}
