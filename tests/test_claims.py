"""Paired verdicts from records (experiments.report.claims): each verdict where the data say so."""

import math

from experiments.report import claims


def record(spec, ssim, observed=None, images=(1, 2, 3, 4), revision="git:a", dataset="cifar10"):
    return dict(
        kind="gradinv",
        dataset=dataset,
        compressor=spec,
        threat="strongest",
        bn_statistics="eval",
        batchnorm="local",
        attack_step=0,
        model="resnet18",
        image_ids=list(images),
        ssim=list(ssim),
        candidate_ssim={"observed": list(observed if observed is not None else ssim)},
        code_revision=revision,
    )


def verdicts(rows, claim, a, b, attacker="strongest"):
    return [r["verdict"] for r in rows if (r["claim"], r["a"], r["b"], r["attacker"]) == (claim, a, b, attacker)]


def test_holds_contradicted_undecided():
    recs = [
        record("none", [0.90, 0.80, 0.85, 0.95]),
        record("powersgd:1", [0.10, 0.20, 0.12, 0.15]),  # SGD clearly above: holds
        record("powersgd:2", [0.30, 0.02, 0.25, 0.01]),  # against rank 1: noise both ways, undecided
        record("topk_level:1", [0.50, 0.60, 0.55, 0.52]),  # above PowerSGD rank 1: "Top-K leaks less" contradicted
    ]
    rows = claims.claim_rows(claims.cells(recs))
    assert verdicts(rows, "SGD leaks more than the compressor", "none", "powersgd:1") == ["holds"]
    assert verdicts(rows, "PowerSGD leakage grows with rank", "powersgd:2", "powersgd:1") == ["undecided"]
    top = "Top-K leaks less than PowerSGD at the same wire size"
    assert verdicts(rows, top, "powersgd:1", "topk_level:1") == ["contradicted"]
    near = "compression reduces SSIM to near zero"
    assert verdicts(rows, near, "SSIM 0.1", "topk_level:1") == ["contradicted"]


def test_attackers_are_separate_claims():
    recs = [
        record("none", [0.9, 0.8, 0.85, 0.95], observed=[0.9, 0.8, 0.85, 0.95]),
        record("powersgd:4", [0.8, 0.7, 0.9, 0.85], observed=[0.01, 0.02, 0.03, 0.0]),
    ]
    rows = claims.claim_rows(claims.cells(recs))
    claim = "SGD leaks more than the compressor"
    assert verdicts(rows, claim, "none", "powersgd:4", "observed") == ["holds"]
    assert verdicts(rows, claim, "none", "powersgd:4", "strongest") == ["undecided"]


def test_pairs_only_common_images():
    a = {1: 0.9, 2: 0.8, 3: 0.7}
    b = {2: 0.1, 3: 0.2, 9: 5.0}
    iv = claims.paired_interval(a, b)
    assert iv.n == 2 and math.isclose(iv.mean, ((0.8 - 0.1) + (0.7 - 0.2)) / 2)
    assert claims.verdict(claims.paired_interval({1: 0.5}, {1: 0.1})) == "undecided"  # n < 2: no interval


def test_mnist_claim_is_unpaired_welch():
    recs = [
        record("none", [0.99, 0.98, 0.97, 0.99], images=(5, 6, 7, 8), dataset="mnist"),
        record("none", [0.30, 0.20, 0.25, 0.35]),
    ]
    rows = claims.claim_rows(claims.cells(recs))
    (row,) = [r for r in rows if r["claim"] == "MNIST leaks more than CIFAR" and r["attacker"] == "strongest"]
    assert row["verdict"] == "holds" and "unpaired" in row["dataset"] and row["n"] == 8


def test_mixed_revisions_are_flagged():
    recs = [record("none", [0.9, 0.8], images=(1, 2)), record("none", [0.7, 0.6], images=(3, 4), revision="git:b")]
    cell_map = claims.cells(recs)
    assert set(claims.mixed_revisions(cell_map)) == {
        ("cifar10", "init", "local-eval", "observed", "none"),
        ("cifar10", "init", "local-eval", "strongest", "none"),
    }
    assert all(r["mixed"] for r in claims.table_rows(cell_map))
    one = claims.cells([record("none", [0.9, 0.8], images=(1, 2))])
    assert claims.mixed_revisions(one) == [] and not any(r["mixed"] for r in claims.table_rows(one))


def test_claims_csv_columns():
    recs = [record("none", [0.9, 0.8, 0.85, 0.95]), record("powersgd:1", [0.1, 0.2, 0.12, 0.15])]
    text = claims.csv_text(claims.claim_rows(claims.cells(recs)))
    assert text.splitlines()[0] == ",".join(claims.COLUMNS)


def test_table1_preset_plans_the_full_grid_without_running(tmp_path):
    """--preset=table1 --dry_run: 11 configurations x 3 datasets x 4 images, one unit each, nothing run or written."""
    import os
    import subprocess
    import sys

    workdir = tmp_path / "table1"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.reproduce",
            "--preset=table1",
            "--dry_run",
            "--data_source=sample",
            f"--workdir={workdir}",
            "--compilation_cache_dir=",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "132 units to run" in done.stdout
    keys = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ") and "gradinv" in line]
    assert len(keys) == len(set(keys)) == 132
    assert "expected duration" in done.stdout
    assert not (workdir / "results.jsonl").exists()
