"""Gradient inversion against what one worker puts on the wire (Geiping et al., NeurIPS 2020): the optimisation.

The attacker is an honest-but-curious observer of a real data-parallel round
(`attacks.victim`): it sees worker 0's message (observer ``worker``) or the
averaged update (``aggregate``). It knows the model at the attacked step and
applies it in the BatchNorm mode the round used, the loss the victim trained
with, the compressor and its configuration, and the labels (``label_mode=
"known"``, the paper's setting) or infers them (``"idlg"``). It does not know
the victim's error-feedback memory nor the other workers' data. What it
matches is in `attacks.objectives`; `attacks.audit` runs a round, this and
the scores.

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
convolution kernels' gradients factored (`attacks.factored`). A user's own
Flax module runs as built (`models.OwnModule`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from trustsgd_jax import compress as compress_lib
from trustsgd_jax import data as data_lib
from trustsgd_jax import models as models_lib
from trustsgd_jax import train as train_lib
from trustsgd_jax.attacks import objectives
from trustsgd_jax.attacks.errors import AttackError

THREATS = ("observed", "adaptive", "strongest")
MATMUL_DTYPES = models_lib.MATMUL_DTYPES
# Geiping et al.'s budget (NeurIPS 2020, CIFAR-10): 24,000 iterations per attack. Hours per image on a CPU; the
# default (`AttackConfig.iterations`) is 1,000.
PAPER_ITERATIONS = 24_000


class AttackConfig(NamedTuple):
    """Knobs of the attack: Geiping et al.'s CIFAR setting, except the budget.

    ``iterations`` defaults to 1,000 (minutes for one image of the small
    ConvNet on a CPU); Geiping et al. ran `PAPER_ITERATIONS` (24,000), which
    takes hours there: pass ``iterations=PAPER_ITERATIONS`` for their budget.
    """

    iterations: int = 1000
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
    # Iterations (each in [1, iterations)) after which the run's images are also kept and scored, so one long run
    # gives the whole budget curve (`Inversion.at`).
    checkpoints: tuple[int, ...] = ()
    # The budget the learning-rate schedule (x0.1 at 3/8, 5/8, 7/8) is laid over; None: `iterations`. A run of k
    # iterations with schedule_iterations=T is the first k iterations of the T-iteration run.
    schedule_iterations: int | None = None


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


def attack_model(model: nn.Module, matmul_dtype: str = "float32", alone_axis: str | None = None) -> nn.Module:
    """The attack-ready form of a model (`models.for_attack`): no data-parallel axis, the same parameters.

    This package's models run with im2col convolutions (checkpoints
    interchange); without the axis, BatchNorm in train mode normalises by the
    dummy batch's own statistics. ``matmul_dtype="bfloat16"`` runs their
    convolutions' matmuls on bf16 inputs with fp32 accumulation
    (`models.PatchesConv`); pixels, parameters and everything else stay fp32.
    A user's module runs as built; ``alone_axis`` names the axis its own
    ``nn.BatchNorm`` reduces over, if any.
    """
    try:
        return models_lib.for_attack(model, matmul_dtype, alone_axis)
    except ValueError as e:
        raise AttackError(str(e)) from e


def _optimizer(config: AttackConfig) -> optax.GradientTransformation:
    t = config.schedule_iterations or config.iterations
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


class _AttackFns(NamedTuple):
    """One attack's functions of the variables v: ``init(v, x)``, ``run_chunk(v, x, st, msg, y, length)``,
    ``final_loss(v, x, msg, y)`` (see `CompiledAttack`), before they are placed on devices."""

    init: Callable
    run_chunk: Callable
    final_loss: Callable


def _attack_fns(model, names: tuple[str, ...], lanes: bool, weights, train, target_ranks, loss_fn, config, bounds):
    """The attack loop of `compile_attack` over the objectives `names` (side by side where ``lanes``)."""
    lo, hi = bounds
    opt = _optimizer(config)

    # The variables are an argument of every compiled program, never a constant folded into it: the programs of
    # one shape are then the same whatever the victim's weights (a trained victim at another step, another seed),
    # so JAX's persistent compilation cache serves them, and its entries do not carry the model (ResNet-18: about
    # 80 MB per program as constants).
    def matchings_at(v):
        return [objectives.matching_loss(model, v, name, weights, train, target_ranks, loss_fn) for name in names]

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

    return _AttackFns(init, run_chunk, final_loss)


def _per_device(f, attacks_per_device: int):
    """f(v, *args) over one device's attacks (a leading axis on every argument after the variables v).

    One attack runs without vmap: a width-1 vmap still rewrites every matmul as a batched one, slower on XLA:CPU.
    """
    if attacks_per_device > 1:
        return lambda v, *args: jax.vmap(functools.partial(f, v))(*args)

    def one(v, *args):
        return jax.tree.map(lambda t: t[None], f(v, *jax.tree.map(lambda t: t[0], args)))

    return one


def _on_one_device(fns: _AttackFns, variables, device, width: int) -> CompiledAttack:
    """`fns` jitted on one device, the variables placed there once."""
    # Arguments go to the one device first: a message that comes straight from a pmapped round is replicated
    # over the round's N devices, and jit would then run the whole attack on all N of them (README, Performance).
    on_one = jax.device_put(variables, device)

    def on_device(f, **static):
        jitted = jax.jit(f, static_argnames=tuple(static))
        return lambda *args, **kw: jitted(on_one, *jax.device_put(args, device), **kw)

    def run_local(v, x, st, msg, y, length):
        return _per_device(functools.partial(fns.run_chunk, length=length), width)(v, x, st, msg, y)

    run = on_device(run_local, length=None)
    return CompiledAttack(
        on_device(_per_device(fns.init, width)),
        lambda x, st, msg, y, length: run(x, st, msg, y, length=length),
        on_device(_per_device(fns.final_loss, width)),
    )


def _over_devices(fns: _AttackFns, variables, devices: list, width: int) -> CompiledAttack:
    """`fns` over several devices: each runs its share of the attack axis (independent attacks, no collective)."""
    mesh = jax.sharding.Mesh(np.array(devices), ("attacks",))
    spec = jax.sharding.PartitionSpec("attacks")
    sharding = jax.sharding.NamedSharding(mesh, spec)
    on_all = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    per_device = width // len(devices)

    def spread(f, arity: int):
        # check_vma=False: with it, differentiating w.r.t. the (replicated) parameters inside an attack would psum
        # the parameter gradient over the attack axis (the transpose of an implicit broadcast), mixing attacks.
        in_specs = (jax.sharding.PartitionSpec(), *([spec] * arity))
        mapped = jax.shard_map(
            _per_device(f, per_device), mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False
        )
        jitted = jax.jit(mapped)
        return lambda *args: jitted(on_all, *jax.device_put(args, sharding))

    chunks = functools.cache(lambda length: spread(functools.partial(fns.run_chunk, length=length), 4))
    return CompiledAttack(
        spread(fns.init, 1), lambda x, st, msg, y, length: chunks(length)(x, st, msg, y), spread(fns.final_loss, 3)
    )


def compile_attack(
    model: nn.Module,
    variables: dict,
    objective: str | tuple[str, ...],
    config: AttackConfig,
    dataset: str | data_lib.DatasetStats,
    image_shape,
    *,
    train: bool,
    width: int,
    target_ranks: tuple | None = None,
    loss_fn: train_lib.LossFn = train_lib.cross_entropy,
) -> CompiledAttack:
    """Builds the jitted attack minimising `objective` (`objectives.OBJECTIVES`) for `model` at `variables`.

    Pass `attack_model(model)` for speed. ``dataset`` (a study dataset's name
    or `data.DatasetStats`) gives the valid pixel range. ``train`` applies
    BatchNorm with batch statistics (as a train-mode round computed the
    message) instead of the running averages; ``loss_fn`` is the victim's
    per-example loss. ``target_ranks`` (`objectives.dense_target_ranks` of
    the messages to attack) holds their dense deep-layer tensors as thin
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
    bounds = tuple(jnp.asarray(v, jnp.float32) for v in data_lib.pixel_bounds(dataset))
    rank = objectives.forward_order(model, variables, image_shape) if config.layer_weights == "linear" else None
    weights = objectives.tensor_weights(len(jax.tree.leaves(variables["params"])), config.layer_weights, rank)
    names = (objective,) if isinstance(objective, str) else tuple(objective)
    if not names:
        raise AttackError("compile_attack needs at least one objective.")
    lanes = not isinstance(objective, str)
    fns = _attack_fns(model, names, lanes, weights, train, target_ranks, loss_fn, config, bounds)
    devices = attack_devices(config)[: max(1, width)]
    if width % len(devices):
        raise AttackError(f"width={width} attacks do not split over {len(devices)} devices; use a multiple.")
    if len(devices) == 1:
        return _on_one_device(fns, variables, devices[0], width)
    return _over_devices(fns, variables, devices, width)


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
    at: dict | None = None  # iteration -> the Inversion at that `AttackConfig.checkpoints` entry


class AttackPlan(NamedTuple):
    """How `invert_gradients` batches its attacks (`attack_plan`): `width` (batch, restart) attacks per program,
    and the groups of objectives that run side by side in one program, in order."""

    width: int
    groups: list[tuple[str, ...]]
    jobs: int  # (batch, restart) attacks per objective

    @property
    def programs(self) -> int:
        """Attack programs run one after another (each `AttackConfig.iterations` long): the progress bar's unit."""
        return len(self.groups) * math.ceil(self.jobs / self.width)


def attack_plan(n: int, names: list[str], config: AttackConfig) -> AttackPlan:
    """Each objective batches up to `AttackConfig.parallel` of its (batch, restart) attacks in one program;
    objectives then run side by side in that program while all their attacks together stay within ``parallel``."""
    jobs = n * config.restarts
    spread = min(len(attack_devices(config)), jobs)
    width = -(-min(config.parallel, jobs) // spread) * spread  # a multiple of the devices used
    side_by_side = max(config.parallel // width, 1)
    groups = [tuple(names[i : i + side_by_side]) for i in range(0, len(names), side_by_side)]
    return AttackPlan(width, groups, jobs)


def _run_group(
    model, variables, messages, labels, image_shape, dataset, names, train, config, seeds, width, bar, loss_fn
):
    """Every (batch, restart) attack of the objectives `names`, side by side in one program:
    {(iteration, name): (x [N, R, B, ...], matching loss [N, R])} at every checkpoint and at the end.

    Every objective starts attack (i, r) from the same noise, and each lane
    computes what its own program would.
    """
    n, b = labels.shape
    ranks = None
    if any(objectives.takes_thin_targets(name) for name in names):
        ranks = objectives.dense_target_ranks(model, variables, messages, (b, *image_shape), train)
    objective = names[0] if len(names) == 1 else tuple(names)
    attack = compile_attack(
        model,
        variables,
        objective,
        config,
        dataset,
        image_shape,
        train=train,
        width=width,
        target_ranks=ranks,
        loss_fn=loss_fn,
    )

    def per_name(t):
        return (t,) if len(names) == 1 else t

    # Attack j = (batch j // R, restart j % R).
    jobs = [(i, r) for i in range(n) for r in range(config.restarts)]
    stops = sorted(set(config.checkpoints)) + [config.iterations]
    results_x = np.zeros((len(stops), len(names), len(jobs), b, *image_shape), np.float32)
    results_loss = np.zeros((len(stops), len(names), len(jobs)), np.float32)
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
        for c, stop in enumerate(stops):
            while done < stop:  # chunks end at every checkpoint: the same iterations, kept on the way
                length = min(config.chunk, stop - done)
                x, opt_state, _ = attack.run_chunk(x, opt_state, msg, y, length)
                jax.block_until_ready(x)
                done += length
                bar.update(length)
            losses = per_name(attack.final_loss(x, msg, y))
            for k, (xk, lk) in enumerate(zip(per_name(x), losses, strict=True)):
                results_x[c, k, start : start + len(group)] = np.asarray(xk)[: len(group)]
                results_loss[c, k, start : start + len(group)] = np.asarray(lk)[: len(group)]
    results_loss = np.where(np.isfinite(results_loss), results_loss, np.inf)
    return {
        (stop, name): (
            results_x[c, k].reshape(n, config.restarts, b, *image_shape),
            results_loss[c, k].reshape(n, config.restarts),
        )
        for c, stop in enumerate(stops)
        for k, name in enumerate(names)
    }


def consistency_losses(
    model,
    variables,
    messages: list,
    labels,
    candidates: np.ndarray,
    *,
    train: bool,
    loss_fn: train_lib.LossFn = train_lib.cross_entropy,
) -> np.ndarray:
    """[N, C] `objectives.consistency_loss` of C candidate reconstructions [N, C, B, ...] per message.

    Looks at the messages and the candidates only, never at an original.
    """
    loss = jax.jit(jax.vmap(objectives.consistency_loss(model, variables, train, loss_fn), in_axes=(0, None, None)))
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
    dataset: str | data_lib.DatasetStats,
    *,
    threat: str = "observed",
    train: bool = False,
    config: AttackConfig | None = None,
    seeds=None,
    progress: bool = True,
    loss_fn: train_lib.LossFn = train_lib.cross_entropy,
) -> Inversion:
    """Reconstructs one batch of images per message (see `Inversion`).

    `messages` are per-parameter message trees (`victim.Observation.message`),
    `labels` [N, B] the labels the attacker uses, ``loss_fn`` the victim's
    per-example loss. `model` is attacked as given (see `attack_model`).
    Attack i, restart r starts from noise seeded by (config.seed, seeds[i],
    r), ``seeds`` defaulting to range(N): a batch's result does not depend on
    which batches are attacked beside it, and every objective starts from the
    same noise. Restarts of one objective are selected by its matching loss;
    ``strongest`` selects over every (objective, restart) by the consistency
    loss. The progress bar counts attack iterations: of each program of
    `AttackConfig.parallel` attacks side by side, one after another.
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
    plan = attack_plan(n, names, config)
    bar = tqdm(
        total=plan.programs * config.iterations,
        disable=not progress,
        desc=f"invert ({threat})",
        unit="it",
        dynamic_ncols=True,
    )
    runs: dict = {}
    for group in plan.groups:
        runs.update(
            _run_group(
                model,
                variables,
                messages,
                labels,
                image_shape,
                dataset,
                group,
                train,
                config,
                seeds,
                plan.width,
                bar,
                loss_fn,
            )
        )
    bar.close()
    final = _select(runs, config.iterations, names, threat, model, variables, messages, labels, train, config, loss_fn)
    at = {
        k: _select(runs, k, names, threat, model, variables, messages, labels, train, config, loss_fn)
        for k in sorted(set(config.checkpoints))
    }
    return final._replace(at=at)


def _select(runs, stop, names, threat, model, variables, messages, labels, train, config, loss_fn) -> Inversion:
    """The `Inversion` at iteration `stop`: each objective's best restart; for ``strongest``, the candidate with the
    lowest consistency loss (messages and candidates only, never an original)."""
    n = len(labels)
    rows = np.arange(n)
    candidates = {name: runs[stop, name][0][rows, runs[stop, name][1].argmin(1)] for name in names}
    if threat != "strongest":
        return Inversion(candidates[names[0]], runs[stop, names[0]][1].min(1), [names[0]] * n, candidates)
    every = np.concatenate([runs[stop, name][0] for name in names], axis=1)  # [N, objectives * restarts, B, ...]
    consistency = consistency_losses(model, variables, messages, labels, every, train=train, loss_fn=loss_fn)
    consistency = np.where(np.isfinite(consistency), consistency, np.inf)
    best = consistency.argmin(1)
    chosen = [names[j // config.restarts] for j in best]
    return Inversion(every[rows, best], consistency[rows, best], chosen, candidates)
