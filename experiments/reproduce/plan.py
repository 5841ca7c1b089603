"""What a run does: its units, their keys, the one-setting rule, each process's share, and the results files.

A unit is a dict that names everything it reads (its images, the other
workers' images, the training batch of its victim, ...); its key is a hash
of that dict, so a rerun skips exactly the finished work. A finished record
is the unit with its outputs merged in (`OUTPUT_FIELDS` and the results of
`units.run_gradinv_unit` / `units.run_mia_unit`), none of which enter the key.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

from experiments.reproduce.config import Config, ConfigError, MiaConfig
from experiments.reproduce.presets import MIA_CPU_DEVICES
from trustsgd_jax import compress, data, models, results
from trustsgd_jax.attacks import victim

# Compressor kinds whose messages a compression-aware objective can adapt to (objectives.adaptive_objective).
ADAPTIVE_KINDS = ("powersgd", "topk", "topk_level", "randomk")

# What identifies a result cell in the reports, and what else a finished unit's meaning depends on. Within one
# workdir, SETTING_FIELDS must agree across all units of a kind, PER_CELL_FIELDS across the units of one dataset and
# compressor (they differ between cells by construction: the data file, PowerSGD's warm-up). See `check_one_setting`.
CELL_FIELDS = {
    "gradinv": ("dataset", "compressor", "threat", "bn_statistics", "observer"),
    "mia": ("dataset", "compressor"),
}
SETTING_FIELDS = {
    "gradinv": (
        "model",
        "norm",
        "iterations",
        "restarts",
        "tv",
        "seed",
        "workers",
        "victim_batch",
        "batchnorm",
        "attack_step",
        "train_batch",
        "matmul_dtype",
        "strongest_exclude",
        "attack_seed",
        "checkpoints",
    ),
    "mia": (
        "model",
        "norm",
        "seed",
        "mia_shadows",
        "mia_steps",
        "mia_pool",
        "mia_population",
        "batch_size",
        "mia_split",
        "mia_snapshots",
        "mia_budgets",
        "mia_query_views",
        "mia_devices",
    ),
}
# What a MIA record from before a field existed was computed with.
MIA_FIELD_DEFAULTS = {
    "mia_split": "balanced",
    "mia_snapshots": [],
    "mia_budgets": [],
    "mia_query_views": "flip",
    "mia_devices": MIA_CPU_DEVICES,
}
PER_CELL_FIELDS = {"gradinv": ("data_source", "start_iter"), "mia": ("data_source",)}
# What a finished record adds to its unit's fields besides its results; none of it enters the key.
OUTPUT_FIELDS = ("key", "seconds", "code_revision", "devices")


def unit_key(record: dict) -> str:
    """A hash of everything a unit reads: its whole record (less the key itself)."""
    fields = {k: v for k, v in record.items() if k not in OUTPUT_FIELDS}
    # Values from before these options existed: those units keep their keys.
    if fields.get("mia_query_views") == "flip":
        del fields["mia_query_views"]
    if fields.get("mia_devices") == MIA_CPU_DEVICES:  # the models' data-parallel split (numerics depend on it)
        del fields["mia_devices"]
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def setting_key(record: dict) -> str:
    """A hash of a gradinv unit's setting: everything but which victim batches it attacks."""
    kind = record["kind"]
    fields = {k: record.get(k) for k in ("kind", *CELL_FIELDS[kind], *SETTING_FIELDS[kind], *PER_CELL_FIELDS[kind])}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def victim_batches(ds: data.Dataset, images: int, batch: int, workers: int, seed: int) -> list[tuple[list, list]]:
    """The victim batches of a setting: (victim ids [B], other workers' ids [N-1, B]), from a seeded order."""
    order = np.random.default_rng(seed).permutation(len(ds.x_train))
    out = []
    for j in range(images // batch):
        ids = order[j * batch : (j + 1) * batch]
        out.append((ids.tolist(), victim.other_worker_ids(ids, len(ds.x_train), workers, seed).tolist()))
    return out


def gradinv_settings(cfg: Config, name: str, ds: data.Dataset) -> list[dict]:
    """The gradinv settings of one dataset: its cells (compressor x threat x BatchNorm mode x observer) in order.

    An adaptive attacker only where the message is one it can adapt to (a
    sparse or low-rank worker message): elsewhere it would equal observed.
    """
    settings = []
    for spec in cfg.compressors:
        kind = compress.parse_spec(spec).kind
        for threat in cfg.threat_models:
            warming_up = kind == "powersgd" and cfg.attack_step < cfg.start_iter  # sends its full gradient
            if threat == "adaptive" and (kind not in ADAPTIVE_KINDS or warming_up):
                continue  # a dense or quantised message: nothing to adapt to, identical to observed
            for bn in cfg.batchnorm:
                for observer in cfg.observers:
                    if observer != "worker" and threat == "adaptive":
                        continue  # the aggregate is a dense mixture: nothing to adapt to
                    settings.append(gradinv_setting(cfg, name, ds, spec, threat, bn, observer))
    return settings


def gradinv_setting(
    cfg: Config, name: str, ds: data.Dataset, spec: str, threat: str, bn: models.BatchNormSetting, observer: str
) -> dict:
    """One gradinv cell's unit fields, less its victim batches."""
    setting = dict(
        kind="gradinv",
        dataset=name,
        compressor=spec,
        threat=threat,
        bn_statistics=bn.statistics,
        observer=observer,
        model=cfg.model,
        norm=bn.norm,
        iterations=cfg.iterations,
        restarts=cfg.restarts,
        tv=cfg.tv,
        seed=cfg.seed,
        data_source=ds.source,
        workers=cfg.workers,
        victim_batch=cfg.victim_batch,
        batchnorm=bn.sync,
        start_iter=cfg.start_iter if compress.parse_spec(spec).kind == "powersgd" else 0,
        attack_step=cfg.attack_step,
        train_batch=cfg.batch_size if cfg.attack_step > 0 else None,
        matmul_dtype=cfg.matmul_dtype,
    )
    # Fields that exist only when set, so units from before them keep their keys.
    if threat == "strongest" and cfg.strongest_exclude:
        setting["strongest_exclude"] = sorted(cfg.strongest_exclude)
    if cfg.attack_seed is not None:
        setting["attack_seed"] = cfg.attack_seed
    if cfg.checkpoints:
        setting["checkpoints"] = list(cfg.checkpoints)
    return setting


def mia_unit(cfg: Config, mia: MiaConfig, name: str, ds: data.Dataset, spec: str, mia_devices: int) -> dict:
    """One MIA unit: a dataset x compressor's target and reference models, and every attack on them."""
    return dict(
        kind="mia",
        dataset=name,
        compressor=spec,
        model=cfg.model,
        norm=cfg.norm,
        seed=cfg.seed,
        mia_shadows=mia.shadows,
        mia_steps=mia.steps,
        mia_pool=mia.pool,
        mia_population=mia.population,
        batch_size=cfg.batch_size,
        mia_split=mia.split,
        mia_snapshots=sorted(set(mia.snapshots)),
        mia_budgets=sorted(set(mia.budgets)),
        mia_query_views=mia.query_views,
        mia_devices=mia_devices,
        data_source=ds.source,
    )


def plan_units(
    cfg: Config, datasets: dict[str, data.Dataset], done_records: list[dict], mia_devices: int
) -> list[dict]:
    """Every unit of this run, keyed; gradinv units cover exactly the victim batches no finished unit covers.

    ``mia_devices``: the devices MIA models train over (all of the run's: `jax.device_count()`).
    """
    covered: dict[str, set] = {}
    for r in done_records:
        if r.get("kind") == "gradinv":
            covered.setdefault(setting_key(r), set()).update(tuple(v) for v in r.get("victim_ids", []))
    units = []
    for name in cfg.datasets if cfg.gradinv else []:
        ds = datasets[name]
        batches = victim_batches(ds, cfg.images, cfg.victim_batch, cfg.workers, cfg.seed)
        for setting in gradinv_settings(cfg, name, ds):
            done = covered.get(setting_key(setting), set())
            todo = [b for b in batches if tuple(b[0]) not in done]
            for g in range(0, len(todo), cfg.group):
                chunk = todo[g : g + cfg.group]
                units.append(dict(setting, victim_ids=[b[0] for b in chunk], worker_ids=[b[1] for b in chunk]))
    if cfg.mia:
        for name in cfg.mia.datasets:
            for spec in cfg.mia.compressors:
                units.append(mia_unit(cfg, cfg.mia, name, datasets[name], spec, mia_devices))
    for u in units:
        u["key"] = unit_key(u)
    return units


def check_one_setting(units: list[dict], done_records: list[dict], results_path: pathlib.Path) -> None:
    """Refuses a run whose setting differs from the finished units' in the same workdir (see `SETTING_FIELDS`)."""
    for u in units:
        kind = u["kind"]
        for r in done_records:
            if r.get("kind") != kind:
                continue
            fields = list(SETTING_FIELDS[kind])
            if (r.get("dataset"), r.get("compressor")) == (u["dataset"], u["compressor"]):
                fields += PER_CELL_FIELDS[kind]
            differ = [f for f in fields if r.get(f) != u.get(f)]
            if differ:
                f = differ[0]
                raise ConfigError(
                    f"{results_path} holds {kind} results with {f}={r.get(f)!r}; this run has {f}={u.get(f)!r}. A "
                    "workdir holds one setting (merging would mix or double-count results): rerun with the same flags "
                    "or pass another --workdir."
                )


# Seconds per image of a ResNet-18 gradinv unit at 1,000 iterations, eval mode, N = 4, one image per unit, warm
# compilation cache, this 2-core CPU, all strongest candidates (results/resnet18_speed_job): the estimate's fallback
# before a workdir has measured units of its own. A candidate fewer costs proportionally less.
MEASURED_SECONDS = {("resnet18", "none"): 106.0, ("resnet18", "powersgd"): 248.0, ("resnet18", "topk_level"): 368.0}
# The measured units ran observed + 2 compression-aware candidates: each excluded one costs its share less.
SLOWEST_CANDIDATE = {"powersgd": "factors_residual", "topk_level": "cosine_support"}


def expected_seconds(todo: list[dict], done_records: list[dict]) -> tuple[float, int]:
    """(expected seconds of `todo`, how many of its units had no estimate), from measured unit times.

    A unit's estimate is the median ``seconds`` of the finished units of the
    same model, compressor, threat, BatchNorm mode, iterations and images per
    unit; else `MEASURED_SECONDS` scaled by iterations and images.
    """

    def shape(u: dict) -> tuple:
        return (
            u.get("model"),
            u.get("compressor"),
            u.get("threat"),
            u.get("bn_statistics"),
            u.get("iterations"),
            len(sum(u.get("victim_ids", []), [])),
            u.get("attack_step"),
        )

    measured: dict[tuple, list[float]] = {}
    for r in done_records:
        if r.get("kind") == "gradinv" and r.get("seconds"):
            measured.setdefault(shape(r), []).append(r["seconds"])
    total, unknown = 0.0, 0
    for u in todo:
        if shape(u) in measured:
            total += float(np.median(measured[shape(u)]))
            continue
        kind = compress.parse_spec(u["compressor"]).kind
        base = MEASURED_SECONDS.get((u["model"], kind)) if u["kind"] == "gradinv" else None
        if base is None:
            unknown += 1
            continue
        dropped = int(SLOWEST_CANDIDATE.get(kind, "") in u.get("strongest_exclude", ()))
        share = 1 - dropped / 3 if kind != "none" else 1
        total += base * share * u["iterations"] / 1000 * len(sum(u["victim_ids"], []))
    return total, unknown


def process_share(units: list[dict], process_id: int, num_processes: int) -> list[dict]:
    """This process's units: gradinv units round-robin over the processes, MIA units on every process.

    A gradinv unit needs no collective, so each runs on exactly one process.
    An MIA unit trains its models across all processes' devices (a
    collective), so every process takes part in each; process 0 records it.
    """
    share = []
    attacks = 0
    for u in units:
        if u["kind"] != "gradinv":
            share.append(u)
            continue
        if attacks % num_processes == process_id:
            share.append(u)
        attacks += 1
    return share


def shard_path(workdir: pathlib.Path, process_id: int) -> pathlib.Path:
    """Where a process appends its finished units: ``results.jsonl`` (process 0) or ``results.p<i>.jsonl``."""
    return workdir / ("results.jsonl" if process_id == 0 else f"results.p{process_id}.jsonl")


def read_all_records(workdir: pathlib.Path) -> list[dict]:
    """Finished units of every process: ``results.jsonl`` joined with any shard a process left (one per key)."""
    seen: dict[str, dict] = {}
    for path in [workdir / "results.jsonl", *sorted(workdir.glob("results.p*.jsonl"))]:
        for r in results.read_records(path).records:
            if r.get("kind") == "gradinv":
                r.setdefault("matmul_dtype", "float32")  # records from before the option attacked in fp32
            if r.get("kind") == "mia":
                for name, value in MIA_FIELD_DEFAULTS.items():
                    r.setdefault(name, value)
            seen.setdefault(r.get("key", ""), r)
    return list(seen.values())


def merge_shards(workdir: pathlib.Path) -> int:
    """Process 0, after every process finished: appends the shards' units to ``results.jsonl``, removes the shards.

    Each record is fsynced into ``results.jsonl`` before its shard goes, so
    a crash in between loses nothing (the reader joins both, one per key).
    """
    main_path = workdir / "results.jsonl"
    have = {r.get("key") for r in results.read_records(main_path).records}
    moved = 0
    for shard in sorted(workdir.glob("results.p*.jsonl")):
        results.repair_trailing_line(shard)
        for r in results.read_records(shard).records:
            if r.get("key") not in have:
                results.append_record(main_path, r)
                have.add(r.get("key"))
                moved += 1
        shard.unlink()
    return moved
