"""The reports' figures: reconstructions (figure1.png), SSIM against wire size, ROC curves, reference budgets."""

from __future__ import annotations

import itertools
import pathlib
from collections import defaultdict

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from experiments.report.labels import FAMILY_NAMES, dataset_key, mode_key, mode_of, spec_key, spec_kind, spec_label
from experiments.report.mia import BUDGET_METRICS, MIA_HEADLINE
from trustsgd_jax import results

matplotlib.use("Agg")  # the reports are files, never a window (pyplot resolves its backend at the first figure)


def figure1(gradinv_records, workdir, path):
    """Originals and observed-attacker reconstructions: one row per image, dataset and BatchNorm mode.

    The observed attacker's images come from its own units or from the
    ``observed`` candidate of ``strongest`` units.
    """
    obs = [r for r in gradinv_records if r["threat"] in ("observed", "strongest") and mode_of(r)[1] == "worker"]
    specs = sorted({r["compressor"] for r in obs}, key=spec_key)
    blocks = []
    for d, bn in sorted(
        {(r["dataset"], mode_of(r)[0]) for r in obs}, key=lambda p: (dataset_key(p[0]), mode_key((p[1], "")))
    ):
        imgs: defaultdict[int, dict[str, np.ndarray]] = defaultdict(dict)  # image id -> spec -> image
        originals = {}
        for r in (r for r in obs if r["dataset"] == d and mode_of(r)[0] == bn):
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
                        "Original" if c == "original" else spec_label(c).replace(" (uncompressed)", ""), fontsize=5
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
    datasets = sorted({r["dataset"] for r in rows}, key=dataset_key)
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
                        (r["wire_words"], r[key]) for r in rs if spec_kind(r["compressor"]) == family and key in r
                    )
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True),
                            line + marker,
                            color=color,
                            ms=3,
                            label=f"{FAMILY_NAMES[family]} {threat} ({bn})",
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
    for r in sorted(mia_records, key=lambda r: (dataset_key(r["dataset"]), spec_key(r["compressor"]))):
        f = pathlib.Path(workdir) / r["roc"]
        if not f.exists():
            continue
        with np.load(f) as z:
            for attack in ROC_ATTACKS:
                if f"{attack}_fpr" in z:
                    key = f"{spec_label(r['compressor'])} {attack}"
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


def budget_figure(rows, path) -> bool:
    """AUC and TPR at 1% / 0.1% FPR against k (log2 axis): a row of panels per dataset, a colour per attack and a
    line style per compressor."""
    rs = [r for r in rows if r["budgets"]]
    if not rs:
        return False
    datasets = sorted({r["dataset"] for r in rs}, key=dataset_key)
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
                        label=f"{spec_label(r['compressor'])}: {name}",
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
