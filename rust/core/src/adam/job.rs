//! A step started on the thread pool that the caller waits on later.

use super::pool::{step_in_pool, thread_pool};
use super::{AdamConfig, AdamError, RawParam, Simd, StepOutcome};
use std::sync::{Arc, Condvar, Mutex};

type JobResult = Option<Result<StepOutcome, AdamError>>;

/// A step running on the thread pool; [`AdamJob::wait`] returns its outcome.
pub struct AdamJob {
    state: Arc<(Mutex<JobResult>, Condvar)>,
}

impl AdamJob {
    /// Block until the step finished; returns its outcome (every call returns the same).
    pub fn wait(&self) -> Result<StepOutcome, AdamError> {
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        while g.is_none() {
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.clone().unwrap()
    }

    /// Whether the step finished.
    pub fn is_done(&self) -> bool {
        self.state
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// Start [`adamw_step_raw`] on the thread pool and return at once.
///
/// # Safety
/// As [`adamw_step_raw`], until [`AdamJob::wait`] returned (or `is_done()` is true): the caller
/// must keep every array alive and untouched until then.
pub unsafe fn adamw_step_raw_async(
    params: Vec<RawParam>,
    cfg: AdamConfig,
    simd: Option<Simd>,
    threads: usize,
) -> AdamJob {
    let state: Arc<(Mutex<JobResult>, Condvar)> = Arc::new((Mutex::new(None), Condvar::new()));
    let job = AdamJob {
        state: state.clone(),
    };
    let finish = move |r: Result<StepOutcome, AdamError>| {
        let (lock, cv) = &*state;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        cv.notify_all();
    };
    let prepared = cfg
        .validate()
        .and_then(|_| Simd::resolve(simd))
        .and_then(|s| thread_pool(threads).map(|p| (s, p)));
    match prepared {
        Err(e) => finish(Err(e)),
        Ok((simd, pool)) => pool.spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: the caller of adamw_step_raw_async vouches for the pointers.
                unsafe { step_in_pool(&params, &cfg, simd, true) }
            }));
            finish(r.unwrap_or_else(|e| {
                let msg = e
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| e.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(AdamError::Panicked(msg))
            }))
        }),
    }
    job
}
