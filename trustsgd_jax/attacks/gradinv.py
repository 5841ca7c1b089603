"""Gradient inversion against what one worker puts on the wire (Geiping et al., NeurIPS 2020).

The attacker is an honest-but-curious observer of a real data-parallel round
(`attacks.victim`): it sees worker 0's message (observer ``worker``) or the
averaged update (``aggregate``). It knows the model at the attacked step and
applies it in the BatchNorm mode the round used, the compressor and its
configuration, and the labels (``label_mode="known"``, the paper's setting)
or infers them (``"idlg"``). It does not know the victim's error-feedback
memory nor the other workers' data. What it matches is in
`attacks.objectives`.

Optimisation as in the reference implementations: minimise the matching
loss plus ``tv`` times the total variation with Adam (lr 0.1) on the *sign*
of the input gradient, learning rate x0.1 at 3/8, 5/8 and 7/8 of the
iterations, pixels clipped to the valid normalised range after every step,
random-normal start, several restarts of which the one with the lowest final
matching loss wins. The iterations run in ``lax.scan`` chunks (a progress
bar reports between chunks) and independent attacks (images, restarts) are
batched with ``vmap`` in one program.

The attack runs this package's models in their im2col form
(`attack_model`: ``conv_impl="patches"``, the same parameters), because
XLA:CPU runs native weight-gradient convolutions inside the scan loop
through a slow generic emitter; and, for the observed attacker, with the
convolution kernels' gradients factored (`objectives.Factored`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from trustsgd_jax import compress as compress_lib
from trustsgd_jax import data as data_lib
from trustsgd_jax import metrics as metrics_lib
from trustsgd_jax.attacks import labels as labels_lib
from trustsgd_jax.attacks import objectives
from trustsgd_jax.attacks import victim as victim_lib
from trustsgd_jax.attacks.objectives import AttackError

THREATS = ("observed", "adaptive", "strongest")
LABEL_MODES = ("known", "idlg")


class AttackConfig(NamedTuple):
    """Knobs of the attack; defaults reproduce Geiping et al.'s CIFAR setting."""

    iterations: int = 24000
    learning_rate: float = 0.1
    tv: float = 1e-4
    restarts: int = 1
    signed: bool = True  # Adam on sign(grad x)
    boxed: bool = True  # clip pixels to the valid range after every step
    layer_weights: str = "equal"  # or "linear": weights falling with depth (objectives.tensor_weights)
    chunk: int = 100  # iterations per compiled scan chunk (progress granularity)
    parallel: int = 8  # independent attacks in one program (over all devices together; objectives side by side count)
    seed: int = 0
    matmul_dtype: str = "float32"  # or "bfloat16": the convolutions' matmuls on bf16 inputs (see attack_model)
    devices: int | None = None  # local devices the attacks spread over; None: all on GPU/TPU, 1 on CPU (faster)
    exclude: tuple[str, ...] = ()  # objectives `strongest` does not run (a cut for time; the record names it)


def attack_devices(config: AttackConfig) -> list:
    """The local devices independent attacks are spread over (`AttackConfig.devices`).

    On CPU, simulated devices (``--xla_force_host_platform_device_count``)
    share the same cores, and one device running the batch was faster in the
    benchmark (README), so None means one device there and every local
    device elsewhere.
    """
    local = jax.local_devices()
    if config.devices is None:
        return local[:1] if local[0].platform == "cpu" else local
    if not 1 <= config.devices <= len(local):
        raise AttackError(
            f"AttackConfig.devices={config.devices}, but {len(local)} local devices exist; use 1..{len(local)}."
        )
    return local[: config.devices]


MATMUL_DTYPES = ("float32", "bfloat16")


def attack_model(model: nn.Module, matmul_dtype: str = "float32") -> nn.Module:
    """The attack-ready form of one of this package's models: im2col convolutions, no data-parallel axis.

    The same parameters (checkpoints interchange). Without the axis,
    BatchNorm in train mode normalises by the dummy batch's own statistics.
    ``matmul_dtype="bfloat16"`` runs the convolutions' matmuls on bf16 inputs
    with fp32 accumulation (`models.PatchesConv`); pixels, parameters and
    everything else stay fp32.
    """
    if matmul_dtype not in MATMUL_DTYPES:
        raise AttackError(f"unknown matmul_dtype {matmul_dtype!r}; use one of {MATMUL_DTYPES}.")
    changes: dict[str, Any] = {}
    if getattr(model, "conv_impl", None) is not None:
        changes["conv_impl"] = "patches" if matmul_dtype == "float32" else "patches_bf16"
    if getattr(model, "axis_name", None) is not None:
        changes["axis_name"] = None
    return model.clone(**changes) if changes else model


def _optimizer(config: AttackConfig) -> optax.GradientTransformation:
    t = config.iterations
    schedule = optax.piecewise_constant_schedule(
        config.learning_rate, {int(t * 3 / 8): 0.1, int(t * 5 / 8): 0.1, int(t * 7 / 8): 0.1}
    )
    parts = [optax.adam(schedule)]
    if config.signed:
        parts.insert(0, optax.stateless(lambda u, p=None: jax.tree.map(jnp.sign, u)))
    return optax.chain(*parts)


class CompiledAttack(NamedTuple):
    """A compiled attack over `width` independent attacks (a leading axis on every argument).

    ``init(x) -> opt_state``; ``run_chunk(x, opt_state, msg, y, length) ->
    (x, opt_state, last loss)`` runs `length` iterations (static);
    ``final_loss(x, msg, y)`` is the matching loss without TV, the restart
    selection criterion. Each passes the model's variables to its compiled
    program as an argument (`compile_attack`). Compiled for a tuple of
    objectives, x, opt_state and the losses are tuples in that order (one
    attack per objective, side by side); msg and y are shared.
    """

    init: Callable
    run_chunk: Callable
    final_loss: Callable


def compile_attack(
    model: nn.Module,
    variables: dict,
    objective: str | tuple[str, ...],
    config: AttackConfig,
    dataset: str,
    image_shape,
    *,
    train: bool,
    width: int,
    target_ranks: tuple | None = None,
) -> CompiledAttack:
    """Builds the jitted attack minimising `objective` (`objectives.OBJECTIVES`) for `model` at `variables`.

    Pass `attack_model(model)` for speed. ``train`` applies BatchNorm with
    batch statistics (as a train-mode round computed the message) instead of
    the running averages. ``target_ranks`` (`objectives.dense_target_ranks`
    of the messages to attack) holds their dense deep-layer tensors as thin
    factors, which cuts the cost of an iteration and not its value; an
    objective that cannot take them (`objectives.takes_thin_targets`) keeps
    dense ones.

    A tuple of objectives compiles one attack per objective side by side in
    one program (each step of the loop steps every one of them): the same
    attacks as one program each, but the independent operations of the
    lanes keep more cores busy than one B = 1 attack does (on this 2-core
    CPU one ResNet-18 attack kept the threads 53-57% busy; README,
    Benchmarks). `strongest`'s candidates run this way (`invert_gradients`).
    """
    lo, hi = (jnp.asarray(v, jnp.float32) for v in data_lib.pixel_bounds(dataset))
    rank = objectives.forward_order(model, variables, image_shape) if config.layer_weights == "linear" else None
    weights = objectives.tensor_weights(len(jax.tree.leaves(variables["params"])), config.layer_weights, rank)
    opt = _optimizer(config)

    names = (objective,) if isinstance(objective, str) else tuple(objective)
    if not names:
        raise AttackError("compile_attack needs at least one objective.")
    lanes = not isinstance(objective, str)

    # The variables are an argument of every compiled program, never a constant folded into it: the programs of
    # one shape are then the same whatever the victim's weights (a trained victim at another step, another seed),
    # so JAX's persistent compilation cache serves them, and its entries do not carry the model (ResNet-18: about
    # 80 MB per program as constants).
    def matchings_at(v):
        return [objectives.matching_loss(model, v, name, weights, train, target_ranks) for name in names]

    def run_chunk(v, x, opt_state, msg, y, length):
        matchings = matchings_at(v)
        xs, states = (x, opt_state) if lanes else ((x,), (opt_state,))

        def step(carry, _):
            xs, states, targets = carry
            new_x, new_states, losses = [], [], []
            for matching, xk, state, target in zip(matchings, xs, states, targets, strict=True):

                def total_loss(x, matching=matching, target=target):
                    return matching.loss(x, msg, target, y) + config.tv * objectives.total_variation(x)

                loss, g = jax.value_and_grad(total_loss)(xk)
                updates, state = opt.update(g, state, xk)
                xk = optax.apply_updates(xk, updates)
                if config.boxed:
                    xk = jnp.clip(xk, lo, hi)
                new_x.append(xk)
                new_states.append(state)
                losses.append(loss)
            return (tuple(new_x), tuple(new_states), targets), tuple(losses)

        # The message's view is loop-invariant: prepared once per chunk, outside the scan.
        targets = tuple(m.prepare(msg) for m in matchings)
        (xs, states, _), losses = jax.lax.scan(step, (tuple(xs), tuple(states), targets), None, length=length)
        last = tuple(loss[-1] for loss in losses)
        return (xs, states, last) if lanes else (xs[0], states[0], last[0])

    def init(v, x):
        del v
        return tuple(opt.init(xk) for xk in x) if lanes else opt.init(x)

    def final_loss(v, x, msg, y):
        losses = tuple(m(xk, msg, y) for m, xk in zip(matchings_at(v), x if lanes else (x,), strict=True))
        return losses if lanes else losses[0]

    devices = attack_devices(config)[: max(1, width)]
    if width % len(devices):
        raise AttackError(f"width={width} attacks do not split over {len(devices)} devices; use a multiple.")

    def local(f):
        """f(v, *args) over this device's attacks (a leading axis on every argument after the variables v).

        One attack runs without vmap: a width-1 vmap still rewrites every matmul as a batched one, slower on XLA:CPU.
        """
        if width // len(devices) > 1:
            return lambda v, *args: jax.vmap(functools.partial(f, v))(*args)

        def one(v, *args):
            return jax.tree.map(lambda t: t[None], f(v, *jax.tree.map(lambda t: t[0], args)))

        return one

    if len(devices) == 1:
        # Arguments go to the one device first: a message that comes straight from a pmapped round is replicated
        # over the round's N devices, and jit would then run the whole attack on all N of them (README, Performance).
        on_one = jax.device_put(variables, devices[0])

        def on_device(f, **static):
            jitted = jax.jit(f, static_argnames=tuple(static))
            return lambda *args, **kw: jitted(on_one, *jax.device_put(args, devices[0]), **kw)

        def run_local(v, x, st, msg, y, length):
            return local(functools.partial(run_chunk, length=length))(v, x, st, msg, y)

        run = on_device(run_local, length=None)
        return CompiledAttack(
            on_device(local(init)),
            lambda x, st, msg, y, length: run(x, st, msg, y, length=length),
            on_device(local(final_loss)),
        )
    # Independent attacks need no collective: each device runs its share of the attack axis.
    mesh = jax.sharding.Mesh(np.array(devices), ("attacks",))
    spec = jax.sharding.PartitionSpec("attacks")
    sharding = jax.sharding.NamedSharding(mesh, spec)
    on_all = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def spread(f, arity: int):
        # check_vma=False: with it, differentiating w.r.t. the (replicated) parameters inside an attack would psum
        # the parameter gradient over the attack axis (the transpose of an implicit broadcast), mixing attacks.
        in_specs = (jax.sharding.PartitionSpec(), *([spec] * arity))
        mapped = jax.shard_map(local(f), mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
        jitted = jax.jit(mapped)
        return lambda *args: jitted(on_all, *jax.device_put(args, sharding))

    chunks = functools.cache(lambda length: spread(functools.partial(run_chunk, length=length), 4))
    return CompiledAttack(
        spread(init, 1), lambda x, st, msg, y, length: chunks(length)(x, st, msg, y), spread(final_loss, 3)
    )


def check_message(msg, params) -> None:
    """Rejects a message that was not made for `params` (another model, another compressor tree)."""
    msg = objectives.gradient_message(msg)
    seen = jax.eval_shape(compress_lib.decompress, msg)
    structure_differs = jax.tree.structure(seen) != jax.tree.structure(params)  # type: ignore[operator]
    if structure_differs or any(
        s.shape != np.shape(p) for s, p in zip(jax.tree.leaves(seen), jax.tree.leaves(params), strict=True)
    ):
        raise AttackError("the message does not match the model's parameters (a message from another model?).")
    if not any(np.any(np.asarray(t)) for t in jax.tree.leaves(compress_lib.decompress(msg))):
        raise AttackError(
            "the observed gradient is all zeros: the cosine objective is undefined. "
            "(A step skipped for NaN/Inf, or a message from a worker with no data?)"
        )


def threat_objectives(threat: str, msg, exclude: tuple[str, ...] = ()) -> list[str]:
    """The objectives a threat model runs on this message; a one-line error where it does not apply.

    ``observed``: the paper's attacker. ``adaptive``: the consistent
    objective of the compressor's family (`objectives.adaptive_objective`).
    ``strongest``: every applicable objective (`objectives.applicable_objectives`),
    of which `invert_gradients` keeps, per batch, the reconstruction whose
    message is closest to the one seen.
    """
    if threat not in THREATS:
        raise AttackError(f"unknown threat model {threat!r}; use one of {THREATS}.")
    if threat == "observed":
        return ["observed"]
    if threat == "strongest":
        for name in exclude:
            objectives.split_objective(name)  # a one-line error for an unknown name
        if "observed" in exclude:
            raise AttackError("strongest always runs the paper's 'observed' objective; exclude only the others.")
        return [o for o in objectives.applicable_objectives(msg) if o not in exclude]
    adaptive = objectives.adaptive_objective(msg)
    if adaptive is None:
        raise AttackError(
            "the adaptive attacker does not apply to this message (dense or quantised: nothing to "
            "adapt to, it would equal 'observed'); use threat='observed' or 'strongest'."
        )
    return [adaptive]


class Inversion(NamedTuple):
    """What `invert_gradients` found, per attacked batch.

    ``images`` [N, B, H, W, C] (normalised) is the threat model's
    reconstruction; ``loss`` [N] its selection criterion (the matching loss,
    or for ``strongest`` the `objectives.consistency_loss`); ``chosen`` [N]
    the objective that produced it. ``candidates`` maps each objective run to
    its own reconstruction [N, B, H, W, C] (its best restart by its matching
    loss), for the per-candidate scores and the auditor's upper bound.
    """

    images: np.ndarray
    loss: np.ndarray
    chosen: list[str]
    candidates: dict[str, np.ndarray]


def _run_objectives(model, variables, messages, labels, image_shape, dataset, names, train, config, seeds, bar):
    """Every (batch, restart) attack of every objective: {name: (x [N, R, B, ...], final matching loss [N, R])}.

    Each objective batches up to `AttackConfig.parallel` of its (batch,
    restart) attacks in one program, as always; objectives then run side by
    side in that program (`compile_attack` with a tuple) while all their
    attacks together stay within ``parallel``. So a single image's
    `strongest` candidates share one program, and ``parallel=1`` runs one
    attack per program. Every objective starts attack (i, r) from the same
    noise either way, and each lane computes what its own program would.
    """
    n, b = labels.shape
    jobs_total = n * config.restarts
    spread = min(len(attack_devices(config)), jobs_total)
    width = -(-min(config.parallel, jobs_total) // spread) * spread  # a multiple of the devices used
    side_by_side = max(config.parallel // width, 1)
    if len(names) > side_by_side:
        out: dict = {}
        for start in range(0, len(names), side_by_side):
            group = tuple(names[start : start + side_by_side])
            out.update(
                _run_objectives(
                    model, variables, messages, labels, image_shape, dataset, group, train, config, seeds, bar
                )
            )
        return out
    ranks = None
    if any(objectives.takes_thin_targets(name) for name in names):
        ranks = objectives.dense_target_ranks(model, variables, messages, (b, *image_shape), train)
    objective = names[0] if len(names) == 1 else tuple(names)
    attack = compile_attack(
        model, variables, objective, config, dataset, image_shape, train=train, width=width, target_ranks=ranks
    )

    def per_name(t):
        return (t,) if len(names) == 1 else t

    # Attack j = (batch j // R, restart j % R).
    jobs = [(i, r) for i in range(n) for r in range(config.restarts)]
    results_x = np.zeros((len(names), len(jobs), b, *image_shape), np.float32)
    results_loss = np.zeros((len(names), len(jobs)), np.float32)
    for start in range(0, len(jobs), width):
        group = jobs[start : start + width]
        # Pad the last group to the compiled width (padding attacks repeat the first and are dropped).
        padded = group + [group[0]] * (width - len(group))
        msg = jax.tree.map(lambda *xs: jnp.stack(xs), *[messages[i] for i, _ in padded])
        y = jnp.asarray(np.stack([labels[i] for i, _ in padded]))
        keys = [jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), seeds[i]), r) for i, r in padded]
        x0 = jnp.stack([jax.random.normal(k, (b, *image_shape), jnp.float32) for k in keys])
        x = x0 if len(names) == 1 else tuple(x0 for _ in names)
        opt_state = attack.init(x)
        done = 0
        while done < config.iterations:
            length = min(config.chunk, config.iterations - done)
            x, opt_state, _ = attack.run_chunk(x, opt_state, msg, y, length)
            jax.block_until_ready(x)
            done += length
            bar.update(length * len(group) * len(names))
        losses = per_name(attack.final_loss(x, msg, y))
        for k, (xk, lk) in enumerate(zip(per_name(x), losses, strict=True)):
            results_x[k, start : start + len(group)] = np.asarray(xk)[: len(group)]
            results_loss[k, start : start + len(group)] = np.asarray(lk)[: len(group)]
    results_loss = np.where(np.isfinite(results_loss), results_loss, np.inf)
    return {
        name: (results_x[k].reshape(n, config.restarts, b, *image_shape), results_loss[k].reshape(n, config.restarts))
        for k, name in enumerate(names)
    }


def consistency_losses(model, variables, messages: list, labels, candidates: np.ndarray, *, train: bool) -> np.ndarray:
    """[N, C] `objectives.consistency_loss` of C candidate reconstructions [N, C, B, ...] per message.

    Looks at the messages and the candidates only, never at an original.
    """
    loss = jax.jit(jax.vmap(objectives.consistency_loss(model, variables, train), in_axes=(0, None, None)))
    # On one device: a message from a pmapped round is replicated over its devices (see compile_attack).
    device = jax.local_devices()[0]
    rows = [
        loss(*jax.device_put((jnp.asarray(c), m, jnp.asarray(y)), device))
        for c, m, y in zip(candidates, messages, labels, strict=True)
    ]
    return np.stack([np.asarray(r) for r in rows])


def invert_gradients(
    model,
    variables,
    messages: list,
    labels,
    image_shape,
    dataset: str,
    *,
    threat: str = "observed",
    train: bool = False,
    config: AttackConfig | None = None,
    seeds=None,
    progress: bool = True,
) -> Inversion:
    """Reconstructs one batch of images per message (see `Inversion`).

    `messages` are per-parameter message trees (`victim.Observation.message`),
    `labels` [N, B] the labels the attacker uses. `model` is attacked as
    given (see `attack_model`). Attack i, restart r starts from noise seeded
    by (config.seed, seeds[i], r), ``seeds`` defaulting to range(N): a
    batch's result does not depend on which batches are attacked beside it,
    and every objective starts from the same noise. Restarts of one objective
    are selected by its matching loss; ``strongest`` selects over every
    (objective, restart) by the consistency loss.
    """
    config = config or AttackConfig()
    names = threat_objectives(threat, messages[0], config.exclude) if messages else []
    for m in messages:
        check_message(m, variables["params"])
        if threat_objectives(threat, m, config.exclude) != names:
            raise AttackError("all messages of one inversion must come from one compressor.")
    labels = np.asarray(labels, np.int32)
    n, b = labels.shape
    image_shape = tuple(image_shape)
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    bar = tqdm(
        total=len(names) * n * config.restarts * config.iterations,
        disable=not progress,
        desc=f"invert ({threat})",
        unit="it",
        dynamic_ncols=True,
    )
    runs = _run_objectives(model, variables, messages, labels, image_shape, dataset, names, train, config, seeds, bar)
    bar.close()
    rows = np.arange(n)
    candidates = {name: x[rows, loss.argmin(1)] for name, (x, loss) in runs.items()}
    if threat != "strongest":
        x, loss = runs[names[0]]
        return Inversion(candidates[names[0]], loss.min(1), [names[0]] * n, candidates)
    every = np.concatenate([x for x, _ in runs.values()], axis=1)  # [N, objectives * restarts, B, ...]
    consistency = consistency_losses(model, variables, messages, labels, every, train=train)
    consistency = np.where(np.isfinite(consistency), consistency, np.inf)
    best = consistency.argmin(1)
    chosen = [names[j // config.restarts] for j in best]
    return Inversion(every[rows, best], consistency[rows, best], chosen, candidates)


@dataclasses.dataclass
class AuditResult:
    reconstructions: np.ndarray  # [N*B, H, W, C] in [0, 1], matched to the originals' order
    originals: np.ndarray  # [N*B, H, W, C] in [0, 1]
    per_image: dict  # ssim / psnr / mse arrays
    summary: dict  # mean / std of each metric
    labels_used: np.ndarray
    matching_loss: np.ndarray  # [N] the selection criterion of each batch's reconstruction (see Inversion.loss)
    wire: compress_lib.WireCost  # of worker 0's gradient message, whatever the observer
    threat: str
    iterations: int
    setting: dict  # workers, batch, observer, bn_statistics, batchnorm, step of the attacked round
    chosen: list[str]  # [N] the objective whose reconstruction the threat model kept, per batch
    candidate_ssim: dict[str, np.ndarray]  # objective -> per-image SSIM of its own reconstruction
    candidate_psnr: dict[str, np.ndarray]  # objective -> per-image PSNR of its own reconstruction
    candidate_reconstructions: dict[str, np.ndarray]  # objective -> [N*B, H, W, C] in [0, 1], matched
    upper_bound_ssim: np.ndarray  # per image, the best SSIM of any candidate: an auditor's bound (uses originals)


def _validate(model, variables, images, labels, threat, label_mode, config, batch_size):
    if threat not in THREATS:
        raise AttackError(f"unknown threat model {threat!r}; use one of {THREATS}.")
    if label_mode not in LABEL_MODES:
        raise AttackError(f"unknown label_mode {label_mode!r}; use one of {LABEL_MODES}.")
    if config.iterations < 1:
        raise AttackError(f"the attack needs iterations >= 1, got {config.iterations}.")
    if config.restarts < 1 or config.chunk < 1 or config.parallel < 1:
        raise AttackError("restarts, chunk and parallel must be >= 1.")
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise AttackError(f"images must be normalised floats (data.normalize), got dtype {images.dtype}.")
    if images.ndim != 4:
        raise AttackError(f"images must be [N, H, W, C], got shape {images.shape}.")
    if batch_size < 1 or len(images) % batch_size:
        raise AttackError(f"{len(images)} images do not split into victim batches of {batch_size}.")
    try:
        out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images[:1])
    except Exception as e:  # flax/lax raise many types for a wrong input shape
        raise AttackError(
            f"the model does not take images of shape {images.shape[1:]} ({type(e).__name__}: "
            f"{str(e)[:200]}); give images shaped like its training data."
        ) from e
    num_classes = out.shape[-1]
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise AttackError(f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise AttackError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}].")
    return images.astype(np.float32), labels.astype(np.int32), num_classes


def audit(
    model: nn.Module,
    variables: dict,
    images,
    labels,
    compressor: compress_lib.Compressor,
    *,
    dataset: str,
    threat: str = "observed",
    config: AttackConfig | None = None,
    batch_size: int = 1,
    workers: int = 1,
    other_images=None,
    other_labels=None,
    observer: str = "worker",
    bn_statistics: str = "train",
    batchnorm: str = "sync",
    comp_state: Any = None,
    step: int = 0,
    seeds=None,
    label_mode: str = "known",
    progress: bool = True,
) -> AuditResult:
    """Attacks every victim batch of `images` in a real N-worker round and scores the reconstructions.

    Each consecutive group of `batch_size` normalised images is worker 0's
    batch in one round of `victim.make_round` with ``workers`` workers;
    workers 1..N-1 train on ``other_images[i]`` [N-1, B, H, W, C] (labels
    ``other_labels[i]`` [N-1, B]) in round i. ``comp_state`` (stacked over
    the N workers) and `variables` (worker 0's BatchNorm buffers) come from
    step ``step`` of a real run, or the first step when None. The attacker
    runs `attack_model(model)` in the round's BatchNorm mode.

    Returns reconstructions matched to the originals (Hungarian on MSE within
    each batch), per-image SSIM / PSNR / MSE on [0, 1] images, their mean /
    std, and the setting of the round.
    """
    config = config or AttackConfig()
    images, labels, num_classes = _validate(model, variables, images, labels, threat, label_mode, config, batch_size)
    victim_lib.check_setting(observer, bn_statistics, batchnorm)
    victim_lib.check_workers(workers)
    n = len(images) // batch_size
    xb = images.reshape(n, batch_size, *images.shape[1:])
    yb = labels.reshape(n, batch_size)
    if workers > 1:
        want = (n, workers - 1, batch_size)
        if other_images is None or np.shape(other_images)[:3] != want or np.shape(other_labels) != want:
            raise AttackError(
                f"workers={workers} needs the other workers' batches: other_images [{n}, {workers - 1}, "
                f"{batch_size}, H, W, C] and other_labels {list(want)} (see victim.other_worker_ids)."
            )
        wx = np.concatenate([xb[:, None], np.asarray(other_images, np.float32)], 1)
        wy = np.concatenate([yb[:, None], np.asarray(other_labels, np.int32)], 1)
    else:
        wx, wy = xb[:, None], yb[:, None]
    round_ = victim_lib.make_round(
        model, compressor, workers=workers, observer=observer, bn_statistics=bn_statistics, batchnorm=batchnorm
    )
    observations = [round_(variables, wx[i], wy[i], comp_state) for i in range(n)]
    # Synchronised BatchNorm's traffic travels on the same link (worker observer, train mode): the attacker has it.
    messages = [objectives.WithBatchNorm(o.message, o.bn) if o.bn else o.message for o in observations]
    if label_mode == "idlg":
        yb = np.stack([labels_lib.infer_labels_idlg(o.message, num_classes, batch_size) for o in observations])
    inv = invert_gradients(
        attack_model(model, config.matmul_dtype),
        variables,
        messages,
        yb,
        images.shape[1:],
        dataset,
        threat=threat,
        train=bn_statistics == "train",
        config=config,
        seeds=seeds,
        progress=progress,
    )
    originals = np.clip(np.asarray(data_lib.denormalize(xb, dataset)), 0, 1)

    def scored(rec):
        """[0, 1] reconstructions matched to the originals (Hungarian within each batch), flat, and their scores."""
        rec01 = np.clip(np.asarray(data_lib.denormalize(rec, dataset)), 0, 1)
        for i in range(n):
            rec01[i] = rec01[i][metrics_lib.match(originals[i], rec01[i])]
        flat = rec01.reshape(-1, *images.shape[1:])
        return flat, metrics_lib.image_scores(originals.reshape(flat.shape), flat)

    flat_r, per_image = scored(inv.images)
    candidates = {name: scored(rec) for name, rec in inv.candidates.items()}
    candidate_ssim = {name: scores["ssim"] for name, (_, scores) in candidates.items()}
    upper = np.max(np.stack([per_image["ssim"], *candidate_ssim.values()]), axis=0)
    flat_o = originals.reshape(flat_r.shape)
    summary = {k: metrics_lib.summarize(v) for k, v in per_image.items()}
    setting = dict(
        workers=workers,
        batch=batch_size,
        observer=observer,
        bn_statistics=bn_statistics,
        batchnorm=batchnorm,
        step=step,
    )
    return AuditResult(
        flat_r,
        flat_o,
        per_image,
        summary,
        np.asarray(yb).reshape(-1),
        inv.loss,
        observations[0].wire,
        threat,
        config.iterations,
        setting,
        inv.chosen,
        candidate_ssim,
        {name: scores["psnr"] for name, (_, scores) in candidates.items()},
        {name: rec for name, (rec, _) in candidates.items()},
        upper,
    )
