"""Table 1, gradient inversion: a row per dataset x compressor x BatchNorm mode x observer (table1.md, table1.csv)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict

import numpy as np

from experiments.report.labels import (
    dataset_key,
    fmt,
    interval95,
    mean_ci,
    mode_key,
    mode_label,
    mode_of,
    spec_key,
    spec_label,
)
from trustsgd_jax import results

ADAPTIVE_CANDIDATES = ("factors", "sent_coordinates")  # objectives.adaptive_objective of each family


def columns(r: dict) -> dict[str, list]:
    """Per-image SSIM lists a record contributes, by column: its threat, and for `strongest` its candidates."""
    out = {r["threat"]: list(r["ssim"])}
    if r["threat"] == "strongest":
        out["upper_bound"] = list(r["upper_bound_ssim"])
        for name, values in r.get("candidate_ssim", {}).items():
            out[f"candidate:{name}"] = list(values)
    return out


def table1_rows(gradinv_records: list[dict]) -> list[dict]:
    """One row per (dataset, compressor, BatchNorm mode, observer): SSIM of every attacker, PSNR, wire words.

    ``observed`` and ``adaptive`` come from units of those threat models or,
    where a cell has none, from the same objectives run as candidates of a
    ``strongest`` unit (the same attack: same seeds, same selection of
    restarts).
    """
    by: defaultdict[tuple, defaultdict[str, list]] = defaultdict(lambda: defaultdict(list))
    psnr: defaultdict[tuple, list] = defaultdict(list)
    winners: defaultdict[tuple, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
    wire, full = {}, {}
    for r in gradinv_records:
        cell = (r["dataset"], r["compressor"], mode_of(r))
        for column, values in columns(r).items():
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
    for cell in sorted(by, key=lambda p: (dataset_key(p[0]), mode_key(p[2]), spec_key(p[1]))):
        d, c, m = cell
        cols = by[cell]
        observed = cols.get("observed") or cols.get("candidate:observed")
        adaptive = cols.get("adaptive") or next(
            (cols[f"candidate:{k}"] for k in ADAPTIVE_CANDIDATES if f"candidate:{k}" in cols), None
        )
        base: dict[str, list] = by.get((d, "none", m), {})
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
        attackers: list[tuple[str, list | None]] = [
            ("ssim", observed),
            ("adaptive_ssim", adaptive),
            ("strongest_ssim", cols.get("strongest")),
            ("upper_bound_ssim", cols.get("upper_bound")),
        ]
        for key, ssim in attackers:
            if ssim:
                row.update(
                    {
                        f"{key}_mean": float(np.mean(ssim)),
                        f"{key}_std": float(np.std(ssim)),
                        f"{key}_ci": interval95(ssim),
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
    for d in sorted({r["dataset"] for r in rows}, key=dataset_key):
        for m in sorted({(r["bn_statistics"], r["observer"]) for r in rows if r["dataset"] == d}, key=mode_key):
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
                        spec_label(r["compressor"]),
                        mean_ci(r, "ssim"),
                        fmt(r.get("pct_of_sgd"), ".1f") + ("%" if "pct_of_sgd" in r else ""),
                        fmt(r.get("psnr_mean"), ".2f"),
                        mean_ci(r, "adaptive_ssim"),
                        mean_ci(r, "strongest_ssim"),
                        ", ".join(f"{k} {v}" for k, v in sorted(r.get("winners", {}).items())),
                        mean_ci(r, "upper_bound_ssim"),
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
