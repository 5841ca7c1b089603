"""The flags of `python -m experiments.reproduce` and the one typed `Config` they resolve into.

`from_flags` runs once, after absl parsed the command line: each flag's value
is the command line's, else the chosen preset's (`presets.PRESETS`), else the
flag's default. Nothing writes to FLAGS. A `Config` checks itself when made
(the checks that need only its values); `check_data` makes the checks that
need the loaded datasets, the models' parameters and the devices. Every
problem is one line, a `ConfigError` (exit code 2).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import flags

from experiments.reproduce.presets import MIA_CPU_DEVICES, PRESETS
from trustsgd_jax import compress, data, models
from trustsgd_jax.attacks import invert, objectives, shadows, victim


def _checkpoints(values, iterations) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(v) for v in values or ()}))
    except ValueError as e:
        raise ConfigError(f"--checkpoints={','.join(map(str, values))}: integers expected.") from e
    if iterations is not None and any(not 1 <= k < iterations for k in out):
        raise ConfigError(f"--checkpoints must each lie in [1, --iterations={iterations}); got {list(out)}.")
    return out


class ConfigError(ValueError):
    pass


FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "quick", list(PRESETS), "flag defaults: tiny (tests), quick (CPU), table1, paper")
flags.DEFINE_list("datasets", None, "datasets, e.g. mnist,cifar10,cifar100")
flags.DEFINE_list("compressors", None, "compressor specs, e.g. none,powersgd:1,topk_level:1")
flags.DEFINE_list("threat_models", None, "observed, adaptive and/or strongest (invert.THREATS)")
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
flags.DEFINE_list(
    "checkpoints",
    [],
    "attack iterations (each below --iterations) at which each unit also records its reconstruction's SSIM: one "
    "long run gives the whole budget curve (recorded in each unit)",
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
    list(models.BATCHNORM_SYNC),
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
    list(invert.MATMUL_DTYPES),
    "the attack's convolution matmuls: float32, or bfloat16 inputs with fp32 accumulation (README, Benchmarks: its "
    "speed and its effect on SSIM)",
)
flags.DEFINE_integer("attack_step", 0, "attack at this training step (0: first step, no error memory)")
flags.DEFINE_string("model", None, "convnet | resnet18")
flags.DEFINE_enum(
    "norm",
    "batch",
    list(models.MODEL_NORMS),
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
flags.DEFINE_string(
    "committed_study",
    "results/table1",
    "a committed study whose table1_rows.json the run's cells are printed beside (committed_table1.md; skipped "
    "where the folder does not exist, e.g. outside a checkout; '' turns it off)",
)
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
    f"simulated CPU devices of this process (CPU only; a count in $XLA_FLAGS wins). Default: {MIA_CPU_DEVICES} when "
    "membership inference runs (its models train data-parallel over every device), else --workers (the attacked "
    "round needs N; each attack runs on one device, and fewer simulated devices make it faster on a small CPU)",
)
flags.DEFINE_bool("progress", True, "progress bars")
flags.DEFINE_bool("dry_run", False, "plan the units, print their count and expected duration, run nothing")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host)")
flags.DEFINE_integer("num_processes", 1, "processes (multi-host)")
flags.DEFINE_integer("process_id", 0, "this process (multi-host)")


@dataclasses.dataclass(frozen=True)
class MiaConfig:
    """Membership inference (``--mia``): target and reference models per dataset x compressor (``--mia_*``)."""

    datasets: tuple[str, ...]
    compressors: tuple[str, ...]  # specs as written (records name them so), each parsed by compress.parse_spec
    shadows: int
    steps: int
    pool: int
    population: int
    split: str
    snapshots: tuple[int, ...]
    budgets: tuple[int, ...]
    query_views: str
    parallel_models: int  # speed only, never results

    def __post_init__(self) -> None:
        if self.population < 0:
            raise ConfigError(f"--mia_population must be >= 0, got {self.population}.")
        for flag, values, low, high in (
            ("mia_snapshots", self.snapshots, 1, self.steps - 1),
            ("mia_budgets", self.budgets, 1, self.shadows),
        ):
            if not all(low <= v <= high for v in values):
                raise ConfigError(f"--{flag}={','.join(map(str, values))}: each must be an integer in [{low}, {high}].")
        if self.split == "balanced" and any(k < self.shadows for k in self.budgets):
            raise ConfigError(
                "--mia_budgets below --mia_shadows need --mia_split=paired: with balanced splits a subset of the "
                "references can lack an IN or an OUT model for some examples."
            )


@dataclasses.dataclass(frozen=True)
class Config:
    """One run of `experiments.reproduce`: every flag, resolved with its preset, checked.

    Field names are the flags' (``--bn_statistics`` and ``--norm``,
    ``--batchnorm`` are the `batchnorm` settings; ``--mia_*`` are `mia`'s).
    """

    preset: str
    # Gradient inversion: its grid (one unit group per dataset x compressor x threat x BatchNorm mode x observer).
    gradinv: bool
    datasets: tuple[str, ...]
    compressors: tuple[str, ...]  # specs as written (records name them so), each parsed by compress.parse_spec
    threat_models: tuple[str, ...]
    batchnorm: tuple[models.BatchNormSetting, ...]  # one per --bn_statistics mode, all of --norm and --batchnorm
    observers: tuple[str, ...]
    # The attacked round and the attack.
    model: str
    workers: int
    images: int
    victim_batch: int
    group: int
    iterations: int
    restarts: int
    tv: float
    strongest_exclude: tuple[str, ...]
    attack_seed: int | None
    checkpoints: tuple[int, ...]
    start_iter: int
    matmul_dtype: str
    attack_step: int
    batch_size: int  # the victims' training batch at --attack_step > 0, and the MIA models'
    seed: int
    # Membership inference; None with --mia=false.
    mia: MiaConfig | None
    # Data.
    data_source: str
    data_dir: str | None
    tfds_data_dir: str | None
    # The run itself: where, on what, how shown.
    workdir: str
    committed_study: str
    compilation_cache_dir: str
    cpu_devices: int
    progress: bool
    dry_run: bool
    coordinator_address: str | None
    num_processes: int
    process_id: int

    @property
    def norm(self) -> str:
        """The model's normalisation (``--norm``), which every BatchNorm setting of the run shares."""
        return self.batchnorm[0].norm

    @property
    def loaded_datasets(self) -> list[str]:
        """Every dataset a unit of this run reads, in name order."""
        return sorted(set(self.datasets) | set(self.mia.datasets if self.mia else ()))

    def __post_init__(self) -> None:
        for t in self.threat_models:
            if t not in invert.THREATS:
                raise ConfigError(f"unknown threat model {t!r}; use {', '.join(invert.THREATS)}.")
        for o in self.observers:
            if o not in victim.OBSERVERS:
                raise ConfigError(f"unknown observer {o!r}; use {', '.join(victim.OBSERVERS)}.")
        if self.images < 1 or self.iterations < 1 or self.restarts < 1 or self.group < 1:
            raise ConfigError("--images, --iterations, --restarts and --group must be >= 1.")
        if self.victim_batch < 1 or self.images % self.victim_batch:
            raise ConfigError(f"--images={self.images} is not a multiple of --victim_batch={self.victim_batch}.")
        if self.start_iter < 0:
            raise ConfigError(f"--start_iter must be >= 0, got {self.start_iter}.")
        if self.attack_step < 0:
            raise ConfigError(f"--attack_step must be >= 0, got {self.attack_step}.")
        if self.workers < 1:
            raise ConfigError(f"--workers: workers must be >= 1, got {self.workers}.")
        if self.attack_step > 0 and (self.batch_size < 1 or self.batch_size % self.workers):
            raise ConfigError(
                f"--batch_size={self.batch_size} (the victims' training batch at --attack_step > 0) must be a "
                f"positive multiple of --workers={self.workers}."
            )


# Flags every run needs a value of, from the command line or the preset (no flag default fits every model).
REQUIRED = ("datasets", "compressors", "threat_models", "images", "iterations", "restarts", "workers", "model", "mia")
REQUIRED_FOR_MIA = ("mia_shadows", "mia_steps", "mia_pool", "mia_population")


def from_flags(fv: flags.FlagValues = FLAGS) -> Config:
    """The run's `Config`: each flag from the command line, else from ``--preset``, else its default."""
    preset = PRESETS[fv.preset]
    unknown = sorted(set(preset) - set(fv))
    if unknown:
        raise ConfigError(f"--preset={fv.preset} sets {unknown[0]}, which is no flag of experiments.reproduce.")

    def value(name: str):
        return preset[name] if name in preset and not fv[name].present else fv[name].value

    missing = [name for name in REQUIRED if value(name) is None]
    if value("mia"):
        missing += [name for name in REQUIRED_FOR_MIA if value(name) is None]
    if missing:
        raise ConfigError(f"--{missing[0]} has no value: pass it, or a --preset that sets it.")
    cpu_devices = value("cpu_devices")
    if cpu_devices is not None and cpu_devices < 1:
        raise ConfigError(f"--cpu_devices must be >= 1, got {cpu_devices}.")
    images, victim_batch, group = value("images"), value("victim_batch"), value("group")
    return Config(
        preset=fv.preset,
        gradinv=value("gradinv"),
        datasets=tuple(value("datasets")),
        compressors=specs(value("compressors")),
        threat_models=tuple(value("threat_models")),
        batchnorm=batchnorm_settings(value("norm"), value("batchnorm"), value("bn_statistics") or ()),
        observers=tuple(value("observers")),
        model=value("model"),
        workers=value("workers"),
        images=images,
        victim_batch=victim_batch,
        group=max(1, images // max(victim_batch, 1)) if group is None else group,
        iterations=value("iterations"),
        restarts=value("restarts"),
        tv=value("tv"),
        strongest_exclude=tuple(value("strongest_exclude")),
        attack_seed=value("attack_seed"),
        checkpoints=_checkpoints(value("checkpoints"), value("iterations")),
        start_iter=value("start_iter"),
        matmul_dtype=value("matmul_dtype"),
        attack_step=value("attack_step"),
        batch_size=value("batch_size"),
        seed=value("seed"),
        mia=mia_config(value) if value("mia") else None,
        data_source=value("data_source"),
        data_dir=value("data_dir"),
        tfds_data_dir=value("tfds_data_dir"),
        workdir=value("workdir"),
        committed_study=value("committed_study"),
        compilation_cache_dir=value("compilation_cache_dir"),
        cpu_devices=cpu_devices or (MIA_CPU_DEVICES if value("mia") else value("workers")),
        progress=value("progress"),
        dry_run=value("dry_run"),
        coordinator_address=value("coordinator_address"),
        num_processes=value("num_processes"),
        process_id=value("process_id"),
    )


def mia_config(value) -> MiaConfig:
    """`MiaConfig` from `from_flags`' flag values; its datasets and compressors default to the gradinv ones."""
    datasets = value("mia_datasets")
    compressors = value("mia_compressors")
    return MiaConfig(
        datasets=tuple(value("datasets") if datasets is None else datasets),
        compressors=specs(value("compressors") if compressors is None else compressors),
        shadows=value("mia_shadows"),
        steps=value("mia_steps"),
        pool=value("mia_pool"),
        population=value("mia_population"),
        split=value("mia_split"),
        snapshots=integers("mia_snapshots", value("mia_snapshots")),
        budgets=integers("mia_budgets", value("mia_budgets")),
        query_views=value("mia_query_views"),
        parallel_models=value("parallel_models"),
    )


def specs(values) -> tuple[str, ...]:
    """Compressor specs, checked by `compress.parse_spec` and kept as written (records name them so)."""
    for v in values:
        try:
            compress.parse_spec(v)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return tuple(values)


def integers(flag: str, values) -> tuple[int, ...]:
    """An absl list flag's strings (or a preset's ints) as ints."""
    try:
        return tuple(int(v) for v in values or ())
    except ValueError as e:
        raise ConfigError(f"--{flag}={','.join(map(str, values))}: integers expected.") from e


def batchnorm_settings(norm: str, sync: str, statistics) -> tuple[models.BatchNormSetting, ...]:
    """One `models.BatchNormSetting` per ``--bn_statistics`` mode (which validates them), in the flag's order."""
    if not statistics:
        raise ConfigError(f"--bn_statistics is empty; name one or more of {', '.join(models.BN_STATISTICS)}.")
    try:
        models.BatchNormSetting(norm=norm, sync=sync)
    except ValueError as e:
        raise ConfigError(f"--norm={norm} --batchnorm={sync}: {e}") from e
    settings = []
    for mode in statistics:
        try:
            settings.append(models.BatchNormSetting(norm=norm, sync=sync, statistics=mode))
        except ValueError as e:  # the only field left to fail
            raise ConfigError(f"unknown --bn_statistics {mode!r}; use {', '.join(models.BN_STATISTICS)}.") from e
    return tuple(settings)


def check_data(cfg: Config, datasets: dict[str, data.Dataset], params_by_dataset: dict) -> None:
    """The checks that need the data, the models' parameters (per gradinv dataset) and this process's devices."""
    try:
        victim.check_workers(cfg.workers)
    except objectives.AttackError as e:
        raise ConfigError(f"--workers: {e}") from e
    if cfg.mia:
        for name in cfg.mia.datasets:
            have = len(datasets[name].x_train) + len(datasets[name].x_test)
            if cfg.mia.pool + cfg.mia.population > have:
                raise ConfigError(
                    f"--mia_pool={cfg.mia.pool} + --mia_population={cfg.mia.population} exceeds the {have} images "
                    f"of {name} ({datasets[name].source}); lower them or pass --data_dir with more data."
                )
    for name, params in params_by_dataset.items():
        n_train = len(datasets[name].x_train)
        if cfg.images > n_train:
            raise ConfigError(f"--images={cfg.images} exceeds the {n_train} images of {name}.")
        if cfg.attack_step > 0 and cfg.batch_size > n_train:
            raise ConfigError(f"--batch_size={cfg.batch_size} exceeds the {n_train} training images of {name}.")
        if cfg.workers * cfg.victim_batch > n_train:
            raise ConfigError(
                f"--workers={cfg.workers} x --victim_batch={cfg.victim_batch} exceeds the {n_train} "
                f"training images of {name}."
            )
        for spec in cfg.compressors:
            check_rank(spec, params, f"{cfg.model} on {name}")


def check_rank(spec: str, params, what: str) -> None:
    """A PowerSGD or Top-K level spec whose rank compresses no tensor of the model is a mistake: every tensor would
    travel in full."""
    compress.from_spec(spec, params)  # raises where the spec does not fit the parameters
    parsed = compress.parse_spec(spec)
    if parsed.kind not in ("powersgd", "topk_level"):
        return
    shapes = [np.shape(p) for p in jax.tree.leaves(params)]
    if not any(compress.powersgd_plan(shapes, int(parsed.number))):
        useful = max((r for r in range(1, 513) if any(compress.powersgd_plan(shapes, r))), default=0)
        raise ConfigError(
            f"{spec}: rank {parsed.arg} compresses no tensor of {what} (every tensor would travel in full); the "
            f"largest useful rank is {useful}."
        )
