"""Side-by-side timing of libraries that share the CPU: the one helper every ``bench/`` comparison uses.

Calls are interleaved by rounds (a, b, a, b, ...) so that both sides see the same machine load. Each timed
call comes right after one untimed call of the same callable (``settle``): torch's OpenMP workers and
numpy's OpenBLAS workers keep spinning for a few milliseconds after each of their calls, and a call of
another library that starts inside that window runs on contended cores. Measured on a 2-core machine, an
XLA GEMM of 653 x 512 x 2048 float32 timed right after a ``torch.mm`` reached 175-185 GFLOP/s against
250-300 GFLOP/s timed after its own warm-up call. The settling call puts each library in the state it
has inside its own loop (its own workers hot, the other's idle), at twice the bench's time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, settle: int = 1) -> dict[str, list[float]]:
    """Seconds of ``repeats`` timed calls of each callable (which must block until its work is done).

    Round by round, each callable runs ``settle`` untimed calls and then one timed call, the callables
    in the order given. Returns ``{name: [seconds, ...]}`` (``repeats`` values each). Raises
    ``ValueError`` when ``repeats < 1`` or ``settle < 0``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if settle < 0:
        raise ValueError(f"settle must be >= 0, got {settle}")
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            for _ in range(settle):
                fn()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def medians(fns: dict[str, Callable[[], object]], repeats: int, settle: int = 1) -> dict[str, float]:
    """Median seconds of each callable over :func:`interleaved`'s timed calls."""
    return {k: statistics.median(v) for k, v in interleaved(fns, repeats, settle).items()}
