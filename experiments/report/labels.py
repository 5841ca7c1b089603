"""How the reports order, name and format things: compressors, datasets, BatchNorm modes, intervals, cells."""

from __future__ import annotations

import numpy as np
from scipy import stats

from experiments.reproduce.presets import PRESETS
from trustsgd_jax import compress

SPEC_ORDER = PRESETS["paper"]["compressors"]  # the paper's order of algorithms
DATASET_ORDER = ["cifar10", "cifar100", "mnist"]
MODE_ORDER = ["eval", "train"]


def spec_key(spec: str) -> tuple[int, str]:
    return (SPEC_ORDER.index(spec), spec) if spec in SPEC_ORDER else (len(SPEC_ORDER), spec)


def spec_label(spec: str) -> str:
    """How the reports name a compressor spec (the spec itself where it is none they know)."""
    parsed = parsed_spec(spec)
    if parsed is None:
        return spec
    kind, arg = parsed
    return {
        "none": "SGD (uncompressed)",
        "powersgd": f"PowerSGD rank {arg}",
        "topk_level": f"Top-K level {arg}",
        "topk": f"Top-K ratio {arg}",
        "randomk": f"Random-K ratio {arg}",
        "qsgd": f"QSGD {arg} levels",
        "signsgd": "EF-SignSGD",
    }.get(kind, spec)


# The families the figures draw a line of, by kind.
FAMILY_NAMES = {"powersgd": "PowerSGD", "topk_level": "Top-K"}


def parsed_spec(spec: str) -> compress.Spec | None:
    """`compress.parse_spec` of a record's spec; None for one it does not know (a record of older code)."""
    try:
        return compress.parse_spec(spec)
    except ValueError:
        return None


def spec_kind(spec: str) -> str | None:
    """The kind of a compressor spec (``powersgd`` of ``powersgd:4``); None for a spec `compress` does not know."""
    parsed = parsed_spec(spec)
    return parsed.kind if parsed else None


def mode_of(r) -> tuple[str, str]:
    """(BatchNorm mode, observer) of a record; records older than these fields were eval-mode worker messages."""
    return r.get("bn_statistics", "eval"), r.get("observer", "worker")


def mode_label(mode) -> str:
    bn, observer = mode
    return f"BatchNorm {bn} mode, {observer} observer"


def mode_key(mode: tuple[str, str]) -> tuple[int, str, str]:
    bn, observer = mode
    return (MODE_ORDER.index(bn) if bn in MODE_ORDER else 9, bn, observer)


def dataset_key(d: str) -> tuple[int, str]:
    return (DATASET_ORDER.index(d) if d in DATASET_ORDER else 9, d)


def interval95(values) -> tuple[float, float] | None:
    """Student-t 95% interval of the mean SSIM over images, clipped to SSIM's range [-1, 1] (None below 2 images)."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return None
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return float(max(v.mean() - half, -1.0)), float(min(v.mean() + half, 1.0))


def fmt(v, spec: str) -> str:
    """`v` formatted by `spec`; empty for None."""
    return "" if v is None else format(v, spec)


def ci_text(ci) -> str:
    """An interval as ``[lo, hi]``; empty for None."""
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def mean_ci(r: dict, key: str) -> str:
    """A row's ``{key}_mean`` with its interval ``{key}_ci``; empty where the row has no such mean."""
    if f"{key}_mean" not in r:
        return ""
    return f"{r[f'{key}_mean']:.3f} {ci_text(r.get(f'{key}_ci'))}".strip()


def metric_cell(m: dict | None, k: str) -> str:
    """An attack's metric `k` with its bootstrap interval; ``-`` where the attack or metric is missing."""
    if not m or k not in m:
        return "-"
    lo_hi = m.get(f"{k}_ci")
    return f"{m[k]:.3f}" + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "")
