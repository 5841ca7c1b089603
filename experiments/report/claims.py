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
``claims.md``. Table 1's cells come from gradinv records (`cells`): per
(dataset, victim state, BatchNorm mode, attacker, configuration) the SSIM of
each image and the code revisions that produced them (`mixed_revisions`
flags a cell from more than one).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

from experiments import paper_values
from experiments.reproduce.presets import PAPER_COMPRESSORS

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


def summary_lines(rows: Sequence[dict]) -> list[str]:
    """One Markdown bullet per (claim, attacker): how many settings hold, are contradicted, are undecided."""
    return [
        f"- {claim} ({attacker} attacker): holds in {c['holds']}, contradicted in {c['contradicted']}, undecided in "
        f"{c['undecided']} (paired 95% intervals; claims.md)"
        for (claim, attacker), c in sorted(tally(rows).items())
    ]


def tally(rows: Sequence[dict]) -> dict[tuple[str, str], dict[str, int]]:
    """{(claim, attacker): {verdict: count}}: the summary line of each claim."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for r in rows:
        counts = out.setdefault((r["claim"], r["attacker"]), {v: 0 for v in VERDICTS})
        counts[r["verdict"]] += 1
    return out


# ---------------------------------------------------------------- Table 1: cells and claims from records


ATTACKERS = ("observed", "strongest")
DATASETS = ("mnist", "cifar10", "cifar100")
CONFIGS = tuple(PAPER_COMPRESSORS)  # the order of the tables and the figure
RANKS = (1, 2, 4, 30, 50)
# "Near zero": a reconstruction whose SSIM with the original stays below this shows no recognisable structure (the
# train-mode controls, where nothing is recovered, score -0.01..0.05). The claim holds where the interval of the
# cell's mean SSIM lies below it.
NEAR_ZERO = 0.1


def victim_label(r: dict) -> str:
    step = r.get("attack_step", 0)
    return "init" if not step else f"step {step}"


def bn_label(r: dict) -> str:
    """BatchNorm synchronisation and statistics, and the observer where it is not worker 0's own link."""
    observer = r.get("observer", "worker")
    return f"{r.get('batchnorm', 'sync')}-{r['bn_statistics']}" + ("" if observer == "worker" else f" ({observer})")


def attacker_scores(r: dict) -> dict[str, list[float]]:
    """Per-image SSIM of each attacker this record gives (observed, strongest)."""
    out = {}
    if r["threat"] == "strongest":
        out["strongest"] = r["ssim"]
        if "observed" in r.get("candidate_ssim", {}):
            out["observed"] = r["candidate_ssim"]["observed"]
    elif r["threat"] == "observed":
        out["observed"] = r["ssim"]
    return out


def cells(records: list[dict]) -> dict[tuple, dict]:
    """{(dataset, victim, bn_mode, attacker, compressor): {"ssim": {image: value}, "revisions": set, ...}}."""
    out: dict[tuple, dict] = defaultdict(lambda: {"ssim": {}, "revisions": set(), "devices": set(), "records": []})
    for r in records:
        for attacker, values in attacker_scores(r).items():
            cell = out[(r["dataset"], victim_label(r), bn_label(r), attacker, r["compressor"])]
            for image, value in zip(r["image_ids"], values, strict=True):
                cell["ssim"][int(image)] = float(value)
            cell["revisions"].add(r.get("code_revision", "unknown"))
            cell["devices"].add(r.get("devices", "unknown"))
            cell["records"].append(r)
    return dict(out)


def mixed_revisions(cell_map: dict[tuple, dict]) -> list[tuple]:
    """The cells whose records come from more than one code revision (or an unrecorded one)."""
    return [k for k, c in cell_map.items() if len(c["revisions"]) > 1 or "unknown" in c["revisions"]]


def table_rows(cell_map: dict[tuple, dict]) -> list[dict]:
    rows = []
    for (dataset, victim, bn, attacker, spec), c in sorted(cell_map.items(), key=_cell_order):
        iv = mean_interval(list(c["ssim"].values()))
        paper = paper_values.TABLE1.get(dataset, {}).get(spec, (math.nan, math.nan))
        rows.append(
            dict(
                dataset=dataset,
                victim=victim,
                bn_mode=bn,
                attacker=attacker,
                configuration=spec,
                model=c["records"][0].get("model", "?"),
                n=iv.n,
                mean=iv.mean,
                lo=iv.lo,
                hi=iv.hi,
                paper_mean=paper[0],
                paper_std=paper[1],
                revisions=len(c["revisions"]),
                mixed=len(c["revisions"]) > 1 or "unknown" in c["revisions"],
            )
        )
    return rows


def _cell_order(item) -> tuple:
    dataset, victim, bn, attacker, spec = item[0]
    d = DATASETS.index(dataset) if dataset in DATASETS else len(DATASETS)
    s = CONFIGS.index(spec) if spec in CONFIGS else len(CONFIGS)
    return (victim != "init", victim, bn, d, dataset, ATTACKERS.index(attacker), s, spec)


def claim_rows(cell_map: dict[tuple, dict]) -> list[dict]:
    """Every claim of the paper, per (dataset, victim, BatchNorm mode, attacker), where both cells exist."""
    settings = sorted({k[:4] for k in cell_map}, key=lambda k: (k[1], k[2], k[0], k[3]))
    rows = []
    for dataset, victim, bn, attacker in settings:
        info = dict(dataset=dataset, victim=victim, bn_mode=bn, attacker=attacker)

        def ssim(spec, key=(dataset, victim, bn, attacker)):
            cell = cell_map.get((*key, spec))
            return None if cell is None else cell["ssim"]

        def pair(claim, a, b, info=info):
            sa, sb = ssim(a), ssim(b)
            if sa is not None and sb is not None:
                rows.append(claim_row(claim, info, a, b, paired_interval(sa, sb)))

        for spec in CONFIGS[1:]:
            pair("SGD leaks more than the compressor", "none", spec)
        for low, high in [*zip(RANKS, RANKS[1:]), (RANKS[0], RANKS[-1])]:
            pair("PowerSGD leakage grows with rank", f"powersgd:{high}", f"powersgd:{low}")
        for r in RANKS:
            pair("Top-K leaks less than PowerSGD at the same wire size", f"powersgd:{r}", f"topk_level:{r}")
        for spec in CONFIGS[1:]:
            sb = ssim(spec)
            if sb is not None:
                bound = {i: NEAR_ZERO for i in sb}
                iv = paired_interval(bound, sb)
                rows.append(claim_row("compression reduces SSIM to near zero", info, f"SSIM {NEAR_ZERO}", spec, iv))
    # MNIST against each CIFAR: different images, so Welch's unpaired interval, per configuration.
    for victim, bn, attacker in sorted({(k[1], k[2], k[3]) for k in cell_map}):
        for other in ("cifar10", "cifar100"):
            for spec in CONFIGS:
                ca, cb = (
                    cell_map.get(("mnist", victim, bn, attacker, spec)),
                    cell_map.get((other, victim, bn, attacker, spec)),
                )
                if ca is None or cb is None:
                    continue
                iv = welch_interval(list(ca["ssim"].values()), list(cb["ssim"].values()))
                info = dict(dataset=f"mnist vs {other} (unpaired)", victim=victim, bn_mode=bn, attacker=attacker)
                rows.append(claim_row("MNIST leaks more than CIFAR", info, f"mnist {spec}", f"{other} {spec}", iv))
    return rows


def beside_committed(fresh: dict[tuple, dict], committed_rows: list[dict], study: str) -> str:
    """Markdown: each fresh cell's SSIM beside the committed study's cell of the same setting (labelled committed)."""
    by = {(r["dataset"], r["victim"], r["bn_mode"], r["attacker"], r["configuration"]): r for r in committed_rows}
    lines = [
        f"| dataset | configuration | victim | BatchNorm | attacker | this run: SSIM (n, images) | committed "
        f"({study}): SSIM [95% CI] (n) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, cell in sorted(fresh.items()):
        values = list(cell["ssim"].values())
        c = by.get(key)
        theirs = "no committed cell" if c is None else f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}] ({c['n']})"
        dataset, victim, bn, attacker, spec = key
        lines.append(
            f"| {dataset} | {spec} | {victim} | {bn} | {attacker} | {np.mean(values):.3f} ({len(values)}, "
            f"{sorted(cell['ssim'])}) | {theirs} |"
        )
    return "\n".join(lines) + "\n"
