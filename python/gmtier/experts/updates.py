"""Expert updates: dW on its way to pinned RAM -> the CPU AdamW on the record where it lives ->
the record dirty, its GPU copy refreshed, its write-back started, its pins dropped.

Where both tiers hold every record, the dW of up to `grad_group` experts in a row go to RAM in
one copy and are updated by one AdamW job (`config.grad_staging`). With `experts.async_adam`
the jobs run on two worker threads while backward goes on, at most `max_pending` experts
queued or running: their records stay pinned, and the budgets bound how many may be.

The AdamW is the record's kind (`experts.state`): the fp32-state kernel through the store
(`TieredExpertStore.adam_step`), or the compact kernel (`gmtier.compact_adam`) on the record's
bf16 weights, 8-bit moments and block scales, its rounding keyed on (train.seed, expert, step).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

from gmtier import record
from gmtier.compact_adam import CompactTensors, adamw_compact_step
from gmtier.config import Config, ExpertPlan
from gmtier.experts.metrics import RuntimeStats
from gmtier.store import GradsOnHost, TieredExpertStore


def default_adam_threads() -> int:
    """AdamW threads when experts.adam_threads = 0: all cores but two on a big machine, so the
    thread that launches the GPU work and the I/O completions are not starved; all on a small one."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return n - 2 if n >= 8 else n


class ExpertUpdates:
    """The AdamW of the experts whose dW backward produced, in groups, on a worker queue."""

    def __init__(self, cfg: Config, plan: ExpertPlan, store: TieredExpertStore, stats: RuntimeStats):
        t = cfg.train
        self.store, self.stats = store, stats
        self.hyper = dict(beta1=t.beta1, beta2=t.beta2, eps=t.eps, weight_decay=t.weight_decay,
                          threads=cfg.experts.adam_threads or default_adam_threads())
        self.lr, self.grad_scale = t.lr, 1.0
        self.compact, self.seed = cfg.experts.state == "compact", t.seed
        self.group_size, self.max_pending = plan.grad_group, plan.max_pending
        self.step_skipped = 0  # expert updates skipped for inf/NaN gradients in this step
        # Records that stay in RAM are written at the commit only; otherwise each is written as
        # soon as its update is done, overlapping the reads that follow, except those `submit`
        # is told to defer (the step's last ones, `experts.deferred_writes`): nothing follows
        # them in the step to hide their writes, while the next forward leaves the disk idle.
        # They start at `drain` (the step's end); a read that needs such a slot sooner writes it
        # first (the store's eviction), and a commit writes it with the rest.
        self.write_behind = not plan.all_in_ram
        self.deferred: list = []  # updated records whose write-back waits for `drain`
        # Two workers: while one waits for its expert's dW to reach RAM (or does its bookkeeping),
        # the other's AdamW keeps the cores busy; both share one rayon pool. With one worker the
        # `small` step on an H200 ran the AdamW at half the memory bandwidth, and backward waited.
        workers = min(2, self.max_pending)
        # dW host buffers (a group each): one per group of updates that may be queued or running,
        # plus the one being copied.
        store.gpu.reserve_host_grads(-(-self.max_pending // self.group_size) + 2)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="gmtier-adam") if self.max_pending else None
        self.pending: list[tuple[Future, int]] = []  # (update job, its number of experts)

    def begin_step(self, lr: float, grad_scale: float) -> None:
        self.lr, self.grad_scale = lr, grad_scale
        self.step_skipped = 0

    def groups(self, used: list[int]) -> dict[int, list[int]]:
        """Each used expert's group (in the loop's order): the experts whose dW go to RAM
        together and get one AdamW job."""
        size = self.group_size
        return {e: used[i - i % size: i - i % size + size] for i, e in enumerate(used)}

    def submit(self, keys, host: GradsOnHost, defer=()) -> None:
        """With the dW of experts `keys` on their way to pinned RAM (`host`), AdamW on their
        records where they live, in one call (in a worker thread when async); then the records
        are dirty, their GPU copies get the new weights, their write-back starts at once when RAM
        cannot hold every record (so the slots are clean by the time a read needs them; those of
        `defer` at `drain`), and they are released. Waits while the queue is full."""
        lr, scale = self.lr, self.grad_scale
        defer = set(defer) if self.write_behind else set()

        def run():
            t0 = time.perf_counter()
            try:
                host.wait()
                t1 = time.perf_counter()
                step = self._compact_step if self.compact else self.store.adam_step
                skipped = step(keys, host.tensors, lr=lr, grad_scale=scale, **self.hyper)
                t2 = time.perf_counter()
            finally:
                host.release()
            updated = [k for k, skip in zip(keys, skipped) if not skip]  # a skipped update wrote nothing
            later = [k for k in updated if k in defer]
            now = [k for k in updated if k not in defer]
            if updated:
                # Every AdamW writes the whole weights section, so it counts as valid also where
                # backward read only the state (the old weights came from the GPU copy, or none
                # were needed: half-precision weights are rewritten from the fp32 master).
                self.store.mark_dirty(updated, refresh_gpu=True, filled="weights")
            if self.write_behind and now:
                self.store.write_back(now)
            self.store.release(keys)
            times = {"adam_s": time.perf_counter() - t0, "adam_d2h_wait_s": t1 - t0, "adam_kernel_s": t2 - t1}
            return times, skipped, later

        if self.pool is None:
            self._account(run())
            return
        t0 = time.perf_counter()
        while self.pending and sum(n for _, n in self.pending) + len(keys) > self.max_pending:
            self._account(self.pending.pop(0)[0].result())
        self.stats.stats["adam_backlog_s"] += time.perf_counter() - t0
        self.pending.append((self.pool.submit(run), len(keys)))

    def _compact_step(self, keys, grads, lr: float, grad_scale: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, threads: int) -> list[bool]:
        """The compact AdamW on the acquired records of `keys`, one group per expert, in one call
        (each skipped on its own for an inf/NaN gradient). Each weight tensor of each expert has
        its own rounding stream, so the bits depend on (seed, expert, tensor, step) only."""
        groups = []
        for key, g in zip(keys, grads, strict=True):
            rec = self.store.record(key)
            flat = key[0] * self.store.num_experts + key[1]
            groups.append([
                CompactTensors(rec[n].view(-1), *(rec[record.compact(n, p)] for p in record.COMPACT_PARTS),
                               g[n].view(-1), rec[record.STEP], stream=flat * len(record.WEIGHTS) + i)
                for i, n in enumerate(record.WEIGHTS)])
        return adamw_compact_step(groups, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                                  grad_scale=grad_scale, check_finite=True, block=record.COMPACT_BLOCK,
                                  seed=self.seed, threads=threads)

    def _account(self, result) -> None:
        times, skipped, later = result
        self.stats.add_update(times, skipped)
        self.step_skipped += sum(skipped)
        self.deferred += later

    def drain(self) -> None:
        """Wait for every update queued or running; then start the deferred write-backs."""
        t0 = time.perf_counter()
        while self.pending:
            self._account(self.pending.pop(0)[0].result())
        self.stats.stats["adam_backlog_s"] += time.perf_counter() - t0
        if self.deferred:
            self.store.write_back(self.deferred)
            self.deferred = []

    def close(self) -> None:
        self.drain()
        if self.pool is not None:
            self.pool.shutdown()
