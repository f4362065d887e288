"""The CPU emulation of the GPU tier: with GMTIER_EMULATE_GPU_TIER=1 and a GPU budget on a CPU
run, the tier's arena is host memory and these stand-ins replace torch.cuda's streams and events,
deferring copies as a GPU does, so the tier's bookkeeping, ordering, prefetch and gradient
staging are tested (and compared with resident training) without a GPU."""

from __future__ import annotations

import contextlib
import os
import threading
import time


def emulated() -> bool:
    """Whether a CPU run emulates the GPU tier in host memory (GMTIER_EMULATE_GPU_TIER=1)."""
    return os.environ.get("GMTIER_EMULATE_GPU_TIER") == "1"


class HostStreams:
    """Stand-ins for torch.cuda's streams and events where the tier's arena is host memory.

    Copies are deferred as on a GPU: a copy enqueued on a side stream runs when something waits
    for an event recorded after it (the compute stream waiting on it, `synchronize`), when its
    event is queried a second time, or on its own, in order, `copy_engine_delay_s` after it was
    enqueued (the copy engine, a thread that lives while copies come, ending after a second
    without any: what drops the RAM pins of copies nobody waits for, as a GPU's copies finish
    with nobody asking). So a
    kernel that reads a slot before waiting for its copy, a RAM record unpinned before the copy
    that reads it ran, or a staging slot refilled before its dW left, all compute with the wrong
    bytes, and the emulated runs' comparisons with resident training catch them. Compute is
    immediate (torch on the CPU): the compute stream never has work pending."""

    class Stream:
        copy_engine_delay_s = 0.002  # long against the host's next steps, short against a test
        copy_engine_idle_s = 1.0  # the engine thread ends after this long without copies

        def __init__(self, device=None):
            self.ops: list = []  # deferred copies (and host functions), in order
            self.queued_at: list[float] = []  # when each was enqueued
            self.done = 0  # how many of them ran
            self.lock = threading.Lock()
            self._progress = threading.Condition(self.lock)  # the engine sleeps on it
            self._engine = False  # whether the copy engine thread runs

        def enqueue(self, op) -> None:
            with self.lock:
                self.ops.append(op)
                self.queued_at.append(time.monotonic())
                if self._engine:
                    self._progress.notify_all()
                else:
                    self._engine = True
                    threading.Thread(target=self._run_engine, name="gmtier-emulated-copy-engine", daemon=True).start()

        def run_to(self, upto: int) -> None:
            with self.lock:
                self._run_locked(upto)

        def synchronize(self) -> None:
            self.run_to(len(self.ops))

        def _run_locked(self, upto: int) -> None:
            while self.done < upto:
                self.ops[self.done]()
                self.ops[self.done] = None
                self.done += 1
            self._progress.notify_all()

        def _run_engine(self) -> None:
            """Run the pending ops in order, each once its delay is over; end once none has come
            for `copy_engine_idle_s` (one thread for a run of copies, not one per copy)."""
            with self.lock:
                try:
                    while True:
                        if self.done >= len(self.ops):
                            if not self._progress.wait(self.copy_engine_idle_s) and self.done >= len(self.ops):
                                return
                            continue
                        left = self.queued_at[self.done] + self.copy_engine_delay_s - time.monotonic()
                        if left > 0:
                            self._progress.wait(left)  # or until someone else ran them, or more came
                        else:
                            self._run_locked(self.done + 1)
                finally:
                    self._engine = False

        def wait_event(self, event) -> None:
            # The compute stream runs its next kernel now: what it waits for must run first.
            # A side stream waiting on compute (always finished) needs nothing.
            event.synchronize()

        def wait_stream(self, stream) -> None:
            stream.run_to(len(stream.ops))

    class Event:
        def __init__(self, enable_timing: bool = False):
            self.stream, self.upto, self.queried = None, 0, False

        def record(self, stream=None) -> None:
            self.stream = stream
            self.upto = len(stream.ops) if stream is not None else 0
            self.queried = False

        def query(self) -> bool:
            if self.stream is None or self.stream.done >= self.upto:
                return True
            if not self.queried:  # not yet: the copy engine is still busy
                self.queried = True
                return False
            self.synchronize()
            return True

        def synchronize(self) -> None:
            if self.stream is not None:
                self.stream.run_to(self.upto)

        def elapsed_time(self, end) -> float:
            return 0.0

    _compute = Stream()  # never holds work: compute runs at once

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(device=None):
        return HostStreams._compute
