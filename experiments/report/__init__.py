r"""Regenerates every report of a reproduce run from its ``results.jsonl``.

    python -m experiments.report --workdir=runs/reproduce

Writes table1.md / table1.csv (gradient inversion SSIM, the paper's columns
plus PSNR and the adaptive attacker), figure1.png (originals and
reconstructions), ssim_vs_compression.png, table2.md (membership inference),
utility.md (accuracy and wire bytes) and report.md (side by side with the
paper, and which of its claims this run confirms). Missing configurations
(partial runs) leave gaps, never a crash.

Modules, one per part of the reports:

* `tables`: Table 1 (gradient inversion): its rows, Markdown and CSV.
* `mia`: Table 2 (membership inference), matched steps and utility,
  reference budgets, and the utility table.
* `figures`: every figure.
* `claims`: the paper's gradient-inversion claims as paired verdicts (claims.md/.csv);
* `summary`: report.md, with those verdicts and the MIA claims (`summary.mia_claims`,
  passed to `summary.report_markdown` by `write_reports`: the one place a
  claims module plugs in).
* `labels`: the order, names and number formats the others share.
"""

from __future__ import annotations

import pathlib
import sys

from experiments.report import claims, figures, mia, summary, tables
from experiments.report.mia import utility_matched
from trustsgd_jax import results

__all__ = ["load", "setting_line", "utility_matched", "write_reports"]


def load(workdir) -> tuple[list[dict], list[dict], str | None]:
    """(gradinv records, MIA records, the damaged last line if any) of a workdir's ``results.jsonl``."""
    r = results.read_records(pathlib.Path(workdir) / "results.jsonl")
    recs = r.records
    return [x for x in recs if x.get("kind") == "gradinv"], [x for x in recs if x.get("kind") == "mia"], r.damaged_tail


def setting_line(gradinv_records: list[dict], mia_records: list[dict]) -> str:
    """The run's setting in words, from its first record (a workdir holds one setting)."""
    any_rec = (gradinv_records or mia_records or [{}])[0]
    sources = sorted({r.get("data_source", "?") for r in gradinv_records + mia_records})
    if gradinv_records or not mia_records:
        return (
            f"model {any_rec.get('model', '?')} at training step {any_rec.get('attack_step', 0)}, "
            f"{any_rec.get('iterations', '?')} attack iterations, {any_rec.get('restarts', '?')} restart(s), "
            f"N = {any_rec.get('workers', 1)} workers, B = {any_rec.get('victim_batch', 1)} image(s) per worker, "
            f"BatchNorm {any_rec.get('batchnorm', 'sync')}, data {', '.join(sources) or '?'}"
        )
    # Membership inference only: no attack on images, so none of the fields above exist.
    return (
        f"membership inference only: model {any_rec.get('model', '?')}, {any_rec.get('mia_shadows', '?')} "
        f"reference models, {any_rec.get('mia_steps', '?')} training steps at global batch "
        f"{any_rec.get('batch_size', '?')}, pools of {any_rec.get('mia_pool', '?')} images, "
        f"data {', '.join(sources)}"
    )


def write_reports(workdir) -> list[pathlib.Path]:
    """Writes every report of `workdir` from its records; returns the files written."""
    workdir = pathlib.Path(workdir)
    g, m, damaged = load(workdir)
    if damaged is not None:
        print(
            f"WARNING: the last line of {workdir / 'results.jsonl'} is damaged and was not reported: {damaged[:80]!r}",
            file=sys.stderr,
        )
    rows = tables.table1_rows(g)
    mrows = mia.mia_rows(m)
    setting = setting_line(g, m)
    first = (g or m or [{}])[0]
    paper_match = first.get("model") == "resnet18" and first.get("iterations") == 24000
    written = []

    def put(name: str, text: str) -> None:
        results.write_atomic(workdir / name, text)
        written.append(workdir / name)

    put("table1.md", tables.table1_markdown(rows, setting))
    tables.write_csv(rows, workdir / "table1.csv")
    written.append(workdir / "table1.csv")
    put("table2.md", mia.table2_markdown(mrows) if mrows else "# Table 2: membership inference\n\nNo MIA units yet.\n")
    put("utility.md", mia.utility_markdown(mrows))
    if mrows:
        put("mia_matched.md", mia.mia_matched_markdown(mrows))
    if any(r["budgets"] for r in mrows):
        put("mia_budget.md", mia.mia_budget_markdown(mrows))
    verdicts = claims.claim_rows(claims.cells(g))
    claim_lines = (claims.summary_lines(verdicts) if verdicts else ["- No paired gradient-inversion cells yet."]) + (
        summary.mia_claims(mrows)
    )
    put("report.md", summary.report_markdown(rows, mrows, setting, paper_match, claim_lines))
    if verdicts:
        put("claims.md", "# The paper's claims: paired verdicts\n\n" + claims.markdown_table(verdicts) + "\n")
        put("claims.csv", claims.csv_text(verdicts))
    for name, draw in (
        ("figure1.png", lambda p: figures.figure1(g, workdir, p)),
        ("ssim_vs_compression.png", lambda p: figures.ssim_vs_compression(rows, p)),
        ("roc.png", lambda p: figures.roc_figure(m, workdir, p)),
        ("mia_budget.png", lambda p: figures.budget_figure(mrows, p)),
    ):
        if draw(workdir / name):
            written.append(workdir / name)
    return written
