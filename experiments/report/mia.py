"""Membership inference and utility: Table 2, matched steps and utility, reference budgets, accuracy and wire cost.

Rows (`mia_rows`) are one per MIA record (dataset x compressor), sorted.
"""

from __future__ import annotations

from experiments.report.labels import metric_cell, spec_key, spec_label
from trustsgd_jax import results


def mia_rows(mia_records) -> list[dict]:
    rows = []
    for r in sorted(mia_records, key=lambda r: (r["dataset"], spec_key(r["compressor"]))):
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

UTILITY_TOLERANCE = 0.02  # test accuracy within 2 points of the common level counts as matched


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
                        spec_label(r["compressor"]),
                        label,
                        snap["step"],
                        "-" if snap.get("train_accuracy") is None else f"{snap['train_accuracy']:.3f}",
                        f"{snap['test_accuracy']:.3f}",
                        metric_cell(a.get("rmia_online"), "auc"),
                        metric_cell(a.get("rmia_online"), "tpr@1%fpr"),
                        metric_cell(a.get("lira_online"), "auc"),
                        metric_cell(a.get("lira_online"), "tpr@1%fpr"),
                        metric_cell(a.get("loss"), "auc"),
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


BUDGET_METRICS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr")


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
        out += [f"## {r['dataset']}, {spec_label(r['compressor'])}", ""] + results.markdown_table(
            ["references k", "blocks", "examples", "LiRA variance", "attack", "AUC", "TPR@1%FPR", "TPR@0.1%FPR"], cells
        )
        out.append("")
    return "\n".join(out) + "\n"


TABLE2_INTRO = (
    "Accuracy columns: the **oracle** balanced accuracy (best threshold chosen on the evaluation set itself), "
    "which is what the paper's Table 2 reports; **calibrated** accuracy uses a threshold chosen on the shadow "
    "models' known members and non-members, never on the evaluation set (LiRA: likelihood ratio 0). AUC and "
    "TPR at 1% / 0.1% FPR follow Carlini et al. 2022; brackets are 95% bootstrap intervals. The paper's "
    "'cross-entropy MIA' is reported here as the entropy attack; Mentr is Song & Mittal's modified entropy. "
    "LiRA (Carlini et al. 2022) and RMIA (Zarifzadeh, Liu and Shokri, ICML 2024) are scored from the same "
    "reference (shadow) models; the columns show their online forms, RMIA against a population of images in no "
    "model's training set. LiRA uses a global variance below 64 references, as the LiRA paper recommends."
)
TABLE2_COLUMNS = [
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
]


def oracle_calibrated(attacks: dict, name: str) -> str:
    """A threshold attack's oracle / calibrated accuracy, in percent."""
    m = attacks.get(name, {})
    if not m:
        return "-"
    cal = m.get("calibrated_acc")
    return f"{100 * m['oracle_acc']:.2f}% / " + (f"{100 * cal:.2f}%" if cal is not None else "-")


def table2_row(r: dict) -> list:
    """One compressor's row of Table 2: accuracies, fit, and every attack's headline metrics."""
    a = r["attacks"]
    lira = a.get("lira_online") or a.get("lira_offline") or {}
    rmia = a.get("rmia_online") or a.get("rmia_offline") or {}
    train_acc = r.get("train_accuracy")
    return [
        spec_label(r["compressor"]),
        r["steps"],
        "-" if train_acc is None else f"{train_acc:.3f}",
        f"{r['test_accuracy']:.3f}",
        fit_label(r),
        oracle_calibrated(a, "confidence"),
        oracle_calibrated(a, "loss"),
        oracle_calibrated(a, "entropy"),
        metric_cell(a.get("loss"), "auc"),
        metric_cell(a.get("mentr"), "auc"),
        metric_cell(lira, "auc"),
        metric_cell(lira, "tpr@1%fpr"),
        metric_cell(lira, "tpr@0.1%fpr"),
        metric_cell(rmia, "auc"),
        metric_cell(rmia, "tpr@1%fpr"),
        metric_cell(rmia, "tpr@0.1%fpr"),
        metric_cell(a.get("loss"), "tpr@1%fpr"),
    ]


def table2_markdown(rows: list[dict]) -> str:
    out = ["# Table 2: membership inference", "", TABLE2_INTRO, ""]
    for d in sorted({r["dataset"] for r in rows}):
        cells = [table2_row(r) for r in rows if r["dataset"] == d]
        out += [f"## {d}", ""] + results.markdown_table(TABLE2_COLUMNS, cells)
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
                spec_label(r["compressor"]),
                f"{r['test_accuracy']:.4f}",
                r["wire"]["words"],
                r["wire"]["bytes"],
                f"{r['wire']['words'] / r['wire']['uncompressed_words']:.4f}",
            ]
            for r in mrows
        ],
    )
    return "\n".join(out) + "\n"
