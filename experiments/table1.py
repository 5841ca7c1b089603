r"""The Table 1 study's report: table, paired verdicts, Figure 1, from the records of ``results/table1``.

    python -m experiments.table1 --study=results/table1

The study is several workdirs of `experiments.reproduce`, one setting each
(docs/studies/table1.md): ``init`` (ResNet-18 at initialisation, the 33 eval
cells and the train-mode SGD controls), ``trained`` (CIFAR-10 victims after
their own N-worker runs), ``seeds/*`` (the same cell with other attack
noise), ``budget`` (long runs with in-run checkpoints). This program reads
every ``results.jsonl`` under the study and writes, beside them:

* ``table1.md`` / ``table1.csv``: per dataset, victim, BatchNorm mode,
  attacker and configuration the mean SSIM over images with its 95% t
  interval and n, the paper's value, and the code revisions the cell came
  from (a cell from more than one revision is flagged);
* ``claims.csv`` / ``claims.md``: the paper's claims as paired verdicts
  (`experiments.claims`);
* ``figure1_observed.png`` / ``figure1_strongest.png``: per dataset one
  image and its reconstruction under every configuration.

Attackers: ``observed`` is the paper's (cosine on the decompressed message),
read from a ``strongest`` unit's observed candidate or an ``observed`` unit;
``strongest`` is the reconstruction the strongest attacker keeps without
looking at the original (lowest consistency loss over its candidates).
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from experiments import paper_values
from experiments.report import claims
from experiments.report.claims import (
    ATTACKERS,
    CONFIGS,
    DATASETS,
    NEAR_ZERO,
    cells,
    claim_rows,
    mixed_revisions,
    table_rows,
)
from trustsgd_jax import results


def read_study(study: pathlib.Path) -> dict[str, list[dict]]:
    """{workdir relative to the study: its gradinv records}; each record's ``recon`` made relative to the study."""
    out = {}
    for path in sorted(study.rglob("results.jsonl")):
        workdir = path.parent.relative_to(study)
        records = [
            dict(r, recon=str(workdir / r["recon"])) if r.get("recon") else r
            for r in results.read_records(path).records
            if r.get("kind") == "gradinv"
        ]
        if records:
            out[str(workdir)] = records
    return out


def _f(v: float, fmt: str = ".3f") -> str:
    return "-" if not math.isfinite(v) else format(v, fmt)


def table_markdown(rows: list[dict]) -> str:
    lines = []
    for setting in sorted(
        {(r["victim"], r["bn_mode"], r["attacker"]) for r in rows}, key=lambda s: (s[0] != "init", s)
    ):
        victim, bn, attacker = setting
        sub = [r for r in rows if (r["victim"], r["bn_mode"], r["attacker"]) == setting]
        datasets = [d for d in DATASETS if any(r["dataset"] == d for r in sub)]
        model = sub[0]["model"]
        lines += [f"### {model}, victim {victim}, BatchNorm {bn}, attacker {attacker}", ""]
        lines.append("| configuration | " + " | ".join(f"{d}: SSIM [95% CI] (n) | paper" for d in datasets) + " |")
        lines.append("|---|" + "---|---|" * len(datasets))
        for spec in CONFIGS:
            cells_ = []
            for d in datasets:
                r = next((r for r in sub if r["dataset"] == d and r["configuration"] == spec), None)
                if r is None:
                    cells_ += ["-", _f(paper_values.TABLE1.get(d, {}).get(spec, (math.nan,))[0], ".4f")]
                    continue
                flag = " (mixed revisions)" if r["mixed"] else ""
                cells_ += [
                    f"{_f(r['mean'])} [{_f(r['lo'])}, {_f(r['hi'])}] ({r['n']}){flag}",
                    _f(r["paper_mean"], ".4f"),
                ]
            if any(c != "-" for c in cells_[::2]):
                lines.append(f"| {spec} | " + " | ".join(cells_) + " |")
        lines.append("")
    return "\n".join(lines)


def compact_markdown(rows: list[dict], victim: str = "init", bn: str = "local-eval") -> str:
    """One setting's cells with both attackers side by side, per dataset (the README's view); n < 4 marked."""
    out = []
    for d in DATASETS:
        sub = {
            (r["configuration"], r["attacker"]): r
            for r in rows
            if (r["dataset"], r["victim"], r["bn_mode"]) == (d, victim, bn)
        }
        if not sub:
            continue
        out += [
            f"**{d}** ({victim}, BatchNorm {bn}): SSIM mean [95% CI] (n images)",
            "",
            "| configuration | paper's attacker (observed) | strongest | paper |",
            "|---|---|---|---|",
        ]
        for spec in CONFIGS:
            cells_ = [sub.get((spec, a)) for a in ATTACKERS]
            if not any(cells_):
                continue
            text = ["-" if c is None else f"{_f(c['mean'])} [{_f(c['lo'])}, {_f(c['hi'])}] ({c['n']})" for c in cells_]
            paper = paper_values.TABLE1.get(d, {}).get(spec, (math.nan,))[0]
            out.append(f"| {spec} | {text[0]} | {text[1]} | {_f(paper, '.3f')} |")
        out.append("")
    return "\n".join(out)


def claims_markdown(rows: list[dict], mixed: list[tuple]) -> str:
    out = [
        "# Table 1: the paper's claims as paired verdicts",
        "",
        f"Each row: the mean per-image SSIM difference a - b over the images attacked in both cells, its 95% "
        f"Student-t interval, and the verdict (holds: interval above 0; contradicted: below 0; undecided: contains "
        f"0). 'Near zero' tests the cell's SSIM against {NEAR_ZERO}. 'MNIST leaks more than CIFAR' compares "
        "different images, so its interval is Welch's (unpaired). Attackers are never mixed.",
        "",
        "## Summary",
        "",
        "| claim | attacker | holds | contradicted | undecided |",
        "|---|---|---|---|---|",
    ]
    for (claim, attacker), counts in sorted(claims.tally(rows).items()):
        out.append(f"| {claim} | {attacker} | {counts['holds']} | {counts['contradicted']} | {counts['undecided']} |")
    out += ["", "## Every verdict", "", claims.markdown_table(rows), ""]
    if mixed:
        out += ["## Cells from more than one code revision", ""]
        out += [f"- {' / '.join(map(str, k))}" for k in mixed]
        out.append("")
    return "\n".join(out)


def figure1(cell_map: dict[tuple, dict], study: pathlib.Path, attacker: str, path: pathlib.Path) -> bool:
    """Per dataset one row: the first image's original and its reconstruction under each configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for d in DATASETS:
        found = {}
        present = [cell_map[k] for k in ((d, "init", "local-eval", attacker, s) for s in CONFIGS) if k in cell_map]
        if not present:
            continue
        # One image in every column: the image attacked in the most cells (the lowest id among equals).
        counts: dict[int, int] = {}
        for c in present:
            for i in c["ssim"]:
                counts[i] = counts.get(i, 0) + 1
        image = min(counts, key=lambda i: (-counts[i], i))
        for spec in CONFIGS:
            cell = cell_map.get((d, "init", "local-eval", attacker, spec))
            r = next((r for r in cell["records"] if image in r["image_ids"]), None) if cell else None
            if r is None:
                continue
            with np.load(study / r["recon"]) as z:
                rec = z["reconstructions"] if attacker == "strongest" else z["candidate_observed"]
                j = r["image_ids"].index(image)
                found[spec] = (z["originals"][j], rec[j], None)
        if found:
            rows.append((d, found))
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), len(CONFIGS) + 1, figsize=(1.3 * (len(CONFIGS) + 1), 1.5 * len(rows)))
    axes = np.atleast_2d(axes)
    for i, (d, found) in enumerate(rows):
        original = next(iter(found.values()))[0]
        axes[i, 0].imshow(original.squeeze(), cmap="gray" if original.shape[-1] == 1 else None)
        axes[i, 0].set_title(f"{d}\noriginal", fontsize=7)
        for j, spec in enumerate(CONFIGS, start=1):
            if spec in found:
                img = found[spec][1]
                axes[i, j].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
            axes[i, j].set_title(spec.replace("topk_level", "top-k").replace("powersgd", "psgd"), fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"ResNet-18 at initialisation, eval mode, N = 4, attacker: {attacker}", fontsize=9, y=0.99)
    fig.subplots_adjust(top=1 - 0.55 / fig.get_figheight())  # room for the title above the column titles
    results.save_figure(fig, path)
    plt.close(fig)
    return True


def write_study_report(study: pathlib.Path) -> list[pathlib.Path]:
    # The table's cells: every workdir but the seed reruns and the budget runs (reported apart).
    by_workdir = read_study(study)
    main_records = [r for wd, recs in by_workdir.items() if not wd.startswith(("seeds", "budget")) for r in recs]
    cell_map = cells(main_records)
    rows = table_rows(cell_map)
    claim = claim_rows(cell_map)
    written = []
    for name, text in (
        (
            "table1.md",
            "# Table 1 (SSIM, mean over the same images per dataset)\n\n" + table_markdown(rows),
        ),
        ("claims.md", claims_markdown(claim, mixed_revisions(cell_map))),
        ("table1_compact.md", compact_markdown(rows)),
        ("claims.csv", claims.csv_text(claim)),
    ):
        results.write_atomic(study / name, text)
        written.append(study / name)
    results.write_atomic(study / "table1.csv", _rows_csv(rows))
    written.append(study / "table1.csv")
    for attacker in ATTACKERS:
        path = study / f"figure1_{attacker}.png"
        if figure1(cell_map, study, attacker, path):
            written.append(path)
    results.write_json(study / "table1_rows.json", rows)
    return written


def _rows_csv(rows: list[dict]) -> str:
    keys = [
        "dataset",
        "victim",
        "bn_mode",
        "attacker",
        "configuration",
        "n",
        "mean",
        "lo",
        "hi",
        "paper_mean",
        "paper_std",
        "revisions",
        "mixed",
    ]
    lines = [",".join(keys)]
    for r in rows:
        lines.append(",".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys))
    return "\n".join(lines) + "\n"


def main(argv) -> None:
    del argv
    from absl import flags

    study = pathlib.Path(flags.FLAGS.study)
    for p in write_study_report(study):
        print(p)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("study", "results/table1", "the study folder (workdirs of experiments.reproduce beneath it)")
    app.run(main)
