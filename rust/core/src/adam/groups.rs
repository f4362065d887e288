//! What the grouped AdamW calls share, whatever the state's layout (fp32 or compact): checking
//! the group ends, which groups skip for a non-finite gradient, the tensors left to update, and
//! each distinct step counter's next value.

use super::pool::nonfinite_per_tensor;
use super::{AdamError, RawGrad, Simd};

/// Group `i` is `tensors[group_ends[i - 1]..group_ends[i]]`: the ends must rise to `n`.
pub(super) fn check_group_ends(group_ends: &[usize], n: usize) -> Result<(), AdamError> {
    if group_ends.windows(2).any(|w| w[0] > w[1]) || group_ends.last().copied().unwrap_or(0) != n {
        return Err(AdamError::Invalid(format!(
            "group ends {group_ends:?} must rise to the number of tensors ({n})"
        )));
    }
    Ok(())
}

/// Per group, whether it skips: one of its gradients holds an inf/NaN (checked only with
/// `check_finite`; one scan for all groups). Also returns each tensor's group.
///
/// # Safety
/// The gradients' pointers are valid for their lengths.
pub(super) unsafe fn skipped_groups(
    grads: &[RawGrad],
    group_ends: &[usize],
    check_finite: bool,
    simd: Simd,
    parallel: bool,
) -> (Vec<usize>, Vec<bool>) {
    let mut group_of = Vec::with_capacity(grads.len());
    let mut start = 0;
    for (g, &end) in group_ends.iter().enumerate() {
        group_of.extend(std::iter::repeat_n(g, end - start));
        start = end;
    }
    let mut skipped = vec![false; group_ends.len()];
    if check_finite {
        for (t, bad) in nonfinite_per_tensor(grads, simd, parallel)
            .into_iter()
            .enumerate()
        {
            skipped[group_of[t]] |= bad;
        }
    }
    (group_of, skipped)
}

/// The tensors of the groups that do not skip.
pub(super) fn live<T: Copy>(tensors: &[T], group_of: &[usize], skipped: &[bool]) -> Vec<T> {
    tensors
        .iter()
        .zip(group_of)
        .filter(|(_, &g)| !skipped[g])
        .map(|(t, _)| *t)
        .collect()
}

/// The step each tensor updates with (its counter + 1; tensors may share a counter, which then
/// counts once), and the counters to write once the update is done.
///
/// # Safety
/// Every pointer is valid for reads.
pub(super) unsafe fn next_steps(
    counters: impl Iterator<Item = *mut i64>,
) -> (Vec<i64>, Vec<(*mut i64, i64)>) {
    let mut writes: Vec<(*mut i64, i64)> = Vec::new();
    let mut per_tensor = Vec::new();
    for ptr in counters {
        let s = match writes.iter().find(|(p, _)| *p == ptr) {
            Some(&(_, s)) => s,
            None => {
                let s = ptr.read().saturating_add(1).max(1);
                writes.push((ptr, s));
                s
            }
        };
        per_tensor.push(s);
    }
    (per_tensor, writes)
}
