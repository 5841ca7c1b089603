"""Verdicts on the paper's claims from paired differences, computed from the records.

A claim says that configuration ``a`` leaks more than ``b`` in one setting
(dataset, victim state, BatchNorm mode, attacker). Its evidence is the
per-image difference d_i = s_a(i) - s_b(i) over the images attacked in both
cells (the same images: a paired design), and its 95% interval is the
Student-t interval of their mean,

    mean(d) +/- t_{0.975, n-1} * sd(d) / sqrt(n).

The verdict is **holds** when the whole interval lies on the claimed side of
0 (d > 0), **contradicted** when it lies on the other side, and
**undecided** when it contains 0 (or n < 2). Attackers are never mixed: the
observed attacker's column and the strongest attacker's column are separate
claims. Where no pairing exists (two datasets have different images) the
interval is Welch's for a difference of two means, and the row says
``unpaired``.

The rows are written to ``claims.csv`` with the columns of `COLUMNS` and to
``claims.md``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

VERDICTS = ("holds", "contradicted", "undecided")
COLUMNS = ("claim", "dataset", "victim", "bn_mode", "attacker", "a", "b", "n", "mean_diff", "lo", "hi", "verdict")
CONFIDENCE = 0.95


class Interval(NamedTuple):
    n: int
    mean: float
    lo: float
    hi: float


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval of the mean of `values` (NaN bounds where n < 2)."""
    x = np.asarray(values, np.float64)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(n, mean, math.nan, math.nan)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(n, mean, mean - half, mean + half)


def paired_interval(a: Mapping, b: Mapping, confidence: float = CONFIDENCE) -> Interval:
    """Interval of mean(a[i] - b[i]) over the keys (images) present in both."""
    common = sorted(set(a) & set(b))
    return mean_interval([a[i] - b[i] for i in common], confidence)


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Welch's interval of mean(a) - mean(b) for two independent samples; n is len(a) + len(b)."""
    xa, xb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = len(xa) + len(xb)
    if len(xa) < 2 or len(xb) < 2:
        mean = float(xa.mean() - xb.mean()) if len(xa) and len(xb) else math.nan
        return Interval(n, mean, math.nan, math.nan)
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    mean = float(xa.mean() - xb.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(n, mean, mean, mean)
    dof = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof) * se)
    return Interval(n, mean, mean - half, mean + half)


def verdict(interval: Interval) -> str:
    """holds (interval above 0), contradicted (below 0) or undecided (contains 0, or no interval)."""
    if not (math.isfinite(interval.lo) and math.isfinite(interval.hi)):
        return "undecided"
    if interval.lo > 0:
        return "holds"
    if interval.hi < 0:
        return "contradicted"
    return "undecided"


def claim_row(claim: str, cell: Mapping, a: str, b: str, interval: Interval) -> dict:
    """One row of `COLUMNS`: `cell` gives dataset, victim, bn_mode and attacker."""
    return dict(
        claim=claim,
        dataset=cell["dataset"],
        victim=cell["victim"],
        bn_mode=cell["bn_mode"],
        attacker=cell["attacker"],
        a=a,
        b=b,
        n=interval.n,
        mean_diff=interval.mean,
        lo=interval.lo,
        hi=interval.hi,
        verdict=verdict(interval),
    )


def csv_text(rows: Iterable[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS})
    return buf.getvalue()


def _num(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:+.3f}"


def markdown_table(rows: Sequence[dict]) -> str:
    lines = [
        "| claim | dataset | victim | BatchNorm | attacker | a | b | n | mean a - b | 95% interval | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['claim']} | {r['dataset']} | {r['victim']} | {r['bn_mode']} | {r['attacker']} | {r['a']} | "
            f"{r['b']} | {r['n']} | {_num(r['mean_diff'])} | [{_num(r['lo'])}, {_num(r['hi'])}] | "
            f"**{r['verdict']}** |"
        )
    return "\n".join(lines)


def tally(rows: Sequence[dict]) -> dict[tuple[str, str], dict[str, int]]:
    """{(claim, attacker): {verdict: count}}: the summary line of each claim."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for r in rows:
        counts = out.setdefault((r["claim"], r["attacker"]), {v: 0 for v in VERDICTS})
        counts[r["verdict"]] += 1
    return out
