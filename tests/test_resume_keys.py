"""Committed workdirs resume to nothing new: today's planning code rebuilds every finished unit's key.

A unit's key is `unit_key` of its record's input fields (what the planning
code puts in a unit); outputs (SSIM, seconds, code revision, ...) are merged
into the record after it ran and never enter the key. For every committed
``results/**/results.jsonl`` this test rebuilds, from the records' own
setting fields, the flags of the run(s) that produced it, resolves and plans
them, and asserts:

* every record's key is `unit_key` of its input fields (the fields a planned
  unit of its kind has: taken from the plan, not listed here);
* a resume plans nothing new: every unit planned against the workdir's
  records is already done, and the run passes `check_one_setting`;
* a fresh plan (no records) of the same flags plans exactly the workdir's
  cells and victim batches, and each record's key back: the whole key for a
  record in today's format, else the key of the planned unit's fields the
  record has (a field added since, like ``matmul_dtype``, was not in its key;
  a resume finds such a record's batches done by `setting_key`, which reads
  the record with the field's old value).

`NOT_REPLANNED` names the units no flags re-plan, and why; for those only
the first point holds, as it does where a dataset file the records name is
not on this machine (results computed from ../shared/data).
"""

import functools
import json
import os
import pathlib
import subprocess

import pytest
from absl import flags

from experiments.reproduce import config
from experiments.reproduce import plan as plan_lib
from trustsgd_jax import data

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS

# (workdir under results/, kind): why no flags re-plan those units.
NOT_REPLANNED = {
    ("quick_results", "mia"): "its MIA records are from before --mia_split, --mia_snapshots and --mia_budgets "
    "existed, and today's plan names all three in every MIA unit: no flags give these units' keys back, so a "
    "resume with MIA on would run them again (the quick preset's gradinv units resume to nothing new)",
}


def committed_results() -> list[pathlib.Path]:
    """The committed results files (git's list in a checkout: a run in progress may write beside them)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", "results"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        return sorted(ROOT / p for p in out.split("\0") if p.endswith("/results.jsonl"))
    except (OSError, subprocess.CalledProcessError):
        return sorted(ROOT.glob("results/**/results.jsonl"))


def plan(argv: list[str], datasets: dict, done: list[dict], mia_devices: int) -> list[dict]:
    """The units `python -m experiments.reproduce <argv>` plans against the finished records `done`."""
    FLAGS.unparse_flags()
    FLAGS(["reproduce", *argv])
    try:
        cfg = config.from_flags()
    finally:
        FLAGS.unparse_flags()
    return plan_lib.plan_units(cfg, datasets, done, mia_devices)


@functools.cache
def load(name: str, source: str) -> data.Dataset:
    """The dataset a record names by its ``data_source``: a bundled sample, or an npz file's path."""
    if source.startswith("sample:"):
        return data.load(name, "sample")
    return data.load(name, "npz", os.path.dirname(source))


def one(records: list[dict], field: str):
    """The one value of `field` in `records`."""
    values = {json.dumps(r.get(field), sort_keys=True) for r in records}
    assert len(values) == 1, (field, values)
    return records[0].get(field)


def names(records: list[dict], field: str) -> str:
    return ",".join(sorted({str(r[field]) for r in records}))


def source_flags(records: list[dict]) -> list[str]:
    """--data_source (and --data_dir) of the records' ``data_source``s."""
    sources = {r["data_source"] for r in records}
    if all(s.startswith("sample:") for s in sources):
        return ["--data_source=sample"]
    (directory,) = {os.path.dirname(s) for s in sources}
    return ["--data_source=npz", f"--data_dir={directory}"]


def cell(r: dict) -> tuple:
    return tuple(r[f] for f in plan_lib.CELL_FIELDS[r["kind"]])


def gradinv_flags(records: list[dict]) -> list[str]:
    """Flags of a gradinv-only run of these records' cells, images and grouping, in their one setting."""
    s = {f: one(records, f) for f in plan_lib.SETTING_FIELDS["gradinv"]}
    batches: dict[tuple, set] = {}
    for r in records:
        batches.setdefault(cell(r), set()).update(tuple(ids) for ids in r["victim_ids"])
    powersgd = [r for r in records if r["compressor"].startswith("powersgd")]
    argv = [
        "--gradinv=true",
        "--mia=false",
        *source_flags(records),
        "--datasets=" + names(records, "dataset"),
        "--compressors=" + names(records, "compressor"),
        "--threat_models=" + names(records, "threat"),
        "--bn_statistics=" + names(records, "bn_statistics"),
        "--observers=" + names(records, "observer"),
        f"--images={max(len(b) for b in batches.values()) * s['victim_batch']}",
        f"--group={max(len(r['victim_ids']) for r in records)}",
        f"--start_iter={one(powersgd, 'start_iter') if powersgd else 0}",
        f"--tv={s['tv']!r}",
    ]
    for f in ("model", "norm", "iterations", "restarts", "seed", "workers", "victim_batch", "batchnorm"):
        argv.append(f"--{f}={s[f]}")
    argv += [f"--attack_step={s['attack_step']}", f"--matmul_dtype={s['matmul_dtype']}"]
    if s["train_batch"] is not None:
        argv.append(f"--batch_size={s['train_batch']}")
    # Every option a preset may set is given, so the default preset's values never leak into an older workdir's plan.
    argv.append("--strongest_exclude=" + ",".join(s["strongest_exclude"] or []))
    argv.append("--checkpoints=" + ",".join(map(str, s["checkpoints"] or [])))
    if s["attack_seed"] is not None:
        argv.append(f"--attack_seed={s['attack_seed']}")
    return argv


def mia_flags(records: list[dict]) -> list[str]:
    """Flags of an MIA-only run of these records' cells in their one setting."""
    s = {f: one(records, f) for f in plan_lib.SETTING_FIELDS["mia"]}
    argv = [
        "--gradinv=false",
        "--mia=true",
        *source_flags(records),
        "--datasets=" + names(records, "dataset"),
        "--mia_datasets=" + names(records, "dataset"),
        "--compressors=" + names(records, "compressor"),
        "--mia_compressors=" + names(records, "compressor"),
        "--mia_snapshots=" + ",".join(map(str, s["mia_snapshots"])),
        "--mia_budgets=" + ",".join(map(str, s["mia_budgets"])),
    ]
    for f in ("model", "norm", "seed", "mia_shadows", "mia_steps", "mia_pool", "mia_population", "batch_size"):
        argv.append(f"--{f}={s[f]}")
    return argv + [f"--mia_split={s['mia_split']}", f"--mia_query_views={s['mia_query_views']}"]


def datasets_of(records: list[dict]) -> dict:
    return {r["dataset"]: load(r["dataset"], r["data_source"]) for r in records}


@functools.cache
def input_fields(kind: str) -> frozenset:
    """The fields of a planned unit of `kind`: a tiny run's plan with every field that exists only when set, set."""
    argv = ["--preset=tiny", f"--gradinv={kind == 'gradinv'}", f"--mia={kind == 'mia'}"]
    if kind == "gradinv":
        argv += ["--threat_models=strongest", "--strongest_exclude=cosine_support", "--attack_seed=1"]
    units = plan(argv, {"mnist": data.load("mnist", "sample")}, [], 8)
    return frozenset(f for u in units for f in u if f != "key")


def rebuilt_runs(kind: str, records: list[dict]) -> list[tuple[list[str], list[dict]]]:
    """(flags, the records they plan): one run whose grid is exactly the records' cells, else one per dataset or cell.

    A workdir can hold the cells of several runs of one setting (CIFAR-10 in both BatchNorm modes, MNIST in one).
    """
    flags_of = gradinv_flags if kind == "gradinv" else mia_flags
    for part in (lambda c: (), lambda c: c[0], lambda c: c):  # the whole workdir, each dataset, each cell
        groups: dict = {}
        for r in records:
            groups.setdefault(part(cell(r)), []).append(r)
        runs = [(flags_of(rs), rs) for rs in groups.values()]
        if all(
            {cell(u) for u in plan(argv, datasets_of(rs), [], devices(rs))} == {cell(r) for r in rs}
            for argv, rs in runs
        ):
            return runs
    raise AssertionError("no flags plan exactly these cells")


def devices(records: list[dict]) -> int:
    """The device count MIA units were planned with (gradinv units do not name one)."""
    return one(records, "mia_devices") if records[0]["kind"] == "mia" else 8


RESULTS = committed_results()
IDS = [str(p.parent.relative_to(ROOT / "results")) for p in RESULTS]


def stored_records(path: pathlib.Path) -> list[dict]:
    """The records as written (`read_all_records` fills in fields older records lack: not for keys)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("path", RESULTS, ids=IDS)
def test_every_record_key_is_the_unit_key_of_its_input_fields(path):
    for r in stored_records(path):
        inputs = {f: r[f] for f in input_fields(r["kind"]) if f in r}
        assert plan_lib.unit_key(inputs) == r["key"], r["key"]


@pytest.mark.parametrize("path", RESULTS, ids=IDS)
def test_committed_workdir_resumes_to_nothing_new(path):
    name = str(path.parent.relative_to(ROOT / "results"))
    stored = {r["key"]: r for r in stored_records(path)}
    done = plan_lib.read_all_records(path.parent)  # as a resume reads them
    assert sorted(stored) == sorted(r["key"] for r in done)
    kinds = sorted({r["kind"] for r in done} - {kind for n, kind in NOT_REPLANNED if n == name})
    for kind in kinds:
        records = [r for r in done if r["kind"] == kind]
        try:
            datasets_of(records)
        except data.DataError as e:
            pytest.skip(f"{name} {kind}: {e}")
        for argv, rs in rebuilt_runs(kind, records):
            resumed = plan(argv, datasets_of(rs), done, devices(rs))
            assert [u["key"] for u in resumed if u["key"] not in stored] == [], argv
            plan_lib.check_one_setting(resumed, done, path)
            fresh = {unit_id(u): u for u in plan(argv, datasets_of(rs), [], devices(rs))}
            for r in (stored[r["key"]] for r in rs):
                u = fresh[unit_id(r)]  # what a fresh run plans for the record's cell and victim batches
                assert plan_lib.unit_key({f: v for f, v in u.items() if f in r}) == r["key"], (argv, r["key"])
                if set(u) <= set(r):  # a record in today's format: its whole key
                    assert u["key"] == r["key"], (argv, r["key"])


def unit_id(u: dict) -> tuple:
    """A unit's cell and victim batches (gradinv), or its cell (MIA)."""
    return cell(u), json.dumps(u.get("victim_ids"))
