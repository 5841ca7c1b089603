"""Audit a data-parallel setup: invert what worker 0 sends in a real round and score the reconstructions.

`audit` takes the project's models or any Flax module whose ``__call__(x)``
returns logits [B, classes] (with or without a ``train`` argument), a
study dataset's name or `data.DatasetStats` for your own data, and the
victim's per-example loss. It checks every argument first (a one-line
`AttackError` before any round runs), runs one real N-worker round per
victim batch (`victim.make_round`), inverts worker 0's message
(`invert.invert_gradients`) and scores the reconstructions. docs/auditing.md
walks through it. For a caller's convenience this module also holds what
`audit` takes and raises: `AttackConfig`, `PAPER_ITERATIONS`, `THREATS`,
`MATMUL_DTYPES` and `AttackError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trustsgd_jax import compress as compress_lib
from trustsgd_jax import data as data_lib
from trustsgd_jax import metrics as metrics_lib
from trustsgd_jax import models as models_lib
from trustsgd_jax import train as train_lib
from trustsgd_jax.attacks import labels as labels_lib
from trustsgd_jax.attacks import objectives
from trustsgd_jax.attacks import victim as victim_lib
from trustsgd_jax.attacks.errors import AttackError
from trustsgd_jax.attacks.invert import (
    MATMUL_DTYPES,
    PAPER_ITERATIONS,
    THREATS,
    AttackConfig,
    attack_devices,
    attack_model,
    invert_gradients,
)

__all__ = [
    "LABEL_MODES",
    "MATMUL_DTYPES",
    "PAPER_ITERATIONS",
    "THREATS",
    "AttackConfig",
    "AttackError",
    "AuditResult",
    "audit",
    "default_workers",
]

LABEL_MODES = ("known", "idlg")
# The experiment runner's N (`experiments/reproduce.py`): `audit` runs this many workers where the devices allow.
DEFAULT_WORKERS = 4


@dataclasses.dataclass
class AuditResult:
    """What `audit` measured, images matched to the originals' order.

    ``setting`` records the round and how the model was run: ``workers``,
    ``batch``, ``observer``, ``bn_statistics``, ``batchnorm`` (``local`` or
    ``sync``), ``step``; ``adapter`` (`models.PROJECT_MODEL` or
    `models.WRAPPED_USER_MODULE`); ``train_argument`` (whether the module
    took the train flag); ``batchnorm_sync``: ``"none"`` (no BatchNorm),
    ``"local"``, ``"sync-observed"`` (the project's `models.SyncBatchNorm`,
    whose traffic a train-mode round hands the attacker) or
    ``"sync-user-axis:<axis>"`` (a user's ``nn.BatchNorm(axis_name=<axis>)``,
    traffic not observed); ``loss`` (``"cross_entropy"`` or the loss
    function's name).
    """

    reconstructions: np.ndarray  # [N*B, H, W, C] in [0, 1], matched to the originals' order
    originals: np.ndarray  # [N*B, H, W, C] in [0, 1]
    per_image: dict  # ssim / psnr / mse arrays
    summary: dict  # mean / std of each metric
    labels_used: np.ndarray
    matching_loss: np.ndarray  # [N] the selection criterion of each batch's reconstruction (see Inversion.loss)
    wire: compress_lib.WireCost  # of worker 0's gradient message, whatever the observer
    threat: str
    iterations: int
    setting: dict  # see the class docstring
    chosen: list[str]  # [N] the objective whose reconstruction the threat model kept, per batch
    candidate_ssim: dict[str, np.ndarray]  # objective -> per-image SSIM of its own reconstruction
    candidate_psnr: dict[str, np.ndarray]  # objective -> per-image PSNR of its own reconstruction
    candidate_reconstructions: dict[str, np.ndarray]  # objective -> [N*B, H, W, C] in [0, 1], matched
    upper_bound_ssim: np.ndarray  # per image, the best SSIM of any candidate: an auditor's bound (uses originals)
    # iteration -> {"ssim": per image, "candidate_ssim": {objective: per image}, "chosen": [N]} at each
    # `AttackConfig.checkpoints` entry, scored and selected as at the end.
    checkpoints: dict = dataclasses.field(default_factory=dict)


def _one_line(e: Exception, limit: int = 200) -> str:
    """An exception's message on one line, cut at `limit` characters (for an `AttackError` that quotes it)."""
    return " ".join(str(e).split())[:limit]


def default_workers() -> int:
    """`audit`'s ``workers=None``: the runner's N = 4, or every local device where there are fewer."""
    return min(DEFAULT_WORKERS, jax.local_device_count())


class _Checked(NamedTuple):
    """`audit`'s arguments after `_check`: what the round and the attack run with."""

    images: np.ndarray  # [N*B, H, W, C] float32
    labels: np.ndarray  # [N*B] int32
    num_classes: int
    stats: data_lib.DatasetStats
    workers: int
    bn: models_lib.BatchNormSetting
    axis: str  # the workers' axis name
    model: nn.Module  # the model as `models.adapt` takes it (a user's module wrapped)
    attacker: nn.Module  # the model as the attacker applies it (`invert.attack_model`)
    loss_fn: train_lib.LossFn
    setting: dict  # for AuditResult.setting (without step)


def _check_config(threat: str, label_mode: str, config: AttackConfig, loss_fn) -> None:
    if threat not in THREATS:
        raise AttackError(f"unknown threat model {threat!r}; use one of {THREATS}.")
    if label_mode not in LABEL_MODES:
        raise AttackError(f"unknown label_mode {label_mode!r}; use one of {LABEL_MODES}.")
    if label_mode == "idlg" and loss_fn is not train_lib.cross_entropy:
        raise AttackError(
            "label_mode='idlg' reads labels from the sign of softmax cross-entropy's head gradient; with another "
            "loss_fn pass the labels (label_mode='known')."
        )
    if config.iterations < 1:
        raise AttackError(f"the attack needs iterations >= 1, got {config.iterations}.")
    if config.restarts < 1 or config.chunk < 1 or config.parallel < 1:
        raise AttackError("restarts, chunk and parallel must be >= 1.")
    if any(not 1 <= k < config.iterations for k in config.checkpoints):
        raise AttackError(
            f"checkpoints {tuple(config.checkpoints)} must each lie in [1, iterations={config.iterations}); the end "
            "of the run is always scored."
        )
    if config.schedule_iterations is not None and config.schedule_iterations < config.iterations:
        raise AttackError(
            f"schedule_iterations={config.schedule_iterations} is below iterations={config.iterations}: the "
            "schedule must cover the run (None lays it over the run itself)."
        )
    if config.matmul_dtype not in MATMUL_DTYPES:
        raise AttackError(f"unknown matmul_dtype {config.matmul_dtype!r}; use one of {MATMUL_DTYPES}.")
    attack_devices(config)  # a one-line error for an impossible device count
    for name in config.exclude:
        objectives.split_objective(name)  # a one-line error for an unknown name
    if threat == "strongest" and "observed" in config.exclude:
        raise AttackError("strongest always runs the paper's 'observed' objective; exclude only the others.")


def _dataset_stats(dataset) -> data_lib.DatasetStats:
    if isinstance(dataset, data_lib.DatasetStats):
        return dataset
    if dataset not in data_lib.DATASETS:
        raise AttackError(
            f"no normalisation known for dataset {dataset!r} (only {', '.join(data_lib.DATASETS)}); pass "
            "dataset=data.DatasetStats(mean=..., std=..., image_shape=..., num_classes=...) instead of a name."
        )
    return data_lib.stats(dataset)


def _batchnorm_setting(model, variables, bn_statistics, batchnorm) -> models_lib.BatchNormSetting:
    """The round's `models.BatchNormSetting` from audit's strings or a given setting, checked against the model."""
    has_bn = bool(variables.get("batch_stats"))
    if isinstance(batchnorm, models_lib.BatchNormSetting):
        if bn_statistics not in ("train", batchnorm.statistics):
            raise AttackError(
                f"bn_statistics={bn_statistics!r} conflicts with the BatchNormSetting's statistics="
                f"{batchnorm.statistics!r}; a BatchNormSetting carries the statistics: leave bn_statistics out."
            )
        if (batchnorm.norm == "batch") != has_bn:
            raise AttackError(
                f"BatchNormSetting(norm={batchnorm.norm!r}), but the model's variables "
                f"{'hold' if has_bn else 'hold no'} BatchNorm statistics (batch_stats)."
            )
        return batchnorm
    victim_lib.check_setting("worker", bn_statistics, batchnorm)
    if models_lib.is_project_model(model):
        norm = "batch" if model.norm in ("batch", "batch_local") else model.norm
    else:
        norm = "batch" if has_bn else "none"
    return models_lib.BatchNormSetting(norm=norm, sync=batchnorm, statistics=bn_statistics)


def _reduces_over(model: nn.Module, variables: dict, x, axis: str) -> bool:
    """Whether `model`'s train-mode forward pass all-reduces over `axis` (a user's synchronised BatchNorm)."""

    def forward(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])[0]

    def reduces(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name.startswith("psum") and axis in tuple(eqn.params.get("axes", ())):
                return True
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None and reduces(getattr(inner, "jaxpr", inner)):
                    return True
        return False

    return reduces(jax.make_jaxpr(forward, axis_env=[(axis, 2)])(variables, x).jaxpr)


def _check_batchnorm(model, variables, bn: models_lib.BatchNormSetting, batchnorm_axis, x1) -> str:
    """The round's ``batchnorm_sync`` (`AuditResult`); a one-line error where the module cannot run `bn`."""
    if bn.norm != "batch":
        return "none"
    if bn.sync == "local":
        return "local"
    if models_lib.is_project_model(model):
        return "sync-observed"
    if batchnorm_axis is None:
        raise AttackError(
            "batchnorm='sync' with your own module needs the axis name its nn.BatchNorm(axis_name=...) reduces "
            "over: pass batchnorm_axis='<that name>' (or use batchnorm='local')."
        )
    if bn.statistics == "train" and not _reduces_over(models_lib.adapt(model), variables, x1, batchnorm_axis):
        raise AttackError(
            f"batchnorm='sync', but the module's BatchNorm does not reduce over axis {batchnorm_axis!r}: build it "
            f"with nn.BatchNorm(axis_name={batchnorm_axis!r}), or use batchnorm='local'."
        )
    return f"sync-user-axis:{batchnorm_axis}"


def _model_output(attacker: nn.Module, variables: dict, x1, train: bool) -> int:
    """The model's number of classes; a one-line error unless it maps one image to logits [1, classes]."""

    def forward(v, x):
        if train:
            return attacker.apply(v, x, train=True, mutable=["batch_stats"])[0]
        return attacker.apply(v, x, train=False)

    try:
        out = jax.eval_shape(forward, variables, x1)
    except Exception as e:  # flax/lax raise many types for a wrong input or module
        text = _one_line(e)
        if "unbound axis name" in text:
            raise AttackError(
                f"the module's BatchNorm synchronises over an axis ({text}): pass batchnorm='sync' and "
                "batchnorm_axis='<that name>', or build it without axis_name for local BatchNorm."
            ) from e
        raise AttackError(
            f"applying the model to one image of shape {x1.shape[1:]} failed ({type(e).__name__}: {text}); give "
            "images shaped like its training data and a module whose __call__(x) returns logits [B, classes]."
        ) from e
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise AttackError(
            f"the model returned a {type(out).__name__}, not one array: audit needs __call__(x) to return logits "
            "[B, classes] only (wrap the module to drop the rest)."
        )
    if len(out.shape) != 2 or out.shape[0] != 1 or not jnp.issubdtype(out.dtype, jnp.floating):
        raise AttackError(
            f"the model returned {out.dtype} of shape {out.shape} for one image; audit needs float logits [B, classes]."
        )
    return int(out.shape[1])


def _check_loss(loss_fn, num_classes: int, batch_size: int) -> None:
    logits = jax.ShapeDtypeStruct((batch_size, num_classes), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    try:
        out = jax.eval_shape(loss_fn, logits, labels)
    except Exception as e:
        raise AttackError(f"loss_fn(logits, labels) failed ({type(e).__name__}: {_one_line(e)}).") from e
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != (batch_size,):
        raise AttackError(
            f"loss_fn(logits [B, classes], labels [B]) must return per-example losses [B] = [{batch_size}]; got "
            f"{getattr(out, 'shape', type(out).__name__)}."
        )


def _check_images(images, labels, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise AttackError(f"images must be normalised floats (data.normalize), got dtype {images.dtype}.")
    if images.ndim != 4:
        raise AttackError(f"images must be [N, H, W, C], got shape {images.shape}.")
    if batch_size < 1 or len(images) % batch_size:
        raise AttackError(f"{len(images)} images do not split into victim batches of {batch_size}.")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise AttackError(f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}.")
    return images.astype(np.float32), labels.astype(np.int32)


def _check_workers(workers, n: int, batch_size: int, other_images, other_labels) -> int:
    workers = default_workers() if workers is None else workers
    victim_lib.check_workers(workers)
    if workers > 1:
        want = (n, workers - 1, batch_size)
        if other_images is None or np.shape(other_images)[:3] != want or np.shape(other_labels) != want:
            raise AttackError(
                f"workers={workers} needs the other workers' batches: other_images [{n}, {workers - 1}, "
                f"{batch_size}, H, W, C] and other_labels {list(want)} (see victim.other_worker_ids), or workers=1."
            )
    return workers


def _check(
    model,
    variables,
    images,
    labels,
    *,
    dataset,
    threat,
    label_mode,
    config,
    batch_size,
    workers,
    others,
    observer,
    bn_statistics,
    batchnorm,
    batchnorm_axis,
    loss_fn,
    train_argument,
    seeds,
) -> _Checked:
    """Every argument of `audit`, before any round runs; a one-line `AttackError` for the first bad one."""
    _check_config(threat, label_mode, config, loss_fn)
    stats = _dataset_stats(dataset)
    images, labels = _check_images(images, labels, batch_size)
    n = len(images) // batch_size
    if seeds is not None and len(seeds) != n:
        raise AttackError(f"seeds must give one seed per victim batch ({n}), got {len(seeds)}.")
    if observer not in victim_lib.OBSERVERS:
        raise AttackError(f"unknown observer {observer!r}; use one of {victim_lib.OBSERVERS}.")
    bn = _batchnorm_setting(model, variables, bn_statistics, batchnorm)
    try:
        adapted = models_lib.adapt(model, train_argument)
    except ValueError as e:
        raise AttackError(str(e)) from e
    sync = _check_batchnorm(adapted, variables, bn, batchnorm_axis, images[:1])
    alone = batchnorm_axis if sync.startswith("sync-user-axis") else None
    attacker = attack_model(adapted, config.matmul_dtype, alone)
    num_classes = _model_output(attacker, variables, images[:1], train=False)
    if bn.statistics == "train":
        _model_output(attacker, variables, images[:1], train=True)
    # A study dataset's name gives its normalisation, which the project also uses on subsampled images (16x16
    # CIFAR in the tests); `data.DatasetStats` declares the images exactly.
    declared = (
        stats.image_shape if isinstance(dataset, data_lib.DatasetStats) else (*images.shape[1:3], stats.image_shape[2])
    )
    if images.shape[1:] != declared:
        raise AttackError(f"images have shape {images.shape[1:]} but the dataset's are {declared}.")
    if num_classes != stats.num_classes:
        raise AttackError(f"the model has {num_classes} outputs but the dataset {stats.num_classes} classes.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise AttackError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}].")
    _check_loss(loss_fn, num_classes, batch_size)
    workers = _check_workers(workers, n, batch_size, *others)
    setting = dict(
        workers=workers,
        batch=batch_size,
        observer=observer,
        bn_statistics=bn.statistics,
        batchnorm=bn.sync,
        adapter=models_lib.adapter(adapted),
        train_argument=not isinstance(adapted, models_lib.OwnModule) or adapted.train_keyword is not None,
        batchnorm_sync=sync,
        loss="cross_entropy" if loss_fn is train_lib.cross_entropy else getattr(loss_fn, "__name__", repr(loss_fn)),
    )
    axis = batchnorm_axis or train_lib.AXIS
    return _Checked(images, labels, num_classes, stats, workers, bn, axis, adapted, attacker, loss_fn, setting)


def _observe(model, variables, compressor, c: _Checked, batch_size: int, others, observer: str, comp_state):
    """One real round per victim batch: (victim images [N, B, ...], labels [N, B], the observations)."""
    n = len(c.images) // batch_size
    xb = c.images.reshape(n, batch_size, *c.images.shape[1:])
    yb = c.labels.reshape(n, batch_size)
    if c.workers > 1:
        wx = np.concatenate([xb[:, None], np.asarray(others[0], np.float32)], 1)
        wy = np.concatenate([yb[:, None], np.asarray(others[1], np.int32)], 1)
    else:
        wx, wy = xb[:, None], yb[:, None]
    round_ = victim_lib.make_round(
        model,
        compressor,
        workers=c.workers,
        observer=observer,
        bn_statistics=c.bn.statistics,
        batchnorm=c.bn.sync,
        loss_fn=c.loss_fn,
        axis_name=c.axis,
    )
    return xb, yb, [round_(variables, wx[i], wy[i], comp_state) for i in range(n)]


class _Scores(NamedTuple):
    reconstructions: np.ndarray  # [N*B, H, W, C] in [0, 1], matched
    per_image: dict  # ssim / psnr / mse


def _scored(rec, originals: np.ndarray, stats: data_lib.DatasetStats) -> _Scores:
    """[0, 1] reconstructions [N, B, ...] matched to the originals (Hungarian on MSE within each batch), flat,
    and their per-image scores."""
    rec01 = np.clip(np.asarray(data_lib.denormalize(rec, stats)), 0, 1)
    for i in range(len(originals)):
        rec01[i] = rec01[i][metrics_lib.match(originals[i], rec01[i])]
    flat = rec01.reshape(-1, *originals.shape[2:])
    return _Scores(flat, metrics_lib.image_scores(originals.reshape(flat.shape), flat))


def _result(c: _Checked, inv, xb, yb, wire, threat: str, iterations: int, step: int) -> AuditResult:
    """The `AuditResult` of an inversion (`invert.Inversion`) of the victim batches `xb` [N, B, ...]."""
    originals = np.clip(np.asarray(data_lib.denormalize(xb, c.stats)), 0, 1)
    chosen = _scored(inv.images, originals, c.stats)
    candidates = {name: _scored(rec, originals, c.stats) for name, rec in inv.candidates.items()}
    candidate_ssim = {name: s.per_image["ssim"] for name, s in candidates.items()}
    return AuditResult(
        reconstructions=chosen.reconstructions,
        originals=originals.reshape(chosen.reconstructions.shape),
        per_image=chosen.per_image,
        summary={k: metrics_lib.summarize(v) for k, v in chosen.per_image.items()},
        labels_used=np.asarray(yb).reshape(-1),
        matching_loss=inv.loss,
        wire=wire,
        threat=threat,
        iterations=iterations,
        setting={**c.setting, "step": step},
        chosen=inv.chosen,
        candidate_ssim=candidate_ssim,
        candidate_psnr={name: s.per_image["psnr"] for name, s in candidates.items()},
        candidate_reconstructions={name: s.reconstructions for name, s in candidates.items()},
        upper_bound_ssim=np.max(np.stack([chosen.per_image["ssim"], *candidate_ssim.values()]), axis=0),
        checkpoints={k: _checkpoint_scores(at, originals, c.stats) for k, at in (inv.at or {}).items()},
    )


def _checkpoint_scores(inv, originals: np.ndarray, stats: data_lib.DatasetStats) -> dict:
    return {
        "ssim": _scored(inv.images, originals, stats).per_image["ssim"],
        "candidate_ssim": {
            name: _scored(rec, originals, stats).per_image["ssim"] for name, rec in inv.candidates.items()
        },
        "chosen": list(inv.chosen),
    }


def audit(
    model: nn.Module,
    variables: dict,
    images,
    labels,
    compressor: compress_lib.Compressor,
    *,
    dataset: str | data_lib.DatasetStats,
    threat: str = "observed",
    config: AttackConfig | None = None,
    batch_size: int = 1,
    workers: int | None = None,
    other_images=None,
    other_labels=None,
    observer: str = "worker",
    bn_statistics: str = "train",
    batchnorm: str | models_lib.BatchNormSetting = "local",
    batchnorm_axis: str | None = None,
    comp_state: Any = None,
    step: int = 0,
    seeds=None,
    label_mode: str = "known",
    loss_fn: train_lib.LossFn = train_lib.cross_entropy,
    train_argument: bool | str | None = None,
    progress: bool = True,
) -> AuditResult:
    """Attacks every victim batch of `images` in a real N-worker round and scores the reconstructions.

    Each consecutive group of `batch_size` normalised images is worker 0's
    batch in one round of `victim.make_round` with ``workers`` workers;
    workers 1..N-1 train on ``other_images[i]`` [N-1, B, H, W, C] (labels
    ``other_labels[i]`` [N-1, B]) in round i. ``comp_state`` (stacked over
    the N workers) and `variables` (worker 0's BatchNorm buffers) come from
    step ``step`` of a real run, or the first step when None. The attacker
    runs `invert.attack_model(model)` in the round's BatchNorm mode, with the
    round's loss.

    * ``model``: one of the project's models, or any Flax module whose
      ``__call__(x)`` returns logits [B, classes]; its train flag is
      detected (a ``train`` parameter) or declared by ``train_argument``
      (False, True or the keyword's name; `models.train_keyword`).
    * ``dataset``: a study dataset's name or `data.DatasetStats` (your own
      data's normalisation, image shape and number of classes).
    * ``loss_fn(logits, labels) -> per-example losses [B]``: the workers'
      training loss, softmax cross-entropy by default; the attacker's dummy
      gradients use the same.
    * ``workers``: None means the experiment runner's N = 4, or every local
      device where there are fewer (`default_workers`); N > 1 needs the
      other workers' batches.
    * ``bn_statistics``: ``"train"`` (batch statistics: what training
      sends) or ``"eval"`` (running averages: Geiping et al.'s setting, the
      one the literature's numbers use).
    * ``batchnorm``: ``"local"`` (PyTorch DDP's default: each worker
      normalises by its own batch) or ``"sync"`` (statistics all-reduced
      over the workers), or a `models.BatchNormSetting`, which carries the
      statistics too. Synchronised BatchNorm in your own module is its
      ``nn.BatchNorm(axis_name=...)``: declare that name as
      ``batchnorm_axis``.
    * ``config``: `AttackConfig`; its default budget is 1,000 iterations,
      Geiping et al.'s `PAPER_ITERATIONS` = 24,000.

    Every argument is checked before any round runs: a bad one is a
    one-line `AttackError` naming the fix. Returns reconstructions matched
    to the originals (Hungarian on MSE within each batch), per-image SSIM /
    PSNR / MSE on [0, 1] images, their mean / std, and the setting
    (`AuditResult`).
    """
    config = config or AttackConfig()
    c = _check(
        model,
        variables,
        images,
        labels,
        dataset=dataset,
        threat=threat,
        label_mode=label_mode,
        config=config,
        batch_size=batch_size,
        workers=workers,
        others=(other_images, other_labels),
        observer=observer,
        bn_statistics=bn_statistics,
        batchnorm=batchnorm,
        batchnorm_axis=batchnorm_axis,
        loss_fn=loss_fn,
        train_argument=train_argument,
        seeds=seeds,
    )
    xb, yb, observations = _observe(
        c.model, variables, compressor, c, batch_size, (other_images, other_labels), observer, comp_state
    )
    # Synchronised BatchNorm's traffic travels on the same link (worker observer, train mode): the attacker has it.
    messages = [objectives.WithBatchNorm(o.message, o.bn) if o.bn else o.message for o in observations]
    if label_mode == "idlg":
        yb = np.stack([labels_lib.infer_labels_idlg(o.message, c.num_classes, batch_size) for o in observations])
    inv = invert_gradients(
        c.attacker,
        variables,
        messages,
        yb,
        c.images.shape[1:],
        c.stats,
        threat=threat,
        train=c.bn.statistics == "train",
        config=config,
        seeds=seeds,
        progress=progress,
        loss_fn=c.loss_fn,
    )
    return _result(c, inv, xb, yb, observations[0].wire, threat, config.iterations, step)
