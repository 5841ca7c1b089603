"""The main job end to end: reports from results.jsonl, resume after SIGKILL, damaged lines, bad flags."""

import contextlib
import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from absl import flags

from experiments import mia_rescore, report
from experiments.reproduce import config, plan, units
from experiments.reproduce import main as reproduce_main
from experiments.reproduce.plan import process_share
from experiments.reproduce.presets import MIA_CPU_DEVICES
from trustsgd_jax import results
from trustsgd_jax.attacks import membership

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
FLAGS = flags.FLAGS


def reproduce(workdir, *extra, timeout=600):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.reproduce",
            "--preset=tiny",
            f"--workdir={workdir}",
            "--progress=false",
            *extra,
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def reproduce_here(workdir, *extra):
    """The same run in this process, with the command line's exit code (2 for a bad setting) and its output.

    A subprocess pays ~10 s of imports and reloads every compiled program; here the programs compiled by an
    earlier run stay in memory. Runs that must be killed, or test the command line itself, use `reproduce`.
    """
    FLAGS.unparse_flags()
    FLAGS(["reproduce", "--preset=tiny", f"--workdir={workdir}", "--progress=false", *extra])
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out):
            reproduce_main.main([])
    except config.ConfigError as e:
        err.write(f"error: {e}\n")
        code = 2
    finally:
        FLAGS.unparse_flags()
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def lines(path):
    return path.read_text().splitlines()


def untimed(path):
    """The records of a results file in order, without what describes the run rather than the unit: wall-clock
    seconds and the code revision (a working tree edited between two runs is '+dirty' in one of them)."""
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("seconds", "code_revision")} for line in lines(path)
    ]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    out = reproduce(workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    return workdir, out.stdout


def test_tiny_run_writes_every_report_and_tables_parse_back(full_run):
    workdir, stdout = full_run
    for name in (
        "results.jsonl",
        "table1.md",
        "table1.csv",
        "figure1.png",
        "ssim_vs_compression.png",
        "table2.md",
        "utility.md",
        "report.md",
        "roc.png",
        "mia_matched.md",
        "mia_budget.md",
        "mia_budget.png",
    ):
        assert (workdir / name).stat().st_size > 0, name
    recs = results.read_records(workdir / "results.jsonl").records
    gradinv = [r for r in recs if r["kind"] == "gradinv"]
    mia = [r for r in recs if r["kind"] == "mia"]
    assert {r["compressor"] for r in gradinv} == {"none", "powersgd:1"} and len(mia) == 2
    with open(workdir / "table1.csv") as f:
        rows = {r["compressor"]: r for r in csv.DictReader(f)}
    for r in gradinv:
        assert float(rows[r["compressor"]]["ssim_mean"]) == pytest.approx(np.mean(r["ssim"]), abs=1e-12)
        assert f"{np.mean(r['ssim']):.3f}" in (workdir / "table1.md").read_text()
    t2 = (workdir / "table2.md").read_text()
    for r in mia:
        assert f"{r['attacks']['loss']['auc']:.3f}" in t2
        assert f"{r['test_accuracy']:.4f}" in (workdir / "utility.md").read_text()
    assert "oracle" in t2 and "calibrated" in t2
    budget_md = (workdir / "mia_budget.md").read_text()
    for r in mia:  # the tiny preset: snapshots at 5 of 10 steps, budgets 1, 2, 4 of 4 references
        assert [s["step"] for s in r["snapshots"]] == [5, 10] and r["snapshots"][-1]["attacks"] == r["attacks"]
        assert [b["references"] for b in r["budgets"]] == [1, 2, 4] and [b["subsets"] for b in r["budgets"]] == [
            4,
            2,
            1,
        ]
        assert "lira_online" not in r["budgets"][0]["attacks"] and "rmia_online" in r["budgets"][1]["attacks"]
        full = r["budgets"][-1]["attacks"]["lira_online"]  # all 4 references: the final table's row
        assert full["auc"] == r["attacks"]["lira_online"]["auc"]
        assert f"{full['auc']:.3f}" in budget_md
    assert "## Claims" in (workdir / "report.md").read_text()
    assert "SSIM" in stdout and "4 units to run" in stdout
    assert all(r["workers"] == 2 and r["bn_statistics"] == "eval" and r["observer"] == "worker" for r in gradinv)
    assert all(r["seconds"] > 0 for r in gradinv)  # each unit's wall time, for sizing runs


def test_kept_scores_rescore_to_the_stored_table(full_run):
    """A unit's kept per-example scores (membership.scores_npz) give back its table exactly, without a model."""
    workdir, _ = full_run
    for r in (r for r in results.read_records(workdir / "results.jsonl").records if r["kind"] == "mia"):
        loaded = membership.load_scores_npz(workdir / r["scores"])
        assert len(loaded["shadow_scores"]) == r["mia_shadows"] and loaded["population_target_scores"]
        table = membership.scores_table(**loaded, bootstrap=200, seed=r["seed"]).table
        assert set(table) == set(r["attacks"])
        for name, row in r["attacks"].items():
            for metric in ("auc", "tpr@1%fpr", "auc_ci"):
                assert table[name][metric] == pytest.approx(row[metric], abs=1e-12), (name, metric)
        ranks, pairs, ratio = mia_rescore.decomposition(loaded)
        assert len(ranks) == 5 and "r(x) online, views mean (RMIA's order)" in ranks
        assert 0 <= pairs["member_easier"] <= pairs["moved"] <= pairs["total"]

        # The decomposition's premise: RMIA online orders the examples as r(x) does (ties aside).
        def stacked(models):
            return np.stack([np.stack([v["loss"] for v in views], -1) for views in models])

        rmia = membership.rmia_scores(
            stacked([loaded["target_scores"]])[0],
            stacked(loaded["shadow_scores"]),
            loaded["shadow_in"],
            stacked([loaded["population_target_scores"]])[0],
            stacked(loaded["population_shadow_scores"]),
            online=True,
            offline_a=r["attacks"]["rmia_online"]["offline_a"],
        )
        order = np.argsort(ratio)
        assert np.all(np.diff(rmia[order]) >= 0) and len(np.unique(rmia)) > 1


def test_compilation_cache_goes_where_asked_and_the_environment_wins(monkeypatch, tmp_path):
    import jax  # noqa: PLC0415

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
    try:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        assert reproduce_main.use_compilation_cache(str(tmp_path / "flag")) == str(tmp_path / "env")
        assert jax.config.jax_compilation_cache_dir == before[0]  # left to JAX, which read the variable
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        assert reproduce_main.use_compilation_cache("") is None
        assert jax.config.jax_compilation_cache_dir == before[0]
        monkeypatch.setenv("HOME", str(tmp_path))
        assert reproduce_main.use_compilation_cache("~/cache") == str(tmp_path / "cache")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        assert jax.config.jax_compilation_cache_max_size == reproduce_main.COMPILATION_CACHE_MAX_BYTES
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_compilation_cache_max_size", before[1])


def test_query_views_option_keeps_the_keys_of_units_from_before_it():
    unit = dict(kind="mia", dataset="cifar10", compressor="none", mia_split="paired", mia_budgets=[])
    assert plan.unit_key({**unit, "mia_query_views": "flip"}) == plan.unit_key(unit)
    assert plan.unit_key({**unit, "mia_query_views": "image"}) != plan.unit_key(unit)
    assert plan.MIA_FIELD_DEFAULTS["mia_query_views"] == "flip"  # what those units were queried with
    got = {(v, d): units.query_augmentation(v, d) for v in ("image", "flip") for d in ("cifar10", "mnist")}
    assert got == {
        ("image", "cifar10"): "none",
        ("image", "mnist"): "none",
        ("flip", "cifar10"): "flip",
        ("flip", "mnist"): "none",
    }


def test_mia_device_count_is_part_of_a_unit_only_where_it_is_not_the_default():
    """The models' data-parallel split changes their numbers: another count is another unit, 8 keeps old keys."""
    unit = dict(kind="mia", dataset="cifar10", compressor="none", mia_split="paired", mia_budgets=[])
    default = MIA_CPU_DEVICES
    assert plan.unit_key({**unit, "mia_devices": default}) == plan.unit_key(unit)
    assert plan.unit_key({**unit, "mia_devices": default // 2}) != plan.unit_key(unit)
    assert plan.MIA_FIELD_DEFAULTS["mia_devices"] == default
    assert "mia_devices" in plan.SETTING_FIELDS["mia"]  # one workdir, one count


@pytest.mark.parametrize(
    "flag,expected",
    [("--mia=true --workers=2", 8), ("--mia=false --workers=2", 2), ("--mia=true --cpu_devices=3", 3), ("", 8)],
)
def test_a_run_asks_for_as_many_cpu_devices_as_its_units_need(flag, expected):
    FLAGS.unparse_flags()
    FLAGS(["reproduce", "--preset=tiny", *flag.split()])
    try:
        assert config.from_flags().cpu_devices == expected
    finally:
        FLAGS.unparse_flags()


NARROW = """
import sys
from trustsgd_jax.devices import narrow_cpu_devices, simulate_cpu_devices
simulate_cpu_devices(8)
import jax
if sys.argv[1] == "after":
    jax.devices()
print(narrow_cpu_devices(3), jax.device_count())
"""


@pytest.mark.parametrize(
    "xla_flags,when,expected",
    [
        ("", "before", "True 3"),  # the default count, backends not started: narrowed
        ("", "after", "False 8"),  # backends already started: kept
        ("--xla_force_host_platform_device_count=2", "before", "False 2"),  # the caller's count wins
    ],
)
def test_narrow_cpu_devices_replaces_only_the_default_count_before_jax_starts(xla_flags, when, expected):
    env = {k: v for k, v in ENV.items() if k != "XLA_FLAGS"}
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run(
        [sys.executable, "-c", NARROW, when], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == expected


def test_utility_matched_takes_each_compressor_s_first_snapshot_at_the_common_level():
    def row(c, accs):
        snaps = [dict(step=10 * (i + 1), test_accuracy=a, attacks={}) for i, a in enumerate(accs)]
        return dict(dataset="d", compressor=c, snapshots=snaps)

    got = report.utility_matched([row("none", [0.5, 0.7, 0.8]), row("powersgd:1", [0.3, 0.6, 0.65])])
    assert [(m["compressor"], m["step"], m["level"]) for m in got] == [("none", 20, 0.65), ("powersgd:1", 30, 0.65)]


def test_attack_at_step_t_trains_each_victim_once(tmp_path):
    out = reproduce_here(
        tmp_path,
        "--attack_step=2",
        "--compressors=powersgd:1",
        "--threat_models=observed,adaptive",
        "--images=2",
        "--group=1",
        "--mia=false",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # Four units (two threat models x two image groups) attack the same trained victim.
    assert out.stdout.count("trained the victim for mnist powersgd:1 to step 2") == 1, out.stdout
    recs = [json.loads(line) for line in lines(tmp_path / "results.jsonl")]
    assert len(recs) == 4 and {r["attack_step"] for r in recs} == {2}
    assert all(np.isfinite(r["ssim"]).all() for r in recs)


def gradinv_ids(workdir):
    recs = results.read_records(workdir / "results.jsonl").records
    return sorted(i for r in recs if r["kind"] == "gradinv" for i in r["image_ids"])


def test_rerun_with_another_group_attacks_every_image_exactly_once(tmp_path):
    """The issue-10 case: --group=2 then --group=1 must neither repeat nor skip an image; --images grows coverage."""
    common = ["--mia=false", "--compressors=none", "--threat_models=observed", "--iterations=3"]
    first = reproduce_here(tmp_path, *common, "--images=4", "--group=2")
    assert first.returncode == 0 and "2 units to run" in first.stdout, first.stdout + first.stderr
    after_first = gradinv_ids(tmp_path)
    assert len(after_first) == 4 == len(set(after_first))
    second = reproduce_here(tmp_path, *common, "--images=4", "--group=1")
    assert second.returncode == 0 and "0 units to run" in second.stdout, second.stdout + second.stderr
    assert gradinv_ids(tmp_path) == after_first
    third = reproduce_here(tmp_path, *common, "--images=7", "--group=2")
    assert third.returncode == 0 and "2 units to run" in third.stdout, third.stdout + third.stderr
    ids = gradinv_ids(tmp_path)
    assert len(ids) == 7 == len(set(ids)) and set(after_first) <= set(ids)
    order = np.random.default_rng(0).permutation(4000)  # the seeded order of the attacked images
    assert set(ids) == set(order[:7].tolist())


def test_unit_split_covers_every_unit_exactly_once_whatever_the_process_count():
    units = [dict(kind="gradinv", key=f"g{i}") for i in range(7)] + [dict(kind="mia", key="m0")]
    for n in range(1, 6):
        shares = [process_share(units, p, n) for p in range(n)]
        attacks = sorted(u["key"] for share in shares for u in share if u["kind"] == "gradinv")
        assert attacks == sorted(f"g{i}" for i in range(7)), n  # each once: none lost, none twice
        assert all(any(u["key"] == "m0" for u in share) for share in shares)  # collective: on every process
        sizes = [sum(u["kind"] == "gradinv" for u in share) for share in shares]
        assert max(sizes) - min(sizes) <= 1, (n, sizes)


def test_two_processes_split_the_units_into_one_results_file(tmp_path):
    """jax.distributed on localhost: 4 attack units over 2 processes, each done once, merged by process 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--mia=false", "--compressors=none,powersgd:1", "--threat_models=observed", "--iterations=3"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.reproduce",
                "--preset=tiny",
                f"--workdir={tmp_path}",
                "--progress=false",
                *common,
                "--images=2",
                "--group=1",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for i in range(2):
        assert f"process {i} of 2: 2 units to run" in outs[i], outs[i]
    recs = results.read_records(tmp_path / "results.jsonl").records
    keys = [r["key"] for r in recs]
    assert len(keys) == 4 == len(set(keys))  # 2 compressors x 2 images, none lost, none twice
    assert sorted((r["compressor"], r["image_ids"][0]) for r in recs) == sorted(
        (c, i) for c in ("none", "powersgd:1") for i in np.random.default_rng(0).permutation(4000)[:2].tolist()
    )
    assert not list(tmp_path.glob("results.p*.jsonl"))  # process 0 merged and removed the shard
    again = reproduce_here(tmp_path, *common, "--images=2", "--group=1")
    assert again.returncode == 0 and "0 units to run" in again.stdout, again.stdout + again.stderr


def test_multi_dataset_one_worker_run_resumes_to_nothing_left(tmp_path):
    """Cells differ in their data file and PowerSGD's warm-up; a rerun of the same flags is no mixed setting."""
    flags_ = [
        "--mia=false",
        "--datasets=mnist,cifar10",
        "--compressors=none,powersgd:1",
        "--threat_models=observed",
        "--iterations=3",
        "--images=1",
        "--workers=1",
        "--start_iter=1",
    ]
    first = reproduce_here(tmp_path, *flags_)
    assert first.returncode == 0 and "4 units to run" in first.stdout, first.stdout + first.stderr
    recs = results.read_records(tmp_path / "results.jsonl").records
    assert {(r["dataset"], r["start_iter"], r["workers"]) for r in recs} == {
        ("mnist", 0, 1),
        ("mnist", 1, 1),
        ("cifar10", 0, 1),
        ("cifar10", 1, 1),
    }
    again = reproduce_here(tmp_path, *flags_)
    assert again.returncode == 0 and "0 units to run" in again.stdout, again.stdout + again.stderr


def test_rerun_with_another_training_batch_is_refused(tmp_path):
    """At --attack_step > 0 the training batch decides the victim: a second victim in one workdir is refused."""
    common = [
        "--mia=false",
        "--compressors=powersgd:1",
        "--threat_models=observed",
        "--iterations=3",
        "--attack_step=1",
        "--images=1",
    ]
    first = reproduce_here(tmp_path, *common, "--batch_size=32")
    assert first.returncode == 0, first.stdout + first.stderr
    before = (tmp_path / "results.jsonl").read_text()
    assert len((tmp_path / "victims").iterdir().__next__().name) == 16  # the checkpointed victim
    again = reproduce_here(tmp_path, *common, "--batch_size=16")
    assert again.returncode == 2 and "train_batch=32" in again.stderr and "another --workdir" in again.stderr, (
        again.stderr[-2000:]
    )
    assert (tmp_path / "results.jsonl").read_text() == before
    resumed = reproduce_here(tmp_path, *common, "--batch_size=32", "--images=2")
    assert resumed.returncode == 0 and "trained the victim" not in resumed.stdout, resumed.stdout  # from orbax
    ids = gradinv_ids(tmp_path)
    assert len(ids) == 2 == len(set(ids))


def test_killed_run_resumes_to_the_same_results(full_run, tmp_path):
    workdir, _ = full_run
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.reproduce", "--preset=tiny", f"--workdir={tmp_path}", "--progress=false"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    path = tmp_path / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (path.exists() and len(lines(path)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(lines(path))
    assert 2 <= killed_at < 4, f"kill landed after {killed_at} units"
    out = reproduce(tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{killed_at} already done" in out.stdout
    assert untimed(path) == untimed(workdir / "results.jsonl")  # same content, no unit done twice


def test_truncated_last_line_is_reported_and_redone(full_run, tmp_path):
    workdir, _ = full_run
    good = (workdir / "results.jsonl").read_text()
    cut = good[: len(good) - len(good.splitlines()[-1]) // 2 - 1]  # half of the last line, no newline
    (tmp_path / "results.jsonl").write_text(cut)
    for sub in ("recon", "roc"):
        (tmp_path / sub).mkdir()
        for f in (workdir / sub).iterdir():
            (tmp_path / sub / f.name).write_bytes(f.read_bytes())
    out = reproduce(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "was cut short" in out.stdout and "3 already done" in out.stdout
    assert untimed(tmp_path / "results.jsonl") == untimed(workdir / "results.jsonl")
    assert (tmp_path / "results.jsonl.corrupt").exists()


def test_reports_render_from_a_partial_run(full_run, tmp_path):
    workdir, _ = full_run
    first = lines(workdir / "results.jsonl")[0]
    (tmp_path / "results.jsonl").write_text(first + "\n")
    written = report.write_reports(tmp_path)
    assert (tmp_path / "table1.md").exists() and "No MIA units yet" in (tmp_path / "table2.md").read_text()
    assert any(p.name == "table1.csv" for p in written)
    empty = tmp_path / "empty"
    empty.mkdir()
    report.write_reports(empty)
    assert "No paired gradient-inversion cells yet" in (empty / "report.md").read_text()


def test_corrupt_middle_line_raises(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(results.ResultsError, match="line 2"):
        results.read_records(tmp_path / "results.jsonl")


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--compressors=none,powerful:2", "unknown compressor spec"),
        ("--compressors=powersgd:200", "compresses no tensor"),
        ("--datasets=svhn", "unknown dataset 'svhn'"),
        ("--threat_models=oracle", "unknown threat model"),
        ("--workers=9", "needs 9 local devices"),
        ("--start_iter=-1", "--start_iter must be >= 0"),
        ("--bn_statistics=frozen", "unknown --bn_statistics 'frozen'"),
        ("--observers=server", "unknown observer 'server'"),
        ("--attack_step=1 --batch_size=30 --workers=4", "must be a positive multiple of --workers=4"),
        ("--workers=8 --victim_batch=600 --images=600", "exceeds the 4000 training images"),
        ("--mia_budgets=1,8", "--mia_budgets=1,8: each must be an integer in [1, 4]"),
        ("--mia_split=balanced", "need --mia_split=paired"),
        ("--cpu_devices=0", "--cpu_devices must be >= 1"),
    ],
)
def test_bad_flags_fail_before_any_work(tmp_path, flag, message):
    """In this process (a subprocess per case cost ~9 s of imports each); the command line's exit code below."""
    FLAGS.unparse_flags()
    FLAGS(["reproduce", "--preset=tiny", f"--workdir={tmp_path}", "--progress=false", *flag.split()])
    try:
        with pytest.raises(ValueError, match=re.escape(message)):  # ConfigError, or what main turns into one
            reproduce_main.prepare(config.from_flags())
    finally:
        FLAGS.unparse_flags()
    assert not (tmp_path / "results.jsonl").exists()


def test_a_bad_flag_exits_with_code_2_and_names_the_problem(tmp_path):
    out = reproduce(tmp_path, "--compressors=none,powerful:2")
    assert out.returncode == 2 and "unknown compressor spec" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "results.jsonl").exists()


def test_unwritable_workdir_fails_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = reproduce_here(blocker / "sub")
    assert out.returncode == 2 and "not writable" in out.stderr


def test_append_record_keeps_json_standard(tmp_path):
    results.append_record(tmp_path / "r.jsonl", {"x": float("inf"), "y": np.float32(1.5), "z": np.arange(2)})
    rec = json.loads((tmp_path / "r.jsonl").read_text())
    assert rec == {"x": "inf", "y": 1.5, "z": [0, 1]}


def test_markdown_table_lines():
    assert results.markdown_table(["a", "b"], [[1, ""], ["x", 2.5]]) == [
        "| a | b |",
        "|---|---|",
        "| 1 |  |",
        "| x | 2.5 |",
    ]
