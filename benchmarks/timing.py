"""Interleaved timing of compiled calls, for the benchmarks: a slow spell of a shared machine hits every case alike.

On this 2-core machine one benchmark row moved from 8.9 to 13.8 it/s between
two runs of the same program. Timing case after case puts such a spell into
one case's figure; `interleaved` instead runs rounds, each calling every case
once in turn, and `paired_ratio` compares two cases round by round. Each call
must already be compiled (the benchmarks call it once first): these times are
second calls, never compilations. Nothing asserts a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np


def interleaved(calls: Sequence[Callable[[], object]], rounds: int) -> list[list[float]]:
    """Seconds of each call in each round, ``[case][round]``; round r calls every case once, in order.

    A call must block until its result is ready (``jax.block_until_ready``).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, t in zip(calls, times, strict=True):
            t0 = time.perf_counter()
            call()
            t.append(time.perf_counter() - t0)
    return times


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[r] / b[r]: how many times longer case a took than case b in the same round."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_ratio needs the same non-zero number of rounds, got {len(a)} and {len(b)}.")
    return float(np.median(np.asarray(a, float) / np.asarray(b, float)))
