"""report.md: the run beside the paper, and which of the paper's claims it confirms.

The claims are lines that `report_markdown` takes as an argument:
`write_reports` passes the paired gradient-inversion verdicts of
`experiments.report.claims` and this module's `mia_claims`.
"""

from __future__ import annotations

from experiments import paper_values
from experiments.report.labels import ci_text, fmt, metric_cell, spec_label
from experiments.report.mia import fit_label, utility_matched
from trustsgd_jax import results


def report_markdown(
    rows: list[dict], mrows: list[dict], setting: str, paper_match: bool, claim_lines: list[str]
) -> str:
    """report.md: the setting, the claims' lines, and Tables 1 and 2 beside the paper's values."""
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
        *claim_lines,
        "",
        "## Table 1 beside the paper (SSIM mean, observed attacker)",
        "",
        *table1_beside_paper(rows),
    ]
    if mrows:
        out += ["", "## Table 2 beside the paper (oracle accuracy: confidence / loss / entropy)", ""]
        out += table2_beside_paper(mrows)
    out += [
        "",
        "Files: table1.md, table1.csv, figure1.png, ssim_vs_compression.png, table2.md, roc.png, utility.md, "
        "mia_matched.md, mia_budget.md, mia_budget.png.",
    ]
    return "\n".join(out) + "\n"


def table1_beside_paper(rows: list[dict]) -> list[str]:
    """Table 1's observed SSIM per cell beside the paper's mean ± std."""
    cells = []
    for r in rows:
        paper = paper_values.TABLE1.get(r["dataset"], {}).get(r["compressor"])
        cells.append(
            [
                r["dataset"],
                spec_label(r["compressor"]),
                f"{r['bn_statistics']} / {r['observer']}",
                fmt(r.get("ssim_mean"), ".4f"),
                ci_text(r.get("ssim_ci")),
                f"{paper[0]:.4f} ± {paper[1]:.4f}" if paper else "-",
            ]
        )
    return results.markdown_table(
        ["dataset", "algorithm", "BatchNorm mode / observer", "this run", "95% interval", "paper"], cells
    )


def table2_beside_paper(mrows: list[dict]) -> list[str]:
    """Table 2's oracle accuracies (confidence / loss / entropy) per cell beside the paper's."""
    cells = []
    for r in mrows:
        a = r["attacks"]
        paper = paper_values.TABLE2.get(r["dataset"], {}).get(r["compressor"])
        ours = " / ".join(f"{100 * a[k]['oracle_acc']:.2f}%" for k in ("confidence", "loss", "entropy"))
        cells.append(
            [r["dataset"], spec_label(r["compressor"]), ours, " / ".join(f"{v:.2f}%" for v in paper) if paper else "-"]
        )
    return results.markdown_table(["dataset", "algorithm", "this run", "paper"], cells)


def verdict(ok: bool) -> str:
    return "confirmed" if ok else "NOT confirmed"


def overlap(a, b) -> bool:
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
                    same &= overlap(m.get("auc_ci"), ref.get("auc_ci"))
                    same &= overlap(m.get("tpr@1%fpr_ci"), ref.get("tpr@1%fpr_ci"))
                parts.append(
                    f"{c} AUC {metric_cell(m, 'auc')}, TPR@1%FPR {metric_cell(m, 'tpr@1%fpr')} "
                    f"(step {snap['step']}, test acc {snap['test_accuracy']:.3f})"
                )
            out.append(
                f"- Compression does not change membership risk ({d}, {attack}, {label}; intervals overlap "
                f"SGD's): {verdict(same)}: " + "; ".join(parts) + "."
            )
    return out
