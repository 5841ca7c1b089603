"""The run: flags -> `config.Config` -> prepare -> plan -> run the units -> reports.

`main` is absl's entry (``python -m experiments.reproduce``, see
``__main__.py``); `run` does the work for a `Config`, so a caller (a test)
can run one without the command line.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from experiments import report
from experiments.report import claims
from experiments.reproduce import config, plan, units
from experiments.reproduce.config import Config, ConfigError
from trustsgd_jax import data, devices, models, results

CODE_REVISION = results.code_revision()

# Entries of a ResNet-18 unit are large (~80 MB each: the parameters are constants of the compiled programs; a
# PowerSGD strongest unit wrote 556 MB), so the cache keeps the most recently used 4 GiB (JAX evicts the rest).
COMPILATION_CACHE_MAX_BYTES = 4 * 2**30


def use_compilation_cache(path: str) -> str | None:
    """Points JAX's persistent compilation cache at `path` (expanded) unless the environment chose one; returns it.

    XLA compiles per program; every unit builds its programs afresh, so
    without the cache a unit of the same shapes as the one before (the next
    image of a cell, a resumed run) compiles them all again. On this 2-core
    CPU that was 40-45% of a ResNet-18 unit at 1000 iterations (README,
    Benchmarks). The cache is keyed by the program and the compiler, so a
    stale entry is never used.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not path:
        return None
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    return path


def prepare(cfg: Config) -> tuple[pathlib.Path, dict[str, data.Dataset]]:
    """(the workdir, every dataset a unit reads): everything that can be wrong with the run fails here, first."""
    workdir = results.ensure_workdir(cfg.workdir)
    datasets = {name: data.load(name, cfg.data_source, cfg.data_dir, cfg.tfds_data_dir) for name in cfg.loaded_datasets}
    params = {}
    for name in cfg.datasets:
        ds = datasets[name]
        model = models.make_model(cfg.model, ds.num_classes, norm=cfg.norm)
        params[name] = models.init_variables(model, jax.random.key(cfg.seed), ds.image_shape)["params"]
    config.check_data(cfg, datasets, params)
    return workdir, datasets


def main(argv) -> int:
    del argv
    return run(config.from_flags())


def run(cfg: Config) -> int:
    """The whole run of `cfg`: its units not yet done in its workdir, then the reports (process 0)."""
    devices.narrow_cpu_devices(cfg.cpu_devices)
    if cfg.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    use_compilation_cache(cfg.compilation_cache_dir)
    try:
        workdir, datasets = prepare(cfg)
    except (data.DataError, results.ResultsError, ValueError) as e:
        raise ConfigError(str(e)) from e
    process_id, num_processes = jax.process_index(), jax.process_count()
    done_records = read_done(workdir, process_id)
    planned = plan.plan_units(cfg, datasets, done_records, mia_devices=jax.device_count())
    plan.check_one_setting(planned, done_records, workdir / "results.jsonl")
    (workdir / "recon").mkdir(exist_ok=True)
    (workdir / "roc").mkdir(exist_ok=True)
    done = {r.get("key") for r in done_records}
    todo = plan.process_share([u for u in planned if u["key"] not in done], process_id, num_processes)
    print_plan(todo, done_records, workdir, process_id, num_processes, cfg.dry_run)
    if cfg.dry_run:
        return 0
    run_units(cfg, todo, datasets, workdir)
    if num_processes > 1:
        multihost_utils.sync_global_devices("reproduce: every process finished its units")
    if process_id == 0:
        moved = plan.merge_shards(workdir)
        if moved:
            print(f"merged {moved} units of the other processes into {workdir / 'results.jsonl'}", flush=True)
        written = report.write_reports(workdir)
        print("reports: " + ", ".join(str(p) for p in written), flush=True)
        print_beside_committed(workdir, cfg.committed_study)
    return 0


def print_beside_committed(workdir: pathlib.Path, study: str) -> None:
    """Prints (and writes to committed_table1.md) this run's cells beside the committed study's cells."""
    rows_path = pathlib.Path(study) / "table1_rows.json" if study else None
    if rows_path is None or not rows_path.is_file():
        return
    fresh = claims.cells([r for r in plan.read_all_records(workdir) if r.get("kind") == "gradinv"])
    if not fresh:
        return
    text = (
        f"# This run beside the committed study {study}\n\nThe committed cells come from `{study}` (its own "
        f"images, many per cell; `{study}/table1.md` shows them all); this run's from its own images.\n\n"
        + claims.beside_committed(fresh, json.loads(rows_path.read_text()), study)
    )
    results.write_atomic(workdir / "committed_table1.md", text)
    print(text, flush=True)


def read_done(workdir: pathlib.Path, process_id: int) -> list[dict]:
    """The finished units of every process, after moving aside a last line a killed run cut short."""
    for path in {workdir / "results.jsonl", plan.shard_path(workdir, process_id)}:
        damaged = results.repair_trailing_line(path)
        if damaged is not None:
            print(
                f"WARNING: the last line of {path} was cut short (a run was killed while writing); moved it "
                f"to {path}.corrupt and that unit will be redone: {damaged[:80]!r}",
                flush=True,
            )
    return plan.read_all_records(workdir)


def print_plan(
    todo: list[dict], done_records: list[dict], workdir: pathlib.Path, process_id: int, num_processes: int, each: bool
) -> None:
    """How many units this process runs, how long they should take, and (`each`: --dry_run) which."""
    print(
        f"process {process_id} of {num_processes}: {len(todo)} units to run; {len(done_records)} already done in "
        f"{workdir}; {jax.local_device_count()} local {jax.default_backend().upper()} devices",
        flush=True,
    )
    seconds, unknown = plan.expected_seconds(todo, done_records)
    print(
        f"expected duration: {seconds / 3600:.1f} h from measured unit times"
        + (f" (+ {unknown} units with no measured time)" if unknown else ""),
        flush=True,
    )
    for u in todo if each else []:
        print(
            f"  {u['key']} {u['kind']} {u['dataset']} {u.get('compressor')} {u.get('threat', '')} "
            f"{u.get('bn_statistics', '')} images {sum(u.get('victim_ids', []), [])}"
        )


def run_units(cfg: Config, todo: list[dict], datasets: dict[str, data.Dataset], workdir: pathlib.Path) -> None:
    """Runs `todo` in order, appending each finished record as one fsynced line.

    A gradinv unit runs on this process alone and goes to its shard; every
    process trains each MIA unit together, and process 0 records it.
    """
    process_id, num_processes = jax.process_index(), jax.process_count()
    is_main = process_id == 0
    show = cfg.progress and is_main
    bar = tqdm(total=len(todo), desc="units", unit="unit", dynamic_ncols=True, disable=not show)
    for u in todo:
        t0 = time.time()
        ds = datasets[u["dataset"]]
        if u["kind"] == "gradinv":
            record = units.run_gradinv_unit(u, ds, workdir, show)
            # Wall seconds of the unit on this process (victim round, compiling, every candidate, scoring): for
            # sizing a run from measured throughput. Not a setting field: a resumed workdir may mix machines.
            record["seconds"] = round(time.time() - t0, 1)
            line = (
                f"{u['dataset']} {u['compressor']} {u['threat']} {u['bn_statistics']}-mode {u['observer']} "
                f"images {sum(u['victim_ids'], [])}: SSIM {np.mean(record['ssim']):.3f} "
                f"PSNR {np.mean(record['psnr']):.1f} dB"
            )
        else:
            record = units.run_mia_unit(u, ds, workdir, cfg.mia.parallel_models if cfg.mia else 1)
            t = record["attacks"]
            line = (
                f"MIA {u['dataset']} {u['compressor']}: loss AUC {t['loss']['auc']:.3f}, LiRA TPR@1%FPR "
                f"{t.get('lira_online', t['loss'])['tpr@1%fpr']:.3f}, test acc {record['test_accuracy']:.3f}"
            )
        # Outputs, not inputs (the key ignores them): which code and how many devices produced this record.
        record["code_revision"] = CODE_REVISION
        record["devices"] = jax.device_count()
        if u["kind"] == "gradinv":
            results.append_record(plan.shard_path(workdir, process_id), record)  # each runs on one process only
        elif is_main:  # every process trained it together; one records it
            results.append_record(workdir / "results.jsonl", record)
        bar.write(f"{line}  ({time.time() - t0:.0f}s)" if num_processes == 1 else f"[process {process_id}] {line}")
        bar.update(1)
    bar.close()
