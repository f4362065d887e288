"""The CPU emulation of the GPU tier: with GMTIER_EMULATE_GPU_TIER=1 and a GPU budget on a CPU
run, the tier's arena is host memory and these stand-ins replace torch.cuda's streams and events,
deferring copies as a GPU does, so the tier's bookkeeping, ordering, prefetch and gradient
staging are tested (and compared with resident training) without a GPU."""

from __future__ import annotations

import contextlib
import os
import threading


def emulated() -> bool:
    """Whether a CPU run emulates the GPU tier in host memory (GMTIER_EMULATE_GPU_TIER=1)."""
    return os.environ.get("GMTIER_EMULATE_GPU_TIER") == "1"


class HostStreams:
    """Stand-ins for torch.cuda's streams and events where the tier's arena is host memory.

    Copies are deferred as on a GPU: a copy enqueued on a side stream runs only when something
    waits for an event recorded after it (the compute stream waiting on it, `synchronize`), or
    when its event is queried a second time (the copy engine got to it meanwhile). So a kernel
    that reads a slot before waiting for its copy, a RAM record unpinned before the copy that
    reads it ran, or a staging slot refilled before its dW left, all compute with the wrong
    bytes, and the emulated runs' comparisons with resident training catch them. Compute is
    immediate (torch on the CPU): the compute stream never has work pending."""

    class Stream:
        def __init__(self, device=None):
            self.ops: list = []  # deferred copies, in order
            self.done = 0  # how many of them ran
            self.lock = threading.Lock()

        def enqueue(self, op) -> None:
            with self.lock:
                self.ops.append(op)

        def run_to(self, upto: int) -> None:
            with self.lock:
                while self.done < upto:
                    self.ops[self.done]()
                    self.ops[self.done] = None
                    self.done += 1

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
