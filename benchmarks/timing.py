"""The one place where time is measured.

`measure(step, sync, settings)`:

1. calls `step()` once and syncs: the first call, tracing and compilation included,
   reported as `compile_s`;
2. makes `warmup` more synced calls, the last of which estimates one call's time;
3. takes up to `iters` samples; a sample is `n` back-to-back calls followed by one
   `sync` (JAX: `jax.block_until_ready`; torch: `torch.cuda.synchronize`), divided
   by `n`. `n` is chosen so that a sample lasts about `sample_ms` (at most
   `max_calls`): short kernels are then timed at the device's pace, with the host's
   dispatch latency hidden behind execution as in a training step (the way
   `triton.testing.do_bench` launches), not one Python round trip each. Long calls
   get `n = 1`. Sampling stops once `timed_seconds` are spent (after 3 samples).

The result is the median sample. JAX and torch are timed by this same code.

`time_limit(seconds)` raises `MeasurementTimeout` in the main thread when a whole
measurement (compilation included) runs too long; it interrupts Python code (such as
torch.compile) but not a running kernel or an XLA compilation, which finish first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    warmup: int = 3
    iters: int = 20
    timed_seconds: float = 2.0
    sample_ms: float = 10.0
    max_calls: int = 200


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    first_call_s: float  # compilation included
    samples: int
    calls_per_sample: int


class MeasurementTimeout(Exception):
    pass


def measure(
    step: Callable[[], Any], sync: Callable[[Any], Any], settings: TimingSettings
) -> Timing:
    def synced_call() -> float:
        t = time.perf_counter()
        sync(step())
        return time.perf_counter() - t

    first = synced_call()
    single = first
    for _ in range(max(1, settings.warmup)):
        single = synced_call()
    n = max(1, min(settings.max_calls, math.ceil(1e-3 * settings.sample_ms / single)))
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max(1, settings.iters):
        t = time.perf_counter()
        for _ in range(n):
            out = step()
        sync(out)
        samples.append((time.perf_counter() - t) / n)
        del out
        if len(samples) >= 3 and time.perf_counter() - start > settings.timed_seconds:
            break
    return Timing(1e3 * statistics.median(samples), first, len(samples), n)


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise `MeasurementTimeout` after `seconds` (main thread, Unix only)."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise MeasurementTimeout(f"exceeded the time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
