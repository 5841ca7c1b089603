"""Where a compiled program's time goes, per kind of XLA operation, from one `jax.profiler` trace of one call.

XLA's runtime records each executed operation (on CPU a thunk, named after
its HLO instruction: ``ynn_fusion.194``, ``add_bitcast_fusion.20``,
``geqrf.24``) as a trace event on the thread that ran it. `op_profile` runs
the function once under `jax.profiler.trace`, reads the trace back with
`jax.profiler.ProfileData` and sums the events' durations per kind
(`op_kind`). The sum is thread time: with several threads it can exceed the
wall time, and ``busy`` (thread time over wall time x the threads that could
run at once, at most the cores) says how much of the machine the program
kept working. The benchmarks print it; nothing
asserts a time.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
import tempfile
import time
from typing import NamedTuple

import jax

KINDS = ("matmul", "linear algebra", "sort", "scatter/gather", "collective", "data movement", "elementwise")

_MATMUL_LIBRARIES = ("ynn", "xnn", "onednn")  # library fusions XLA:CPU hands its matmuls and convolutions to
_MATMUL = {"dot", "convolution", "conv", "matmul", "gemm"}
_LINALG = ("geqrf", "householder", "orgqr", "potrf", "trsm", "getrf", "gesdd", "gesvd", "syevd", "eigh")
# JAX names an all-reduce instruction after its primitive (psum, pmax, ...): `bench_compress` profiles are full of them.
_COLLECTIVE = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "allreduce",
    "psum",
    "pmax",
    "pmin",
    "ppermute",
    "all_to_all",
    "all_gather",
)
_MOVEMENT = {
    "copy",
    "concatenate",
    "transpose",
    "pad",
    "slice",
    "broadcast",
    "bitcast",
    "reshape",
    "dynamic-slice",
    "dynamic-update-slice",
    "iota",
    "reverse",
}
# Trace events that are the runtime's own bookkeeping around the operations (or its waits inside them).
_RUNTIME = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "PjitFunction", "ParseArguments")
_WAITS = ("Await", "wait for completion")


def op_kind(name: str) -> str:
    """The kind (`KINDS`) of an XLA operation from its instruction name, e.g. ``pad_slice_fusion.3`` -> data movement.

    A fusion is named after the operations it fuses: one with a matmul in it
    is a matmul; one made only of copies, slices, pads, broadcasts and the
    like is data movement; any other is elementwise (arithmetic, selects,
    reductions).
    """
    base = re.sub(r"\.\d+$", "", name.strip()).lower()
    base = base.removeprefix("wrapped_").removesuffix("_fusion").removesuffix("fusion")
    tokens = [t for t in re.split(r"[_.]", base) if t]
    if any(t.startswith(_MATMUL_LIBRARIES) or t in _MATMUL for t in tokens):
        return "matmul"
    if any(t.startswith(_LINALG) for t in tokens):
        return "linear algebra"
    if any(t in ("sort", "topk", "top-k") or t.startswith("approx") for t in tokens):
        return "sort"
    # Before scatter/gather: psum_scatter and all_gather are collectives.
    if base.startswith(_COLLECTIVE) or any(t.startswith(_COLLECTIVE) for t in tokens) or "all-reduce" in base:
        return "collective"
    if any(t in ("scatter", "gather") for t in tokens):
        return "scatter/gather"
    if tokens and all(t in _MOVEMENT for t in tokens):
        return "data movement"
    return "elementwise"


class OpProfile(NamedTuple):
    """One traced call: ``wall_s``; per kind and per operation the thread seconds; the threads that ran any."""

    wall_s: float
    by_kind: dict[str, float]
    by_op: dict[str, float]
    threads: int

    @property
    def thread_s(self) -> float:
        return sum(self.by_kind.values())

    @property
    def busy(self) -> float:
        """Thread time over wall time x the threads that could run at once (no more than the cores): 1.0 = saturated."""
        parallel = max(min(self.threads, os.cpu_count() or 1), 1)
        return self.thread_s / max(self.wall_s * parallel, 1e-12)


def op_profile(f, *args) -> OpProfile:
    """Runs ``f(*args)`` once under the profiler (call it once before, to compile) and sums its operations."""
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            jax.block_until_ready(f(*args))
            wall = time.perf_counter() - t0
        files = sorted(pathlib.Path(d).rglob("*.xplane.pb"))
        if not files:
            raise RuntimeError(f"jax.profiler wrote no trace under {d}: is another profiler session running?")
        trace = jax.profiler.ProfileData.from_file(str(files[-1]))
    by_kind: collections.defaultdict[str, float] = collections.defaultdict(float)
    by_op: collections.defaultdict[str, float] = collections.defaultdict(float)
    threads = set()
    for plane in trace.planes:
        for line in plane.lines:
            if any(e.name.startswith("$") for e in line.events):  # a Python thread: its frames are "$file:line f"
                continue
            for name, seconds in _operation_seconds(line.events):
                by_kind[op_kind(name)] += seconds
                by_op[name] += seconds
                threads.add((plane.name, line.name))
    return OpProfile(wall, dict(by_kind), dict(by_op), len(threads))


def _operation_seconds(events) -> list[tuple[str, float]]:
    """(operation, busy seconds) of one thread's events: outermost operations, less the waits nested in them.

    An operation split over threads appears on each thread that ran a part
    (its tail as ``end: <name>``); the thread that launched it also waits
    inside it for the others (``SlinkyThreadPool::Await``), which is not work.
    """
    evs = sorted(((e.start_ns, e.end_ns, e.name) for e in events), key=lambda t: (t[0], -t[1]))
    waits = [(a, b) for a, b, n in evs if any(w in n for w in _WAITS)]
    out: list[tuple[str, float]] = []
    open_until = -1.0
    for start, end, name in evs:
        if name.startswith(_RUNTIME) or not name or start < open_until:
            continue  # bookkeeping, or nested inside the operation counted already
        open_until = end
        waited = sum(min(b, end) - max(a, start) for a, b in waits if a < end and b > start)
        out.append((name.removeprefix("end: "), max(end - start - waited, 0.0) / 1e9))
    return out


def summary(profile: OpProfile, per: int = 1, unit: str = "call", top: int = 3) -> str:
    """One line: thread ms per `unit` (the call divided by `per`) by kind, the busiest operations, and ``busy``."""
    total = profile.thread_s
    kinds = sorted(profile.by_kind.items(), key=lambda kv: -kv[1])
    ops = sorted(profile.by_op.items(), key=lambda kv: -kv[1])[:top]
    parts = ", ".join(f"{k} {1000 * s / per:.1f} ms ({100 * s / max(total, 1e-12):.0f}%)" for k, s in kinds)
    busiest = ", ".join(f"{name} {1000 * s / per:.2f} ms" for name, s in ops)
    return (
        f"{1000 * total / per:.1f} thread-ms per {unit} on {profile.threads} threads, {os.cpu_count()} cores "
        f"({1000 * profile.wall_s / per:.1f} ms wall, busy {100 * profile.busy:.0f}%): {parts}; busiest: {busiest}"
    )
