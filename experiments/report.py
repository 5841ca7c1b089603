r"""Regenerates every report of a reproduce run from its ``results.jsonl``.

    python -m experiments.report --workdir=runs/reproduce

Writes table1.md / table1.csv (gradient inversion SSIM, the paper's columns
plus PSNR and the adaptive attacker), figure1.png (originals and
reconstructions), ssim_vs_compression.png, table2.md (membership inference),
utility.md (accuracy and wire bytes) and report.md (side by side with the
paper, and which of its claims this run confirms). Missing configurations
(partial runs) leave gaps, never a crash.
"""

from __future__ import annotations

import csv
import io
import itertools
import pathlib
import sys
from collections import defaultdict

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from absl import app, flags
from scipy import stats

from experiments import paper_values
from experiments.presets import PRESETS
from trustsgd_jax import results

matplotlib.use("Agg")  # the reports are files, never a window (pyplot resolves its backend at the first figure)

SPEC_ORDER = PRESETS["paper"]["compressors"]  # the paper's order of algorithms
DATASET_ORDER = ["cifar10", "cifar100", "mnist"]


def _spec_key(spec):
    return (SPEC_ORDER.index(spec), spec) if spec in SPEC_ORDER else (len(SPEC_ORDER), spec)


def _label(spec):
    kind, _, arg = spec.partition(":")
    return {
        "none": "SGD (uncompressed)",
        "powersgd": f"PowerSGD rank {arg}",
        "topk_level": f"Top-K level {arg}",
        "topk": f"Top-K ratio {arg}",
        "randomk": f"Random-K ratio {arg}",
        "qsgd": f"QSGD {arg} levels",
        "signsgd": "EF-SignSGD",
    }.get(kind, spec)


def load(workdir):
    r = results.read_records(pathlib.Path(workdir) / "results.jsonl")
    recs = r.records
    return [x for x in recs if x.get("kind") == "gradinv"], [x for x in recs if x.get("kind") == "mia"], r.damaged_tail


MODE_ORDER = ["eval", "train"]


def _mode(r) -> tuple[str, str]:
    """(BatchNorm mode, observer) of a record; records older than these fields were eval-mode worker messages."""
    return r.get("bn_statistics", "eval"), r.get("observer", "worker")


def mode_label(mode) -> str:
    bn, observer = mode
    return f"BatchNorm {bn} mode, {observer} observer"


def _mode_key(mode):
    bn, observer = mode
    return (MODE_ORDER.index(bn) if bn in MODE_ORDER else 9, bn, observer)


def _dataset_key(d):
    return (DATASET_ORDER.index(d) if d in DATASET_ORDER else 9, d)


def interval95(values) -> tuple[float, float] | None:
    """Student-t 95% interval of the mean SSIM over images, clipped to SSIM's range [-1, 1] (None below 2 images)."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return None
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return float(max(v.mean() - half, -1.0)), float(min(v.mean() + half, 1.0))


ADAPTIVE_CANDIDATES = ("factors", "sent_coordinates")  # objectives.adaptive_objective of each family


def _columns(r) -> dict[str, list]:
    """Per-image SSIM lists a record contributes, by column: its threat, and for `strongest` its candidates."""
    out = {r["threat"]: list(r["ssim"])}
    if r["threat"] == "strongest":
        out["upper_bound"] = list(r["upper_bound_ssim"])
        for name, values in r.get("candidate_ssim", {}).items():
            out[f"candidate:{name}"] = list(values)
    return out


def table1_rows(gradinv_records) -> list[dict]:
    """One row per (dataset, compressor, BatchNorm mode, observer): SSIM of every attacker, PSNR, wire words.

    ``observed`` and ``adaptive`` come from units of those threat models or,
    where a cell has none, from the same objectives run as candidates of a
    ``strongest`` unit (the same attack: same seeds, same selection of
    restarts).
    """
    by = defaultdict(lambda: defaultdict(list))
    psnr = defaultdict(list)
    winners: dict = defaultdict(lambda: defaultdict(int))
    wire, full = {}, {}
    for r in gradinv_records:
        cell = (r["dataset"], r["compressor"], _mode(r))
        for column, values in _columns(r).items():
            by[cell][column] += values
        if r["threat"] == "observed":
            psnr[cell] += r["psnr"]
        elif r["threat"] == "strongest" and "observed" in r.get("candidate_psnr", {}):
            psnr[cell] += r["candidate_psnr"]["observed"]
        for name in r.get("chosen", []) if r["threat"] == "strongest" else []:
            winners[cell][name] += 1
        wire[r["dataset"], r["compressor"]] = r["wire_words"]
        full[r["dataset"]] = r["uncompressed_words"]
    rows = []
    for cell in sorted(by, key=lambda p: (_dataset_key(p[0]), _mode_key(p[2]), _spec_key(p[1]))):
        d, c, m = cell
        cols = by[cell]
        observed = cols.get("observed") or cols.get("candidate:observed")
        adaptive = cols.get("adaptive") or next(
            (cols[f"candidate:{k}"] for k in ADAPTIVE_CANDIDATES if f"candidate:{k}" in cols), None
        )
        base = by.get((d, "none", m), {})
        base_obs = base.get("observed") or base.get("candidate:observed")
        row = {
            "dataset": d,
            "compressor": c,
            "bn_statistics": m[0],
            "observer": m[1],
            "n_images": len(observed or cols.get("strongest") or adaptive or []),
            "wire_words": wire[d, c],
            "wire_ratio": wire[d, c] / full[d],
        }
        for key, values in (
            ("ssim", observed),
            ("adaptive_ssim", adaptive),
            ("strongest_ssim", cols.get("strongest")),
            ("upper_bound_ssim", cols.get("upper_bound")),
        ):
            if values:
                row.update(
                    {
                        f"{key}_mean": float(np.mean(values)),
                        f"{key}_std": float(np.std(values)),
                        f"{key}_ci": interval95(values),
                    }
                )
        if observed and base_obs:
            row["pct_of_sgd"] = 100.0 * row["ssim_mean"] / float(np.mean(base_obs))
        if psnr[cell]:
            row["psnr_mean"] = float(np.mean(psnr[cell]))
        if winners[cell]:
            row["winners"] = dict(winners[cell])
        rows.append(row)
    return rows


CSV_FIELDS = [
    "dataset",
    "compressor",
    "bn_statistics",
    "observer",
    "n_images",
    "ssim_mean",
    "ssim_std",
    "pct_of_sgd",
    "psnr_mean",
    "adaptive_ssim_mean",
    "adaptive_ssim_std",
    "strongest_ssim_mean",
    "strongest_ssim_std",
    "upper_bound_ssim_mean",
    "wire_words",
    "wire_ratio",
]


def _f(v, fmt):
    return "" if v is None else format(v, fmt)


def _ci(ci) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _mean_ci(r, key) -> str:
    if f"{key}_mean" not in r:
        return ""
    return f"{r[f'{key}_mean']:.3f} {_ci(r.get(f'{key}_ci'))}".strip()


def table1_markdown(rows, paper_setting: str) -> str:
    out = [
        "# Table 1: gradient inversion (SSIM of reconstructions)",
        "",
        f"Setting of this run: {paper_setting}. Each victim batch is worker 0's batch in a real data-parallel "
        "round; the 'worker' observer sees worker 0's message (with PowerSGD, the P_hat of all workers). "
        "BatchNorm 'train' mode is what training sends; 'eval' mode (running averages) is Geiping et al.'s "
        "setting. Attackers: "
        "'observed' is the paper's (matches the decompressed message); 'adaptive' the consistent compression-aware "
        "objective of the compressor's family; 'strongest' keeps, per image, the candidate whose own message is "
        "closest to the one seen (no ground truth), and names the winners; the 'upper bound' is the best candidate "
        "per image by SSIM, which only an auditor holding the originals can pick. % of SGD = observed SSIM "
        "relative to SGD on the same images and mode. Brackets: Student-t 95% intervals of the mean over images.",
        "",
    ]
    for d in sorted({r["dataset"] for r in rows}, key=_dataset_key):
        for m in sorted({(r["bn_statistics"], r["observer"]) for r in rows if r["dataset"] == d}, key=_mode_key):
            out += [f"## {d}, {mode_label(m)}", ""] + results.markdown_table(
                [
                    "algorithm",
                    "observed SSIM",
                    "% of SGD",
                    "PSNR dB",
                    "adaptive SSIM",
                    "strongest SSIM",
                    "strongest's winners",
                    "upper bound",
                    "words/step",
                    "wire ratio",
                    "images",
                ],
                [
                    [
                        _label(r["compressor"]),
                        _mean_ci(r, "ssim"),
                        _f(r.get("pct_of_sgd"), ".1f") + ("%" if "pct_of_sgd" in r else ""),
                        _f(r.get("psnr_mean"), ".2f"),
                        _mean_ci(r, "adaptive_ssim"),
                        _mean_ci(r, "strongest_ssim"),
                        ", ".join(f"{k} {v}" for k, v in sorted(r.get("winners", {}).items())),
                        _mean_ci(r, "upper_bound_ssim"),
                        r["wire_words"],
                        f"{r['wire_ratio']:.4f}",
                        r["n_images"],
                    ]
                    for r in rows
                    if r["dataset"] == d and (r["bn_statistics"], r["observer"]) == m
                ],
            )
            out.append("")
    return "\n".join(out)


def write_csv(rows, path):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    results.write_atomic(path, buf.getvalue())


def mia_rows(mia_records) -> list[dict]:
    rows = []
    for r in sorted(mia_records, key=lambda r: (r["dataset"], _spec_key(r["compressor"]))):
        rows.append(
            dict(
                dataset=r["dataset"],
                compressor=r["compressor"],
                attacks=r["attacks"],
                test_accuracy=r["test_accuracy"],
                wire=r["wire"],
                shadows=r["mia_shadows"],
                steps=r["mia_steps"],
                train_accuracy=r.get("train_accuracy"),
                shadow_test_accuracy=r.get("shadow_test_accuracy"),
                snapshots=r.get("snapshots")
                or [dict(step=r["mia_steps"], test_accuracy=r["test_accuracy"], attacks=r["attacks"])],
                budgets=r.get("budgets", []),
            )
        )
    return rows


CONVERGED_TRAIN_ACCURACY = 0.99  # a MIA row below this train accuracy is labelled underfit


def fit_label(r) -> str:
    """'converged' / 'underfit' by the target's train accuracy, '?' for records from before it was kept."""
    acc = r.get("train_accuracy")
    if acc is None:
        return "?"
    return "converged" if acc >= CONVERGED_TRAIN_ACCURACY else "underfit"


MIA_HEADLINE = (
    "rmia_online",
    "rmia_offline",
    "lira_online",
    "lira_offline",
    "loss",
)  # the rows the budget and matched tables show


def utility_matched(rows) -> list[dict]:
    """Per dataset, each compressor's snapshot whose target test accuracy is closest to a common level.

    The level is the smallest, over the dataset's compressors, of their best
    snapshot test accuracy, so every compressor has a snapshot at or above
    it. Each entry keeps its ``gap`` (accuracy minus level) and ``matched``:
    False when the record has a single snapshot (nothing to choose from) or
    the gap exceeds `UTILITY_TOLERANCE`. A comparison there holds utility
    fixed instead of the step count. (The accuracy is measured on the pool's
    non-members, the same images the attacks score as non-members.)
    """
    out = []
    for d in sorted({r["dataset"] for r in rows}):
        rs = [r for r in rows if r["dataset"] == d]
        level = min(max(s["test_accuracy"] for s in r["snapshots"]) for r in rs)
        for r in rs:
            snap = min(r["snapshots"], key=lambda s: (abs(s["test_accuracy"] - level), s["step"]))
            gap = snap["test_accuracy"] - level
            matched = len(r["snapshots"]) > 1 and abs(gap) <= UTILITY_TOLERANCE
            out.append(dict(dataset=d, compressor=r["compressor"], level=level, gap=gap, matched=matched, **snap))
    return out


UTILITY_TOLERANCE = 0.02  # test accuracy within 2 points of the common level counts as matched


def _metric_cell(m, k) -> str:
    if not m or k not in m:
        return "-"
    lo_hi = m.get(f"{k}_ci")
    return f"{m[k]:.3f}" + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "")


def mia_matched_markdown(rows) -> str:
    """Matched steps (the final models) against matched utility (`utility_matched`), per dataset and compressor."""
    out = [
        "# Membership inference at matched steps and at matched utility",
        "",
        "Matched steps: every compressor's final models (the same step count). Matched utility: each compressor's "
        "snapshot whose target test accuracy is closest to the level that every compressor of the dataset "
        "reaches (the smallest of their best accuracies); a gap above 0.02, or a run with one snapshot only, is "
        "marked as not matched. Online RMIA and LiRA from the same references; brackets are 95% bootstrap "
        "intervals over examples.",
        "",
    ]
    matched = utility_matched(rows)
    for d in sorted({r["dataset"] for r in rows}):
        cells = []
        for r in (r for r in rows if r["dataset"] == d):
            final = r["snapshots"][-1]
            u = next(m for m in matched if m["dataset"] == d and m["compressor"] == r["compressor"])
            utility_label = "matched utility" if u["matched"] else f"utility NOT matched (gap {u['gap']:+.3f})"
            for label, snap in (("matched steps", final), (utility_label, u)):
                a = snap["attacks"]
                cells.append(
                    [
                        _label(r["compressor"]),
                        label,
                        snap["step"],
                        "-" if snap.get("train_accuracy") is None else f"{snap['train_accuracy']:.3f}",
                        f"{snap['test_accuracy']:.3f}",
                        _metric_cell(a.get("rmia_online"), "auc"),
                        _metric_cell(a.get("rmia_online"), "tpr@1%fpr"),
                        _metric_cell(a.get("lira_online"), "auc"),
                        _metric_cell(a.get("lira_online"), "tpr@1%fpr"),
                        _metric_cell(a.get("loss"), "auc"),
                    ]
                )
        level = next(m["level"] for m in matched if m["dataset"] == d)
        out += [f"## {d} (utility level {level:.3f})", ""] + results.markdown_table(
            [
                "algorithm",
                "comparison",
                "step",
                "train acc",
                "test acc",
                "RMIA AUC",
                "RMIA TPR@1%FPR",
                "LiRA AUC",
                "LiRA TPR@1%FPR",
                "loss AUC",
            ],
            cells,
        )
        out.append("")
    return "\n".join(out) + "\n"


def mia_budget_markdown(rows) -> str:
    """Reference-budget curves: each headline attack's AUC and TPR at low FPR against the number of references."""
    out = [
        "# Membership inference against the number of reference models",
        "",
        "Final models. For k references: the mean over up to 4 disjoint blocks of k references, the range over "
        "the blocks in parentheses, and the first block's 95% bootstrap interval in brackets. RMIA's a is tuned on "
        "the block itself where k >= 3 and fixed at 0.5 below; online attacks need k >= 2. With k = 1 only the "
        "examples the one reference did not train on are scored (examples column). LiRA's global variance pools "
        "the spread within examples from 2 IN and 2 OUT references per example on, the spread of all values below.",
        "",
    ]
    for r in (r for r in rows if r["budgets"]):
        cells = []
        for b in r["budgets"]:
            for name in MIA_HEADLINE:
                m = b["attacks"].get(name)
                if not m:
                    continue

                def cell(k, m=m):
                    lo, hi = m[f"{k}_range"]
                    ci = m.get(f"{k}_ci")
                    return f"{m[k]:.3f} ({lo:.3f}-{hi:.3f})" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

                cells.append(
                    [
                        b["references"],
                        b["subsets"],
                        b.get("examples", "-"),
                        b.get("variance_pooling", "-") if name.startswith("lira") else "-",
                        name,
                        cell("auc"),
                        cell("tpr@1%fpr"),
                        cell("tpr@0.1%fpr"),
                    ]
                )
        out += [f"## {r['dataset']}, {_label(r['compressor'])}", ""] + results.markdown_table(
            ["references k", "blocks", "examples", "LiRA variance", "attack", "AUC", "TPR@1%FPR", "TPR@0.1%FPR"], cells
        )
        out.append("")
    return "\n".join(out) + "\n"


def budget_figure(rows, path) -> bool:
    """AUC and TPR at 1% / 0.1% FPR against k (log2 axis): a row of panels per dataset, a colour per attack and a
    line style per compressor."""
    rs = [r for r in rows if r["budgets"]]
    if not rs:
        return False
    datasets = sorted({r["dataset"] for r in rs}, key=_dataset_key)
    fig, axes = plt.subplots(len(datasets), 3, figsize=(13, 3.6 * len(datasets)), squeeze=False)
    styles = ("-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3)))
    for row_axes, d in zip(axes, datasets, strict=True):
        specs = [r for r in rs if r["dataset"] == d]
        for r, style in zip(specs, itertools.cycle(styles)):
            for colour, name in enumerate(MIA_HEADLINE):
                got = [b for b in r["budgets"] if name in b["attacks"]]
                for ax, metric in zip(row_axes, BUDGET_METRICS, strict=True):
                    ax.plot(
                        [b["references"] for b in got],
                        [max(b["attacks"][name][metric], 1e-4) for b in got],
                        linestyle=style,
                        color=f"C{colour}",
                        marker="o",
                        ms=3,
                        label=f"{_label(r['compressor'])}: {name}",
                    )
        for ax, metric in zip(row_axes, BUDGET_METRICS, strict=True):
            ax.set_xscale("log", base=2)
            if metric != "auc":
                ax.set_yscale("log")
            ax.set(xlabel="reference models k", ylabel=metric, title=f"{d}: {metric}")
        row_axes[-1].legend(fontsize=5, loc="best")
    fig.tight_layout()
    results.save_figure(fig, path, dpi=110)
    return True


BUDGET_METRICS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr")


def table2_markdown(rows) -> str:
    out = [
        "# Table 2: membership inference",
        "",
        "Accuracy columns: the **oracle** balanced accuracy (best threshold chosen on the evaluation set itself), "
        "which is what the paper's Table 2 reports; **calibrated** accuracy uses a threshold chosen on the shadow "
        "models' known members and non-members, never on the evaluation set (LiRA: likelihood ratio 0). AUC and "
        "TPR at 1% / 0.1% FPR follow Carlini et al. 2022; brackets are 95% bootstrap intervals. The paper's "
        "'cross-entropy MIA' is reported here as the entropy attack; Mentr is Song & Mittal's modified entropy. "
        "LiRA (Carlini et al. 2022) and RMIA (Zarifzadeh, Liu and Shokri, ICML 2024) are scored from the same "
        "reference (shadow) models; the columns show their online forms, RMIA against a population of images in no "
        "model's training set. LiRA uses a global variance below 64 references, as the LiRA paper recommends.",
        "",
    ]
    for d in sorted({r["dataset"] for r in rows}):
        cells = []
        for r in (r for r in rows if r["dataset"] == d):
            a = r["attacks"]
            lira = a.get("lira_online") or a.get("lira_offline") or {}

            def acc(name, a=a):
                m = a.get(name, {})
                cal = m.get("calibrated_acc")
                return (
                    f"{100 * m['oracle_acc']:.2f}% / " + (f"{100 * cal:.2f}%" if cal is not None else "-") if m else "-"
                )

            def ci(m, k):
                if not m or k not in m:
                    return "-"
                lo_hi = m.get(f"{k}_ci")
                return f"{m[k]:.3f}" + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "")

            rmia = a.get("rmia_online") or a.get("rmia_offline") or {}
            train_acc = r.get("train_accuracy")
            cells.append(
                [
                    _label(r["compressor"]),
                    r["steps"],
                    "-" if train_acc is None else f"{train_acc:.3f}",
                    f"{r['test_accuracy']:.3f}",
                    fit_label(r),
                    acc("confidence"),
                    acc("loss"),
                    acc("entropy"),
                    ci(a.get("loss"), "auc"),
                    ci(a.get("mentr"), "auc"),
                    ci(lira, "auc"),
                    ci(lira, "tpr@1%fpr"),
                    ci(lira, "tpr@0.1%fpr"),
                    ci(rmia, "auc"),
                    ci(rmia, "tpr@1%fpr"),
                    ci(rmia, "tpr@0.1%fpr"),
                    ci(a.get("loss"), "tpr@1%fpr"),
                ]
            )
        out += [f"## {d}", ""] + results.markdown_table(
            [
                "algorithm",
                "steps",
                "train acc",
                "test acc",
                "fit",
                "confidence acc (oracle / calibrated)",
                "loss acc (oracle / calibrated)",
                "entropy acc (oracle / calibrated)",
                "loss AUC",
                "Mentr AUC",
                "LiRA AUC",
                "LiRA TPR@1%FPR",
                "LiRA TPR@0.1%FPR",
                "RMIA AUC",
                "RMIA TPR@1%FPR",
                "RMIA TPR@0.1%FPR",
                "loss TPR@1%FPR",
            ],
            cells,
        )
        n = rows[0]["attacks"]["loss"]
        out += [
            "",
            f"{n['n_members']} members / {n['n_nonmembers']} non-members per configuration; below "
            f"1/{n['n_nonmembers']} FPR the TPR is interpolated. Train acc: the target on its own members; test acc: "
            f"on the pool's non-members; fit: 'converged' at train accuracy >= {CONVERGED_TRAIN_ACCURACY}, else "
            "'underfit' (a comparison between underfit models measures their utility as much as their leakage).",
            "",
        ]
    return "\n".join(out)


def utility_markdown(mrows) -> str:
    out = [
        "# Utility: accuracy and wire cost of each training configuration",
        "",
        "Test accuracy of the MIA target model (trained on half of the pool) on the held-out half; words and "
        "bytes one worker puts on the wire per step (gradient message + synchronised BatchNorm statistics).",
        "",
    ]
    out += results.markdown_table(
        ["dataset", "algorithm", "test accuracy", "words/step", "bytes/step", "vs uncompressed"],
        [
            [
                r["dataset"],
                _label(r["compressor"]),
                f"{r['test_accuracy']:.4f}",
                r["wire"]["words"],
                r["wire"]["bytes"],
                f"{r['wire']['words'] / r['wire']['uncompressed_words']:.4f}",
            ]
            for r in mrows
        ],
    )
    return "\n".join(out) + "\n"


def figure1(gradinv_records, workdir, path):
    """Originals and observed-attacker reconstructions: one row per image, dataset and BatchNorm mode.

    The observed attacker's images come from its own units or from the
    ``observed`` candidate of ``strongest`` units.
    """
    obs = [r for r in gradinv_records if r["threat"] in ("observed", "strongest") and _mode(r)[1] == "worker"]
    specs = sorted({r["compressor"] for r in obs}, key=_spec_key)
    blocks = []
    for d, bn in sorted(
        {(r["dataset"], _mode(r)[0]) for r in obs}, key=lambda p: (_dataset_key(p[0]), _mode_key((p[1], "")))
    ):
        imgs = defaultdict(dict)  # image id -> spec -> image
        originals = {}
        for r in (r for r in obs if r["dataset"] == d and _mode(r)[0] == bn):
            f = pathlib.Path(workdir) / r["recon"]
            if not f.exists():
                continue
            with np.load(f) as z:
                key = "reconstructions" if r["threat"] == "observed" else "candidate_observed"
                if key not in z:
                    continue
                for i, img_id in enumerate(z["image_ids"]):
                    imgs[int(img_id)][r["compressor"]] = z[key][i]
                    originals[int(img_id)] = z["originals"][i]
        blocks.append((f"{d}\n{bn}", sorted(originals), imgs, originals))
    n_rows = sum(len(b[1]) for b in blocks)
    if n_rows == 0:
        return False
    cols = ["original"] + specs
    fig, axes = plt.subplots(n_rows, len(cols), figsize=(1.1 * len(cols), 1.15 * n_rows + 0.6), squeeze=False)
    row = 0
    for name, ids, imgs, originals in blocks:
        for img_id in ids:
            for j, c in enumerate(cols):
                ax = axes[row, j]
                ax.axis("off")
                im = originals[img_id] if c == "original" else imgs[img_id].get(c)
                if im is not None:
                    ax.imshow(
                        im[..., 0] if im.shape[-1] == 1 else im,
                        cmap="gray" if im.shape[-1] == 1 else None,
                        vmin=0,
                        vmax=255,
                    )
                if row == 0:
                    ax.set_title(
                        "Original" if c == "original" else _label(c).replace(" (uncompressed)", ""), fontsize=5
                    )
            axes[row, 0].text(-0.15, 0.5, name, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=6)
            row += 1
    fig.suptitle("Gradient inversion from worker 0's message (observed attacker; BatchNorm mode per row)", fontsize=7)
    fig.tight_layout()
    results.save_figure(fig, path, dpi=150)
    return True


def ssim_vs_compression(rows, path):
    rows = [r for r in rows if r["observer"] == "worker"]
    if not rows:
        return False
    datasets = sorted({r["dataset"] for r in rows}, key=_dataset_key)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.4), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        for bn, color in (("eval", "tab:blue"), ("train", "tab:red")):
            rs = [r for r in rows if r["dataset"] == d and r["bn_statistics"] == bn]
            for family, marker in (("powersgd", "o"), ("topk_level", "s")):
                for threat, key, line in (
                    ("observed", "ssim_mean", "-"),
                    ("adaptive", "adaptive_ssim_mean", ":"),
                    ("strongest", "strongest_ssim_mean", "--"),
                ):
                    pts = sorted(
                        (r["wire_words"], r[key]) for r in rs if r["compressor"].startswith(family + ":") and key in r
                    )
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True),
                            line + marker,
                            color=color,
                            ms=3,
                            label=f"{_label(family + ':').split(' ')[0]} {threat} ({bn})",
                        )
            for r in rs:
                if r["compressor"] == "none" and "ssim_mean" in r:
                    ax.plot([r["wire_words"]], [r["ssim_mean"]], "*", color=color, ms=8, label=f"SGD ({bn})")
        ax.set(xscale="log", xlabel="32-bit words on the wire per worker and step", ylabel="mean SSIM", title=d)
        ax.legend(fontsize=5)
    fig.tight_layout()
    results.save_figure(fig, path, dpi=130)
    return True


def plot_roc(curves: dict, path, title: str = "") -> None:
    """ROC curves on log-log axes (the low-FPR regime matters), one per attack/configuration."""
    fig, ax = plt.subplots(figsize=(5, 5))
    floor = 1e-4
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=name, lw=1.2)
    ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(floor, 1),
        ylim=(floor, 1),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
    )
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    results.save_figure(fig, path, dpi=120)


ROC_ATTACKS = ("rmia_online", "lira_online", "loss")  # drawn in this order: RMIA on top of the legend


def roc_figure(mia_records, workdir, path):
    """Log-log ROC curves of `ROC_ATTACKS`, one panel per dataset, a colour per compressor."""
    by_dataset: dict[str, dict] = {}
    for r in sorted(mia_records, key=lambda r: (_dataset_key(r["dataset"]), _spec_key(r["compressor"]))):
        f = pathlib.Path(workdir) / r["roc"]
        if not f.exists():
            continue
        with np.load(f) as z:
            for attack in ROC_ATTACKS:
                if f"{attack}_fpr" in z:
                    key = f"{_label(r['compressor'])} {attack}"
                    by_dataset.setdefault(r["dataset"], {})[key] = (z[f"{attack}_fpr"], z[f"{attack}_tpr"])
    if not by_dataset:
        return False
    fig, axes = plt.subplots(1, len(by_dataset), figsize=(4.5 * len(by_dataset), 4.5), squeeze=False)
    floor = 1e-4
    for ax, (d, curves) in zip(axes[0], by_dataset.items(), strict=True):
        labels = list(dict.fromkeys(k.rsplit(" ", 1)[0] for k in curves))  # compressors, in table order
        colours = {lab: f"C{i}" for i, lab in enumerate(labels)}
        for key, (fpr, tpr) in curves.items():
            lab, attack = key.rsplit(" ", 1)
            style = {"rmia_online": "-", "lira_online": "--", "loss": ":"}[attack]
            ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), style, color=colours[lab], lw=1.1, label=key)
        ax.plot([floor, 1], [floor, 1], "k-", lw=0.5, alpha=0.5)
        ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="FPR", ylabel="TPR", title=d)
        ax.legend(fontsize=5, loc="lower right")
    fig.suptitle("MIA ROC, log-log (RMIA solid, LiRA dashed, loss dotted)", fontsize=9)
    fig.tight_layout()
    results.save_figure(fig, path, dpi=120)
    return True


def verdict(ok) -> str:
    return "confirmed" if ok else "NOT confirmed"


def claims(rows, mrows) -> list[str]:
    """Which of the paper's claims this run confirms, per BatchNorm mode and observer, with the numbers behind each."""
    out = []
    for m in sorted({(r["bn_statistics"], r["observer"]) for r in rows}, key=_mode_key):
        lines = gradinv_claims([r for r in rows if (r["bn_statistics"], r["observer"]) == m])
        out += [f"- *{mode_label(m)}*:"] + ["  " + line for line in lines]
    out += mia_claims(mrows)
    return out or ["- No configurations finished yet."]


def gradinv_claims(rows) -> list[str]:
    out = []
    by = {(r["dataset"], r["compressor"]): r for r in rows}
    datasets = sorted({r["dataset"] for r in rows})

    for d in datasets:
        base = by.get((d, "none"))
        comp = [r for r in rows if r["dataset"] == d and r["compressor"] != "none" and "ssim_mean" in r]
        if base and comp and "ssim_mean" in base:
            worst = max(comp, key=lambda r: r["ssim_mean"])
            out.append(
                f"- Uncompressed SGD leaks most ({d}): {verdict(base['ssim_mean'] > worst['ssim_mean'])} "
                f"(SGD {base['ssim_mean']:.3f}; most-leaking compressed: {worst['compressor']} "
                f"{worst['ssim_mean']:.3f})."
            )
        pw = sorted(
            (int(r["compressor"].split(":")[1]), r["ssim_mean"])
            for r in comp
            if r["compressor"].startswith("powersgd:")
        )
        if len(pw) >= 2:
            mono = all(b >= a - 0.02 for (_, a), (_, b) in zip(pw, pw[1:]))
            out.append(
                f"- PowerSGD leakage grows with rank ({d}): {verdict(mono and pw[-1][1] > pw[0][1])} "
                f"({', '.join(f'r{k}: {v:.3f}' for k, v in pw)})."
            )
        pairs = [
            (r["compressor"].split(":")[1], by.get((d, "powersgd:" + r["compressor"].split(":")[1])), r)
            for r in comp
            if r["compressor"].startswith("topk_level:")
        ]
        pairs = [(lvl, p, t) for lvl, p, t in pairs if p and "ssim_mean" in p]
        if pairs:
            ok = all(t["ssim_mean"] < p["ssim_mean"] for _, p, t in pairs)
            out.append(
                f"- Top-K leaks less than PowerSGD at the same wire size ({d}): {verdict(ok)} ("
                + ", ".join(
                    f"level {lvl}: Top-K {t['ssim_mean']:.3f} vs PowerSGD {p['ssim_mean']:.3f}" for lvl, p, t in pairs
                )
                + ")."
            )
        strong = [r for r in rows if r["dataset"] == d and "strongest_ssim_mean" in r and "ssim_mean" in r]
        if strong:
            below = [
                r for r in strong if (r.get("strongest_ssim_ci") or (r["strongest_ssim_mean"],) * 2)[1] < r["ssim_mean"]
            ]
            out.append(
                f"- Extension, `strongest` at least as strong as the paper's attacker ({d}, within its 95% "
                f"interval): {verdict(not below)} in {len(strong) - len(below)} of {len(strong)} cells"
                + (f"; below in {', '.join(r['compressor'] for r in below)}" if below else "")
                + "."
            )
        ada = [(r["compressor"], r["ssim_mean"], r["adaptive_ssim_mean"]) for r in comp if "adaptive_ssim_mean" in r]
        if ada:
            best = max(ada, key=lambda a: a[2] - a[1])
            better = sum(a[2] > a[1] for a in ada)
            out.append(
                f"- Extension, compression-aware attacker ({d}): beats the paper's attacker on {better} of "
                f"{len(ada)} compressors; largest difference on {best[0]} ({best[1]:.3f} -> {best[2]:.3f} "
                "SSIM)."
            )
    sgd = {d: by[(d, "none")]["ssim_mean"] for d in datasets if (d, "none") in by and "ssim_mean" in by[(d, "none")]}
    if "mnist" in sgd and len(sgd) > 1:
        others = {d: v for d, v in sgd.items() if d != "mnist"}
        out.append(
            f"- MNIST leaks more than CIFAR under SGD: {verdict(all(sgd['mnist'] > v for v in others.values()))}"
            f" (mnist {sgd['mnist']:.3f}; " + ", ".join(f"{d} {v:.3f}" for d, v in others.items()) + ")."
        )
    return out


def _overlap(a, b) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def mia_claims(mrows) -> list[str]:
    """The paper's Table 2 claim per dataset: by its metric, and by the strongest attack at matched steps and utility.

    "Barely changes" is read as: each compressor's 95% interval of the
    strongest attack's AUC and TPR at 1% FPR overlaps the uncompressed one's.
    """
    out = []
    matched = utility_matched(mrows)
    for d in sorted({r["dataset"] for r in mrows}):
        rs = {r["compressor"]: r for r in mrows if r["dataset"] == d}
        if "none" not in rs or len(rs) < 2:
            continue
        base = rs["none"]["attacks"]["loss"]["oracle_acc"]
        diffs = {c: 100 * (r["attacks"]["loss"]["oracle_acc"] - base) for c, r in rs.items() if c != "none"}
        big = max(diffs.items(), key=lambda kv: abs(kv[1]))
        fits = ", ".join(f"{c} {fit_label(r)}" for c, r in rs.items())
        out.append(
            f"- Compression barely changes MIA accuracy ({d}, the paper's metric: loss attack, oracle accuracy, "
            f"matched steps): {verdict(abs(big[1]) < 2.0)} (largest change {big[1]:+.2f} points, {big[0]}; {fits})."
        )
        # The stronger of the two reference-model attacks on the uncompressed model (TPR at 1% FPR).
        candidates = [a for a in ("rmia_online", "lira_online") if a in rs["none"]["attacks"]]
        if not candidates:
            continue
        attack = max(candidates, key=lambda a: rs["none"]["attacks"][a]["tpr@1%fpr"])
        at_utility = {m["compressor"]: m for m in matched if m["dataset"] == d}
        comparisons = [("matched steps", {c: r["snapshots"][-1] for c, r in rs.items()})]
        if all(at_utility[c]["matched"] for c in rs):
            comparisons.append(("matched utility", {c: at_utility[c] for c in rs}))
        else:
            out.append(f"- ({d}) No matched-utility verdict: some compressor has no snapshot within 0.02 of the level.")
        for label, snaps in comparisons:
            ref = snaps["none"]["attacks"][attack]
            parts, same = [], True
            for c, snap in snaps.items():
                m = snap["attacks"][attack]
                if c != "none":
                    same &= _overlap(m.get("auc_ci"), ref.get("auc_ci"))
                    same &= _overlap(m.get("tpr@1%fpr_ci"), ref.get("tpr@1%fpr_ci"))
                parts.append(
                    f"{c} AUC {_metric_cell(m, 'auc')}, TPR@1%FPR {_metric_cell(m, 'tpr@1%fpr')} "
                    f"(step {snap['step']}, test acc {snap['test_accuracy']:.3f})"
                )
            out.append(
                f"- Compression does not change membership risk ({d}, {attack}, {label}; intervals overlap "
                f"SGD's): {verdict(same)}: " + "; ".join(parts) + "."
            )
    return out


def report_markdown(rows, mrows, setting, paper_match: bool) -> str:
    out = [
        "# Reproduction report",
        "",
        f"Setting: {setting}.",
        "Paper: ResNet-18, 10 images per dataset, Geiping et al.'s attack (24000 iterations). "
        + (
            "This run matches that setting."
            if paper_match
            else "This run does **not** match that setting (smaller model / budget), so compare trends, not values."
        ),
        "",
        "## Claims",
        "",
    ] + claims(rows, mrows)
    beside = ["dataset", "algorithm", "this run", "paper"]
    table1 = []
    for r in rows:
        paper = paper_values.TABLE1.get(r["dataset"], {}).get(r["compressor"])
        table1.append(
            [
                r["dataset"],
                _label(r["compressor"]),
                f"{r['bn_statistics']} / {r['observer']}",
                _f(r.get("ssim_mean"), ".4f"),
                _ci(r.get("ssim_ci")),
                f"{paper[0]:.4f} ± {paper[1]:.4f}" if paper else "-",
            ]
        )
    out += ["", "## Table 1 beside the paper (SSIM mean, observed attacker)", ""] + results.markdown_table(
        ["dataset", "algorithm", "BatchNorm mode / observer", "this run", "95% interval", "paper"], table1
    )
    if mrows:
        table2 = []
        for r in mrows:
            a = r["attacks"]
            paper = paper_values.TABLE2.get(r["dataset"], {}).get(r["compressor"])
            ours = " / ".join(f"{100 * a[k]['oracle_acc']:.2f}%" for k in ("confidence", "loss", "entropy"))
            table2.append(
                [r["dataset"], _label(r["compressor"]), ours, " / ".join(f"{v:.2f}%" for v in paper) if paper else "-"]
            )
        out += [
            "",
            "## Table 2 beside the paper (oracle accuracy: confidence / loss / entropy)",
            "",
        ] + results.markdown_table(beside, table2)
    out += [
        "",
        "Files: table1.md, table1.csv, figure1.png, ssim_vs_compression.png, table2.md, roc.png, utility.md, "
        "mia_matched.md, mia_budget.md, mia_budget.png.",
    ]
    return "\n".join(out) + "\n"


def write_reports(workdir) -> list[pathlib.Path]:
    workdir = pathlib.Path(workdir)
    g, m, damaged = load(workdir)
    if damaged is not None:
        print(
            f"WARNING: the last line of {workdir / 'results.jsonl'} is damaged and was not reported: {damaged[:80]!r}",
            file=sys.stderr,
        )
    rows = table1_rows(g)
    mrows = mia_rows(m)
    any_rec = (g or m or [{}])[0]
    sources = sorted({r.get("data_source", "?") for r in g + m})
    if g or not m:
        setting = (
            f"model {any_rec.get('model', '?')} at training step {any_rec.get('attack_step', 0)}, "
            f"{any_rec.get('iterations', '?')} attack iterations, {any_rec.get('restarts', '?')} restart(s), "
            f"N = {any_rec.get('workers', 1)} workers, B = {any_rec.get('victim_batch', 1)} image(s) per worker, "
            f"BatchNorm {any_rec.get('batchnorm', 'sync')}, data {', '.join(sources) or '?'}"
        )
    else:  # membership inference only: no attack on images, so none of the fields above exist
        setting = (
            f"membership inference only: model {any_rec.get('model', '?')}, {any_rec.get('mia_shadows', '?')} "
            f"reference models, {any_rec.get('mia_steps', '?')} training steps at global batch "
            f"{any_rec.get('batch_size', '?')}, pools of {any_rec.get('mia_pool', '?')} images, "
            f"data {', '.join(sources)}"
        )
    paper_match = any_rec.get("model") == "resnet18" and any_rec.get("iterations") == 24000
    written = []

    def put(name, text):
        results.write_atomic(workdir / name, text)
        written.append(workdir / name)

    put("table1.md", table1_markdown(rows, setting))
    write_csv(rows, workdir / "table1.csv")
    written.append(workdir / "table1.csv")
    put("table2.md", table2_markdown(mrows) if mrows else "# Table 2: membership inference\n\nNo MIA units yet.\n")
    put("utility.md", utility_markdown(mrows))
    if mrows:
        put("mia_matched.md", mia_matched_markdown(mrows))
    if any(r["budgets"] for r in mrows):
        put("mia_budget.md", mia_budget_markdown(mrows))
    put("report.md", report_markdown(rows, mrows, setting, paper_match))
    for name, fn in (
        ("figure1.png", lambda p: figure1(g, workdir, p)),
        ("ssim_vs_compression.png", lambda p: ssim_vs_compression(rows, p)),
        ("roc.png", lambda p: roc_figure(m, workdir, p)),
        ("mia_budget.png", lambda p: budget_figure(mrows, p)),
    ):
        if fn(workdir / name):
            written.append(workdir / name)
    return written


def main(argv):
    del argv
    written = write_reports(flags.FLAGS.workdir)
    print("\n".join(str(p) for p in written))


if __name__ == "__main__":
    # Defined only when run as a program: reproduce imports this module and has its own --workdir.
    flags.DEFINE_string("workdir", "runs/reproduce", "the reproduce run's workdir")
    app.run(main)
