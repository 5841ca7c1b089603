r"""Reproduce and extend the study: Table 1, Figure 1 and Table 2 from one resumable run.

    python -m experiments.reproduce                       # --preset=quick: CPU, bundled data, minutes
    python -m experiments.reproduce --preset=paper        # ResNet-18, paper scale (GPU / several hosts)

Units of work, each appended to ``<workdir>/results.jsonl`` as one fsynced
line when it finishes. A unit is a pure function of its record: the record
names everything the unit reads (its images, the other workers' images, the
training batch of its victim, ...) and its key is a hash of the whole record,
so a rerun skips exactly the finished work:

* ``gradinv``: one setting (dataset, compressor, threat model, BatchNorm mode,
  observer, ...) and a group of victim batches. Each victim batch is worker
  0's batch in a real round of ``--workers`` workers (`attacks.victim`); its
  message is inverted and scored by SSIM / PSNR; reconstructions are saved
  under ``recon/``. A rerun with another ``--group`` or ``--images`` attacks
  only the victim batches no finished unit covers.
* ``mia``: dataset x compressor: target and shadow models trained with the
  compressor; threshold attacks and LiRA; the target's accuracy on held-out
  data and its wire bytes (the utility table).

A workdir holds one setting: a rerun whose flags change what a finished
result means (iterations, workers, the victims' training batch, ...) is
refused with the field named, since merging the two would count one cell
twice. Reports (``experiments/report.py``) are regenerated at the end of
every run. Presets (`experiments.presets`) only set defaults; flags on the
command line win.
"""

from __future__ import annotations

import sys

from experiments.xla_env import narrow_cpu_devices, simulate_cpu_devices

# Membership inference trains its models data-parallel over every device, so their numbers depend on the count;
# 8 is the count its committed results used. `main` narrows it for runs without membership inference (--cpu_devices).
MIA_CPU_DEVICES = 8
simulate_cpu_devices(MIA_CPU_DEVICES)

import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from experiments import report  # noqa: E402
from experiments.presets import PRESETS  # noqa: E402
from trustsgd_jax import compress, data, models, results, train  # noqa: E402
from trustsgd_jax.attacks import audit as gradinv  # noqa: E402
from trustsgd_jax.attacks import membership, objectives, shadows, victim  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "quick", list(PRESETS), "flag defaults: tiny (tests), quick (CPU), table1, paper")
flags.DEFINE_list("datasets", None, "datasets, e.g. mnist,cifar10,cifar100")
flags.DEFINE_list("compressors", None, "compressor specs, e.g. none,powersgd:1,topk_level:1")
flags.DEFINE_list("threat_models", None, "observed, adaptive and/or strongest (gradinv.THREATS)")
flags.DEFINE_integer("images", None, "images attacked per dataset and setting")
flags.DEFINE_integer("victim_batch", 1, "images in one victim batch (B, per worker)")
flags.DEFINE_integer("group", None, "victim batches attacked together in one program (one unit)")
flags.DEFINE_integer("iterations", None, "attack iterations")
flags.DEFINE_integer("restarts", None, "attack restarts")
flags.DEFINE_float("tv", 1e-4, "total-variation weight")
flags.DEFINE_list(
    "strongest_exclude",
    [],
    "objectives the strongest attacker does not run (a cut for time, e.g. factors_residual,cosine_support); "
    "recorded in each unit",
)
flags.DEFINE_integer(
    "attack_seed",
    None,
    "seed of the attack's initial noise when it should differ from --seed (trajectory spread); the model and the "
    "images still follow --seed",
)
flags.DEFINE_integer("workers", None, "data-parallel workers N in the attacked round (the victim is worker 0)")
flags.DEFINE_enum(
    "batchnorm",
    "local",
    list(victim.BATCHNORM),
    "BatchNorm synchronisation: local (PyTorch DDP's default) or sync (statistics all-reduced)",
)
flags.DEFINE_list(
    "bn_statistics",
    None,
    "BatchNorm mode(s) of the attacked round: train (what training sends) "
    "and/or eval (running averages, Geiping et al.'s setting)",
)
flags.DEFINE_list(
    "observers",
    ["worker"],
    "observer(s): worker (worker 0's own message), aggregate (the averaged update) and/or "
    "peer (the aggregate less worker N-1's own contribution)",
)
flags.DEFINE_integer(
    "start_iter",
    0,
    "PowerSGD sends the plain mean for the first start_iter steps (PyTorch's "
    "start_powerSGD_iter; 0 compresses from the first step)",
)
flags.DEFINE_enum(
    "matmul_dtype",
    "float32",
    list(gradinv.MATMUL_DTYPES),
    "the attack's convolution matmuls: float32, or bfloat16 inputs with fp32 accumulation (README, Benchmarks: its "
    "speed and its effect on SSIM)",
)
flags.DEFINE_integer("attack_step", 0, "attack at this training step (0: first step, no error memory)")
flags.DEFINE_string("model", None, "convnet | resnet18")
flags.DEFINE_enum(
    "norm",
    "batch",
    ["batch", "group", "none"],
    "the model's normalisation: batch (BatchNorm, "
    "synchronised or local by --batchnorm), group (GroupNorm) or none: the controls without BatchNorm",
)
flags.DEFINE_bool("gradinv", True, "run gradient-inversion units (--gradinv=false: membership inference only)")
flags.DEFINE_bool("mia", None, "run membership inference units")
flags.DEFINE_list("mia_datasets", None, "datasets for membership inference (default: --datasets)")
flags.DEFINE_list("mia_compressors", None, "compressors for membership inference (default: --compressors)")
flags.DEFINE_integer("mia_shadows", None, "shadow models per MIA configuration")
flags.DEFINE_integer("mia_steps", None, "training steps of target and shadow models")
flags.DEFINE_integer("mia_pool", None, "images in the MIA pool (members + non-members)")
flags.DEFINE_integer("mia_population", None, "RMIA's population: images after the pool, in no model's training set")
flags.DEFINE_enum("mia_split", "paired", shadows.SPLITS, "reference models' IN/OUT design (shadows.shadow_splits)")
flags.DEFINE_list(
    "mia_snapshots", None, "also score the models after these training steps (utility-matched comparison)"
)
flags.DEFINE_enum(
    "mia_query_views",
    "image",
    ("image", "flip"),
    "MIA queries: the image alone, the view the models trained on (they train without augmentation), or the image "
    "and its horizontal flip (CIFAR; MNIST digits are queried alone), which the tables before this option used",
)
flags.DEFINE_list("mia_budgets", None, "reference-model budgets k for the budget curves (first k references)")
flags.DEFINE_integer("parallel_models", 1, "target/shadow models trained at once (train.fit_many); >1 on real devices")
flags.DEFINE_integer("batch_size", 64, "global training batch (victims at --attack_step > 0, MIA models)")
flags.DEFINE_string("data_source", "auto", "auto | npz | sample | tfds")
flags.DEFINE_string("data_dir", None, "directory of {dataset}.npz (else $TRUSTSGD_DATA_DIR, else bundled sample)")
flags.DEFINE_string("tfds_data_dir", None, "prepared TFDS data_dir for --data_source=tfds")
flags.DEFINE_string("workdir", "runs/reproduce", "output directory (resumable)")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_string(
    "compilation_cache_dir",
    "~/.cache/trustsgd-jax/xla",
    "JAX's persistent compilation cache: units of the same shapes (more images, a resumed run) reuse the compiled "
    "attacks and rounds instead of compiling them again; '' turns it off ($JAX_COMPILATION_CACHE_DIR wins)",
)
flags.DEFINE_integer(
    "cpu_devices",
    None,
    "simulated CPU devices of this process (CPU only; a count in $XLA_FLAGS wins). Default: 8 when membership "
    "inference runs (its models train data-parallel over every device), else --workers (the attacked round needs N; "
    "each attack runs on one device, and fewer simulated devices make it faster on a small CPU)",
)
flags.DEFINE_bool("progress", True, "progress bars")
flags.DEFINE_bool("dry_run", False, "plan the units, print their count and expected duration, run nothing")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host)")
flags.DEFINE_integer("num_processes", 1, "processes (multi-host)")
flags.DEFINE_integer("process_id", 0, "this process (multi-host)")


class ConfigError(ValueError):
    pass


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


def apply_preset():
    for name, value in PRESETS[FLAGS.preset].items():
        if not FLAGS[name].present:
            setattr(FLAGS, name, value)
    if FLAGS.mia_datasets is None:
        FLAGS.mia_datasets = list(FLAGS.datasets)
    if FLAGS.mia_compressors is None:
        FLAGS.mia_compressors = list(FLAGS.compressors)
    for flag in ("mia_snapshots", "mia_budgets"):  # absl lists hold strings; presets give ints
        values = getattr(FLAGS, flag) or []
        try:
            setattr(FLAGS, flag, [int(v) for v in values])
        except ValueError as e:
            raise ConfigError(f"--{flag}={','.join(map(str, values))}: integers expected.") from e
    if FLAGS.group is None:
        FLAGS.group = max(1, FLAGS.images // FLAGS.victim_batch)


CODE_REVISION = results.code_revision()
# What a finished record adds to its unit's fields; none of it enters the key.
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


def validate(params_by_dataset, datasets):
    """All flag errors before any work starts."""
    cpu_devices()  # main used it already; here for callers of prepare alone
    for t in FLAGS.threat_models:
        if t not in gradinv.THREATS:
            raise ConfigError(f"unknown threat model {t!r}; use {', '.join(gradinv.THREATS)}.")
    for o in FLAGS.observers:
        if o not in victim.OBSERVERS:
            raise ConfigError(f"unknown observer {o!r}; use {', '.join(victim.OBSERVERS)}.")
    for b in FLAGS.bn_statistics:
        if b not in victim.BN_STATISTICS:
            raise ConfigError(f"unknown --bn_statistics {b!r}; use {', '.join(victim.BN_STATISTICS)}.")
    if FLAGS.images < 1 or FLAGS.iterations < 1 or FLAGS.restarts < 1 or FLAGS.group < 1:
        raise ConfigError("--images, --iterations, --restarts and --group must be >= 1.")
    if FLAGS.victim_batch < 1 or FLAGS.images % FLAGS.victim_batch:
        raise ConfigError(f"--images={FLAGS.images} is not a multiple of --victim_batch={FLAGS.victim_batch}.")
    if FLAGS.start_iter < 0:
        raise ConfigError(f"--start_iter must be >= 0, got {FLAGS.start_iter}.")
    if FLAGS.attack_step < 0:
        raise ConfigError(f"--attack_step must be >= 0, got {FLAGS.attack_step}.")
    try:
        victim.check_workers(FLAGS.workers)
    except gradinv.AttackError as e:
        raise ConfigError(f"--workers: {e}") from e
    if FLAGS.attack_step > 0 and (FLAGS.batch_size < 1 or FLAGS.batch_size % FLAGS.workers):
        raise ConfigError(
            f"--batch_size={FLAGS.batch_size} (the victims' training batch at --attack_step > 0) must be a positive "
            f"multiple of --workers={FLAGS.workers}."
        )
    if FLAGS.mia:
        if FLAGS.mia_population < 0:
            raise ConfigError(f"--mia_population must be >= 0, got {FLAGS.mia_population}.")
        for flag, low, high in (("mia_snapshots", 1, FLAGS.mia_steps - 1), ("mia_budgets", 1, FLAGS.mia_shadows)):
            values = getattr(FLAGS, flag)
            if not all(isinstance(v, int) and low <= v <= high for v in values):
                raise ConfigError(f"--{flag}={','.join(map(str, values))}: each must be an integer in [{low}, {high}].")
        if FLAGS.mia_split == "balanced" and any(k < FLAGS.mia_shadows for k in FLAGS.mia_budgets):
            raise ConfigError(
                "--mia_budgets below --mia_shadows need --mia_split=paired: with balanced splits a subset of the "
                "references can lack an IN or an OUT model for some examples."
            )
        for name in FLAGS.mia_datasets:
            have = len(datasets[name].x_train) + len(datasets[name].x_test)
            if FLAGS.mia_pool + FLAGS.mia_population > have:
                raise ConfigError(
                    f"--mia_pool={FLAGS.mia_pool} + --mia_population={FLAGS.mia_population} exceeds the {have} images "
                    f"of {name} ({datasets[name].source}); lower them or pass --data_dir with more data."
                )
    for name, params in params_by_dataset.items():
        n_train = len(datasets[name].x_train)
        if FLAGS.images > n_train:
            raise ConfigError(f"--images={FLAGS.images} exceeds the {n_train} images of {name}.")
        if FLAGS.attack_step > 0 and FLAGS.batch_size > n_train:
            raise ConfigError(f"--batch_size={FLAGS.batch_size} exceeds the {n_train} training images of {name}.")
        if FLAGS.workers * FLAGS.victim_batch > n_train:
            raise ConfigError(
                f"--workers={FLAGS.workers} x --victim_batch={FLAGS.victim_batch} exceeds the {n_train} "
                f"training images of {name}."
            )
        shapes = [np.shape(x) for x in jax.tree.leaves(params)]
        for spec in FLAGS.compressors:
            compress.from_spec(spec, params)  # raises on unknown specs
            kind, _, arg = spec.partition(":")
            if kind in ("powersgd", "topk_level") and not any(compress.powersgd_plan(shapes, int(arg))):
                useful = max((r for r in range(1, 513) if any(compress.powersgd_plan(shapes, r))), default=0)
                raise ConfigError(
                    f"{spec}: rank {arg} compresses no tensor of {FLAGS.model} on {name} "
                    f"(every tensor would travel in full); the largest useful rank is {useful}."
                )


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


def prepare():
    """Everything that can be wrong with the flags fails here, before any work starts."""
    workdir = results.ensure_workdir(FLAGS.workdir)
    datasets = {}
    for name in sorted(set(FLAGS.datasets) | set(FLAGS.mia_datasets if FLAGS.mia else [])):
        datasets[name] = data.load(name, FLAGS.data_source, FLAGS.data_dir, FLAGS.tfds_data_dir)
    params = {}
    for name in FLAGS.datasets:
        ds = datasets[name]
        model = models.make_model(FLAGS.model, ds.num_classes, norm=FLAGS.norm)
        params[name] = models.init_variables(model, jax.random.key(FLAGS.seed), ds.image_shape)["params"]
    validate(params, datasets)
    return workdir, datasets


def victim_batches(ds, images: int, batch: int, workers: int, seed: int) -> list[tuple[list, list]]:
    """The victim batches of a setting: (victim ids [B], other workers' ids [N-1, B]), from a seeded order."""
    order = np.random.default_rng(seed).permutation(len(ds.x_train))
    out = []
    for j in range(images // batch):
        ids = order[j * batch : (j + 1) * batch]
        out.append((ids.tolist(), victim.other_worker_ids(ids, len(ds.x_train), workers, seed).tolist()))
    return out


def plan_units(datasets, done_records) -> list[dict]:
    """Every unit of this run; gradinv units cover exactly the victim batches no finished unit covers."""
    covered: dict[str, set] = {}
    for r in done_records:
        if r.get("kind") == "gradinv":
            covered.setdefault(setting_key(r), set()).update(tuple(v) for v in r.get("victim_ids", []))
    units = []
    for name in FLAGS.datasets if FLAGS.gradinv else []:
        ds = datasets[name]
        batches = victim_batches(ds, FLAGS.images, FLAGS.victim_batch, FLAGS.workers, FLAGS.seed)
        for spec in FLAGS.compressors:
            for threat in FLAGS.threat_models:
                kind = spec.partition(":")[0]
                warming_up = kind == "powersgd" and FLAGS.attack_step < FLAGS.start_iter  # sends its full gradient
                if threat == "adaptive" and (kind not in ADAPTIVE_KINDS or warming_up):
                    continue  # a dense or quantised message: nothing to adapt to, identical to observed
                for bn in FLAGS.bn_statistics:
                    for observer in FLAGS.observers:
                        if observer != "worker" and threat == "adaptive":
                            continue  # the aggregate is a dense mixture: nothing to adapt to
                        setting = dict(
                            kind="gradinv",
                            dataset=name,
                            compressor=spec,
                            threat=threat,
                            bn_statistics=bn,
                            observer=observer,
                            model=FLAGS.model,
                            norm=FLAGS.norm,
                            iterations=FLAGS.iterations,
                            restarts=FLAGS.restarts,
                            tv=FLAGS.tv,
                            seed=FLAGS.seed,
                            data_source=ds.source,
                            workers=FLAGS.workers,
                            victim_batch=FLAGS.victim_batch,
                            batchnorm=FLAGS.batchnorm,
                            start_iter=FLAGS.start_iter if spec.startswith("powersgd") else 0,
                            attack_step=FLAGS.attack_step,
                            train_batch=FLAGS.batch_size if FLAGS.attack_step > 0 else None,
                            matmul_dtype=FLAGS.matmul_dtype,
                        )
                        # Fields that exist only when set, so units from before them keep their keys.
                        if threat == "strongest" and FLAGS.strongest_exclude:
                            setting["strongest_exclude"] = sorted(FLAGS.strongest_exclude)
                        if FLAGS.attack_seed is not None:
                            setting["attack_seed"] = FLAGS.attack_seed
                        done = covered.get(setting_key(setting), set())
                        todo = [b for b in batches if tuple(b[0]) not in done]
                        for g in range(0, len(todo), FLAGS.group):
                            chunk = todo[g : g + FLAGS.group]
                            units.append(
                                dict(setting, victim_ids=[b[0] for b in chunk], worker_ids=[b[1] for b in chunk])
                            )
    if FLAGS.mia:
        for name in FLAGS.mia_datasets:
            for spec in FLAGS.mia_compressors:
                units.append(
                    dict(
                        kind="mia",
                        dataset=name,
                        compressor=spec,
                        model=FLAGS.model,
                        norm=FLAGS.norm,
                        seed=FLAGS.seed,
                        mia_shadows=FLAGS.mia_shadows,
                        mia_steps=FLAGS.mia_steps,
                        mia_pool=FLAGS.mia_pool,
                        mia_population=FLAGS.mia_population,
                        batch_size=FLAGS.batch_size,
                        mia_split=FLAGS.mia_split,
                        mia_snapshots=sorted(set(FLAGS.mia_snapshots)),
                        mia_budgets=sorted(set(FLAGS.mia_budgets)),
                        mia_query_views=FLAGS.mia_query_views,
                        mia_devices=jax.device_count(),
                        data_source=datasets[name].source,
                    )
                )
    for u in units:
        u["key"] = unit_key(u)
    return units


# Seconds per image of a ResNet-18 gradinv unit at 1,000 iterations, eval mode, N = 4, one image per unit, warm
# compilation cache, this 2-core CPU, all strongest candidates (results/resnet18_speed_job): the estimate's fallback
# before a workdir has measured units of its own. A candidate fewer costs proportionally less.
MEASURED_SECONDS = {("resnet18", "none"): 106.0, ("resnet18", "powersgd"): 248.0, ("resnet18", "topk_level"): 368.0}


def expected_seconds(todo: list[dict], done_records: list[dict]) -> tuple[float, int]:
    """(expected seconds of `todo`, how many of its units had no estimate), from measured unit times.

    A unit's estimate is the median ``seconds`` of the finished units of the
    same model, compressor, threat, BatchNorm mode, iterations and images per
    unit; else `MEASURED_SECONDS` scaled by iterations and images.
    """

    def shape(u):
        return (
            u.get("model"),
            u.get("compressor"),
            u.get("threat"),
            u.get("bn_statistics"),
            u.get("iterations"),
            len(sum(u.get("victim_ids", []), [])),
            u.get("attack_step"),
        )

    measured: dict = {}
    for r in done_records:
        if r.get("kind") == "gradinv" and r.get("seconds"):
            measured.setdefault(shape(r), []).append(r["seconds"])
    total, unknown = 0.0, 0
    for u in todo:
        if shape(u) in measured:
            total += float(np.median(measured[shape(u)]))
            continue
        base = MEASURED_SECONDS.get((u.get("model"), u.get("compressor", "").partition(":")[0]))
        if u.get("kind") != "gradinv" or base is None:
            unknown += 1
            continue
        kind = u["compressor"].partition(":")[0]
        # The measured units ran observed + 2 compression-aware candidates; each excluded one costs its share less.
        dropped = {"powersgd": {"factors_residual"}, "topk_level": {"cosine_support"}}.get(kind, set())
        share = 1 - len(dropped & set(u.get("strongest_exclude", ()))) / 3 if kind != "none" else 1
        total += base * share * u["iterations"] / 1000 * len(sum(u["victim_ids"], []))
    return total, unknown


def check_one_setting(units, done_records, results_path) -> None:
    """Refuses a run whose setting differs from the finished units' in the same workdir (see the module doc)."""
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
            seen.setdefault(r.get("key"), r)
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


def cpu_devices() -> int:
    """The simulated CPU devices this run asks for (--cpu_devices; see there for the default)."""
    if FLAGS.cpu_devices is not None and FLAGS.cpu_devices < 1:  # checked here: the count is used before validate
        raise ConfigError(f"--cpu_devices must be >= 1, got {FLAGS.cpu_devices}.")
    return FLAGS.cpu_devices or (MIA_CPU_DEVICES if FLAGS.mia else FLAGS.workers)


def main(argv):
    del argv
    apply_preset()
    narrow_cpu_devices(cpu_devices())
    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    use_compilation_cache(FLAGS.compilation_cache_dir)
    try:
        workdir, datasets = prepare()
    except (data.DataError, results.ResultsError, ValueError) as e:
        raise ConfigError(str(e)) from e
    process_id, num_processes = jax.process_index(), jax.process_count()
    is_main = process_id == 0

    results_path = workdir / "results.jsonl"
    mine_path = shard_path(workdir, process_id)
    for path in {results_path, mine_path}:
        damaged = results.repair_trailing_line(path)
        if damaged is not None:
            print(
                f"WARNING: the last line of {path} was cut short (a run was killed while writing); moved it "
                f"to {path}.corrupt and that unit will be redone: {damaged[:80]!r}",
                flush=True,
            )
    done_records = read_all_records(workdir)
    done = {r.get("key") for r in done_records}
    units = plan_units(datasets, done_records)
    check_one_setting(units, done_records, results_path)
    (workdir / "recon").mkdir(exist_ok=True)
    (workdir / "roc").mkdir(exist_ok=True)
    todo = process_share([u for u in units if u["key"] not in done], process_id, num_processes)
    print(
        f"process {process_id} of {num_processes}: {len(todo)} units to run; {len(done_records)} already done in "
        f"{workdir}; {jax.local_device_count()} local {jax.default_backend().upper()} devices",
        flush=True,
    )
    seconds, unknown = expected_seconds(todo, done_records)
    print(
        f"expected duration: {seconds / 3600:.1f} h from measured unit times"
        + (f" (+ {unknown} units with no measured time)" if unknown else ""),
        flush=True,
    )
    if FLAGS.dry_run:
        for u in todo:
            print(
                f"  {u['key']} {u['kind']} {u['dataset']} {u.get('compressor')} {u.get('threat', '')} "
                f"{u.get('bn_statistics', '')} images {sum(u.get('victim_ids', []), [])}"
            )
        return 0
    bar = tqdm(total=len(todo), desc="units", unit="unit", dynamic_ncols=True, disable=not (FLAGS.progress and is_main))
    for u in todo:
        t0 = time.time()
        ds = datasets[u["dataset"]]
        if u["kind"] == "gradinv":
            record = run_gradinv_unit(u, ds, workdir, FLAGS.progress and is_main)
            # Wall seconds of the unit on this process (victim round, compiling, every candidate, scoring): for
            # sizing a run from measured throughput. Not a setting field: a resumed workdir may mix machines.
            record["seconds"] = round(time.time() - t0, 1)
            # Outputs, not inputs (the key ignores them): which code and how many devices produced this record.
            record["code_revision"] = CODE_REVISION
            record["devices"] = jax.device_count()
            line = (
                f"{u['dataset']} {u['compressor']} {u['threat']} {u['bn_statistics']}-mode {u['observer']} "
                f"images {sum(u['victim_ids'], [])}: SSIM {np.mean(record['ssim']):.3f} "
                f"PSNR {np.mean(record['psnr']):.1f} dB"
            )
            results.append_record(mine_path, record)  # each gradinv unit runs on one process only
        else:
            record = run_mia_unit(u, ds, workdir, FLAGS.parallel_models)
            t = record["attacks"]
            line = (
                f"MIA {u['dataset']} {u['compressor']}: loss AUC {t['loss']['auc']:.3f}, LiRA TPR@1%FPR "
                f"{t.get('lira_online', t['loss'])['tpr@1%fpr']:.3f}, test acc {record['test_accuracy']:.3f}"
            )
            record["code_revision"] = CODE_REVISION
            record["devices"] = jax.device_count()
            if is_main:  # every process trained it together; one records it
                results.append_record(results_path, record)
        bar.write(f"{line}  ({time.time() - t0:.0f}s)" if num_processes == 1 else f"[process {process_id}] {line}")
        bar.update(1)
    bar.close()
    if num_processes > 1:
        multihost_utils.sync_global_devices("reproduce: every process finished its units")
    if is_main:
        moved = merge_shards(workdir)
        if moved:
            print(f"merged {moved} units of the other processes into {results_path}", flush=True)
        written = report.write_reports(workdir)
        print("reports: " + ", ".join(str(p) for p in written), flush=True)
    return 0


def _compressor(u, params):
    if u["compressor"].startswith("powersgd"):
        return compress.from_spec(u["compressor"], params, seed=u["seed"], start_iter=u["start_iter"])
    return compress.from_spec(u["compressor"], params, seed=u["seed"])


def run_gradinv_unit(u: dict, ds: data.Dataset, workdir: pathlib.Path, progress: bool = False) -> dict:
    """One gradinv unit: a pure function of its record `u` (and the dataset it names)."""
    model = models.make_model(u["model"], ds.num_classes, norm=u["norm"])
    variables = models.init_variables(model, jax.random.key(u["seed"]), ds.image_shape)
    compressor = _compressor(u, variables["params"])
    comp_state = None
    if u["attack_step"] > 0:
        variables, comp_state = trained_victim(u, ds, workdir)
    ids = np.asarray(u["victim_ids"])  # [n, B]
    n, b = ids.shape
    others = np.asarray(u["worker_ids"], np.int64).reshape(n, u["workers"] - 1, b)  # [n, N-1, B]
    x = data.normalize(ds.x_train[ids.reshape(-1)], ds.name)
    y = ds.y_train[ids.reshape(-1)]
    ox = data.normalize(ds.x_train[others.reshape(-1)], ds.name).reshape(*others.shape, *ds.image_shape)
    oy = ds.y_train[others]
    cfg = gradinv.AttackConfig(
        iterations=u["iterations"],
        restarts=u["restarts"],
        tv=u["tv"],
        chunk=min(100, u["iterations"]),
        matmul_dtype=u["matmul_dtype"],
        # The whole unit in one program: its batches and restarts, and every candidate objective side by side.
        parallel=n * u["restarts"] * 2 * len(objectives.OBJECTIVES),  # each objective with and without +bn
        seed=u.get("attack_seed", u["seed"]),
        exclude=tuple(u.get("strongest_exclude", ())),
    )
    r = gradinv.audit(
        model,
        variables,
        x,
        y,
        compressor,
        dataset=ds.name,
        threat=u["threat"],
        config=cfg,
        batch_size=b,
        workers=u["workers"],
        other_images=ox,
        other_labels=oy,
        observer=u["observer"],
        bn_statistics=u["bn_statistics"],
        batchnorm=u["batchnorm"],
        comp_state=comp_state,
        step=u["attack_step"],
        seeds=ids[:, 0],
        progress=progress,
    )
    recon = pathlib.Path("recon") / f"{u['key']}.npz"
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        reconstructions=(r.reconstructions * 255).round().astype(np.uint8),
        originals=(r.originals * 255).round().astype(np.uint8),
        image_ids=ids.reshape(-1),
        **{f"candidate_{k}": (v * 255).round().astype(np.uint8) for k, v in r.candidate_reconstructions.items()},
    )
    results.write_atomic(workdir / recon, buf.getvalue())
    return dict(
        u,
        image_ids=ids.reshape(-1).tolist(),
        labels=y.tolist(),
        ssim=r.per_image["ssim"].tolist(),
        psnr=r.per_image["psnr"].tolist(),
        mse=r.per_image["mse"].tolist(),
        matching_loss=r.matching_loss.tolist(),
        chosen=r.chosen,
        candidate_ssim={k: v.tolist() for k, v in r.candidate_ssim.items()},
        candidate_psnr={k: v.tolist() for k, v in r.candidate_psnr.items()},
        upper_bound_ssim=r.upper_bound_ssim.tolist(),
        wire_words=r.wire.words,
        uncompressed_words=sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(variables["params"])),
        recon=str(recon),
    )


def trained_victim(u: dict, ds: data.Dataset, workdir: pathlib.Path):
    """(variables, the N workers' compressor states) after `attack_step` steps of one real N-worker run.

    Trained once per (dataset, compressor, step, workers, BatchNorm, training
    batch, ...) and checkpointed with orbax under ``victims/``, so every
    threat model, mode and image group, and every resumed run, attacks the
    same trained model. Worker 0's BatchNorm buffers stand for all workers'
    (DDP broadcasts them every step).
    """
    fields = (
        "dataset",
        "compressor",
        "attack_step",
        "model",
        "norm",
        "seed",
        "train_batch",
        "workers",
        "batchnorm",
        "start_iter",
        "data_source",
    )
    key = hashlib.sha1(json.dumps({f: u[f] for f in fields}, sort_keys=True).encode()).hexdigest()[:16]
    # One copy per process under several processes: each trains the same victim (deterministic) without racing.
    sub = "victims" if jax.process_count() == 1 else f"victims/p{jax.process_index()}"
    path = (workdir / sub / key).absolute()
    model = victim.data_parallel_model(models.make_model(u["model"], ds.num_classes, norm=u["norm"]), u["batchnorm"])
    initial = models.init_variables(model, jax.random.key(u["seed"]), ds.image_shape)
    compressor = _compressor(u, initial["params"])
    template = {
        "params": initial["params"],
        "batch_stats": initial.get("batch_stats", {}),
        "comp_state": train.replicate(compressor.init(initial["params"]), u["workers"]),
    }
    checkpointer = ocp.StandardCheckpointer()
    if not path.exists():
        fitted = train.fit(
            model,
            compressor,
            data.normalize(ds.x_train, ds.name),
            ds.y_train,
            steps=u["attack_step"],
            global_batch=u["train_batch"],
            seed=u["seed"],
            progress=False,
            devices=jax.local_devices()[: u["workers"]],
        )
        tree = {
            "params": fitted.state.params,
            "batch_stats": fitted.state.batch_stats,
            "comp_state": fitted.state.comp_state,
        }
        checkpointer.save(path, tree)  # orbax writes to a temporary directory and renames it when complete
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            print(
                f"trained the victim for {u['dataset']} {u['compressor']} to step {u['attack_step']} "
                f"({u['workers']} workers) -> {path}",
                flush=True,
            )
    tree = checkpointer.restore(path, template)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}, tree["comp_state"]


BUDGET_ATTACKS = ("lira_online", "lira_offline", "rmia_online", "rmia_offline", "loss")
BUDGET_METRICS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr")
BUDGET_SUBSETS = 4  # disjoint reference subsets scored per budget (fewer where K / k is smaller)
SMALL_BUDGET_OFFLINE_A = 0.5  # RMIA's a where k < 3 references cannot tune it (the middle of its grid)


def mia_budget_rows(scores: dict, is_member, budgets, seed: int) -> list[dict]:
    """Budget curves: every attack of `BUDGET_ATTACKS` with only k of the K references, for each k in `budgets`.

    ``scores`` are the final models' `membership.logit_scores`. For budget k
    the references are the disjoint blocks [jk, (j+1)k) of the
    K (j < `BUDGET_SUBSETS`, K // k blocks at most); with paired splits every
    block of even k holds an IN and an OUT model for each example. Each
    metric is the mean over the blocks, with their min and max, and the first
    block's 95% bootstrap interval. Online attacks need an IN and an OUT
    reference per example (k >= 2); with k = 1 the offline attacks score the
    examples the one reference did not train on (a random half of the pool,
    members and non-members alike). RMIA's ``a`` is tuned on the block's own
    references where k >= 3, and fixed at `SMALL_BUDGET_OFFLINE_A` below.
    LiRA's global variance pools the spread within examples where every
    example has 2 IN and 2 OUT references, else the spread of all values
    (`membership.scores_table`'s ``"auto"``).
    """
    k_all = len(scores["shadow_scores"])
    rows = []

    def picked(per_view: list[dict], keep: np.ndarray) -> list[dict]:
        return [{name: v[keep] for name, v in view.items()} for view in per_view]

    def table(block: list[int]) -> tuple[dict, str, int]:
        refs_in = scores["shadow_in"][block]
        # One reference is OUT for only the examples it did not train on: k = 1 scores those (a random half).
        keep = (~refs_in).any(0) if len(block) == 1 else np.ones(len(is_member), bool)
        population = scores["population_target_scores"] is not None
        t = membership.scores_table(
            picked(scores["target_scores"], keep),
            np.asarray(is_member)[keep],
            shadow_scores=[picked(scores["shadow_scores"][i], keep) for i in block],
            shadow_in=refs_in[:, keep],
            population_target_scores=scores["population_target_scores"],
            population_shadow_scores=[scores["population_shadow_scores"][i] for i in block] if population else None,
            rmia_offline_a=None if len(block) >= 3 else SMALL_BUDGET_OFFLINE_A,
            bootstrap=200,
            seed=seed,
        ).table
        pooling = t.get("lira_offline", {}).get("variance_pooling", "-")  # scores_table's "auto" choice
        return t, pooling, int(keep.sum())

    for k in budgets:
        blocks = [list(range(j * k, (j + 1) * k)) for j in range(min(k_all // k, BUDGET_SUBSETS))]
        scored = [table(b) for b in blocks]
        tables = [t for t, _, _ in scored]
        attacks = {}
        for name in BUDGET_ATTACKS:
            if name not in tables[0]:
                continue
            row = {}
            for m in BUDGET_METRICS:
                vals = [t[name][m] for t in tables]
                row.update({m: float(np.mean(vals)), f"{m}_range": [float(min(vals)), float(max(vals))]})
                row[f"{m}_ci"] = tables[0][name][f"{m}_ci"]
            attacks[name] = row
        rows.append(
            dict(
                references=k,
                subsets=len(blocks),
                variance_pooling=scored[0][1],
                examples=scored[0][2],
                attacks=attacks,
            )
        )
    return rows


def query_augmentation(query_views: str, dataset: str) -> str:
    """`membership.augmentations`' kind for ``--mia_query_views`` on a dataset.

    The models train on the image alone, so ``"image"`` is the query that
    matches training. RMIA averages p_y over the views, and a flipped image
    (never trained on) dilutes it; ``"flip"`` is what the tables before the
    option used (MNIST digits are not flip-symmetric, so they were always
    queried alone).
    """
    return "flip" if query_views == "flip" and dataset != "mnist" else "none"


def run_mia_unit(u: dict, ds: data.Dataset, workdir: pathlib.Path, parallel_models: int = 1) -> dict:
    """One MIA unit: a pure function of its record `u`; `parallel_models` changes speed, not results.

    The target and ``mia_shadows`` references train for ``mia_steps`` steps
    (snapshots at ``mia_snapshots``); each snapshot gets the full table with
    the models' train and test accuracy, the final models the budget curves
    (``mia_budgets``) and the ROC curves.
    """
    pool, population = u["mia_pool"], u["mia_population"]
    x_all = data.normalize(np.concatenate([ds.x_train, ds.x_test])[: pool + population], ds.name)
    y_all = np.concatenate([ds.y_train, ds.y_test])[: pool + population]
    x, y = x_all[:pool], y_all[:pool]
    split = pathlib.Path("roc") / f"{u['key']}_split.npz"
    t0 = time.time()
    setup = shadows.train_target_and_shadows(
        x,
        y,
        model_fn=lambda: models.make_model(u["model"], ds.num_classes, norm=u["norm"], axis_name=train.AXIS),
        compressor_spec=u["compressor"],
        num_shadows=u["mia_shadows"],
        steps=u["mia_steps"],
        global_batch=u["batch_size"],
        seed=u["seed"],
        split_path=workdir / split,
        parallel_models=parallel_models,
        split=u["mia_split"],
        snapshot_steps=u["mia_snapshots"],
    )
    train_seconds = time.time() - t0
    augment = query_augmentation(u["mia_query_views"], ds.name)
    views = membership.augmentations(x, augment)
    pop_views = membership.augmentations(x_all[pool:], augment) if population else []
    if population:
        membership.check_population_disjoint(x, x_all[pool:])
    snapshots, rep, scores = [], None, None
    for snap in setup.snapshots:
        scores = membership.logit_scores(
            [snap.target_predict(v) for v in views],
            y,
            setup.is_member,
            shadow_logits=[[p(v) for v in views] for p in snap.shadow_predicts] or None,
            shadow_in=setup.shadow_in,
            population_labels=y_all[pool:] if population else None,
            population_target_logits=[snap.target_predict(v) for v in pop_views] if population else None,
            population_shadow_logits=[[p(v) for v in pop_views] for p in snap.shadow_predicts] if population else None,
        )
        rep = membership.scores_table(**scores, bootstrap=200, seed=u["seed"])
        snapshots.append(
            dict(
                step=snap.step,
                train_accuracy=snap.target_train_accuracy,
                test_accuracy=snap.target_test_accuracy,
                shadow_test_accuracy=snap.shadow_test_accuracy,
                attacks=rep.table,
            )
        )
    budgets = mia_budget_rows(scores, setup.is_member, u["mia_budgets"], u["seed"]) if u["mia_budgets"] else []
    roc = pathlib.Path("roc") / f"{u['key']}.npz"
    buf = io.BytesIO()
    np.savez_compressed(
        buf, **{f"{k}_fpr": v[0] for k, v in rep.roc.items()}, **{f"{k}_tpr": v[1] for k, v in rep.roc.items()}
    )
    results.write_atomic(workdir / roc, buf.getvalue())
    scores_path = pathlib.Path("roc") / f"{u['key']}_scores.npz"
    results.write_atomic(workdir / scores_path, membership.scores_npz(scores))
    final = snapshots[-1]
    return dict(
        u,
        attacks=final["attacks"],
        test_accuracy=final["test_accuracy"],
        train_accuracy=final["train_accuracy"],
        shadow_test_accuracy=final["shadow_test_accuracy"],
        snapshots=snapshots,
        budgets=budgets,
        wire=setup.wire,
        roc=str(roc),
        scores=str(scores_path),
        split=str(split),
        seconds=dict(train=train_seconds, total=time.time() - t0),
    )


if __name__ == "__main__":
    try:
        app.run(main)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
