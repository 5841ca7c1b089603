"""Data-parallel training with a gradient compressor before the collective.

`make_step` builds the per-worker step. Every cross-worker exchange in it is a
collective over ``axis_name``: the compressor's ``psum``/``all_gather``, the
synchronised BatchNorm statistics (model norm ``batch``) and the logged
metrics. So the same function runs under ``jax.pmap`` (`pmap_step`) and under
``jax.shard_map`` in manual mode (`shard_map_step`). Plain ``jit`` with
shardings would insert its own uncompressed all-reduce and bypass the
compressor, so it is deliberately not offered.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from trustsgd_jax import compress as compress_lib
from trustsgd_jax import data as data_lib
from trustsgd_jax import models as models_lib

AXIS = "batch"


@struct.dataclass
class TrainState:
    params: Any
    batch_stats: Any  # {} when the model has no BatchNorm
    opt_state: Any
    comp_state: compress_lib.CompressorState


def cross_entropy(logits, labels):
    """Per-example softmax cross-entropy with integer labels, [B]: the default training loss (`LossFn`)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# A training loss: ``loss_fn(logits [B, classes], labels [B]) -> per-example loss [B]``; the step takes its mean.
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def init_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    compressor: compress_lib.Compressor,
    image_shape,
    seed: int,
) -> TrainState:
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(params, variables.get("batch_stats", {}), optimizer.init(params), compressor.init(params))


def has_sync_bn(model: nn.Module) -> bool:
    """Whether `model` synchronises BatchNorm over a data-parallel axis (norm ``batch`` with an ``axis_name``)."""
    return getattr(model, "norm", None) == "batch" and getattr(model, "axis_name", None) is not None


def sync_bn_words(model: nn.Module, batch_stats) -> int:
    """32-bit words a worker sends per step for synchronised BatchNorm.

    Per layer of C channels (`models.SyncBatchNorm`): forward, its batch mean
    and mean of squares (2 C); backward, the all-reduce of their cotangents
    that the pmean's transpose performs (2 C). 4 C words, twice the size of
    the layer's (mean, var) running statistics, uncompressed whatever the
    gradient compressor. (The compiled step has these two all-reduces per
    layer and no other: tested against its HLO.)
    """
    if not has_sync_bn(model):
        return 0
    return 2 * sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(batch_stats))


def _bn_probes(batch_stats) -> dict:
    """Zero probes of `models.SyncBatchNorm` (``local``, ``global``: [2, C] per layer) in ``perturbations`` layout."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(batch_stats))
    probes = {}
    for path, value in flat.items():
        if path[-1] == "mean":
            for name in ("local", "global"):
                probes[(*path[:-1], name)] = jnp.zeros((2, *np.shape(value)), jnp.float32)
    return flax.traverse_util.unflatten_dict(probes)


def bn_traffic(wire: dict, probe_grads: dict) -> dict:
    """One worker's synchronised-BatchNorm traffic of a step, per layer (the layout of ``batch_stats``' layers).

    ``sent``: [mean, mean of squares] of its batch; ``received``: their
    all-reduce (the statistics the step normalised with); ``grad_sent``:
    dL_w/d(received), its contribution to the backward all-reduce;
    ``grad_received``: (1/N) sum_w dL_w/d(received), what that all-reduce
    returns (pmean's transpose), the cotangent of ``sent``. L_w is the
    worker's mean loss over its batch. All [2, C].
    """
    sown = flax.traverse_util.flatten_dict(flax.core.unfreeze(wire))
    grads = flax.traverse_util.flatten_dict(flax.core.unfreeze(probe_grads))
    out = {}
    for path in {p[:-1] for p in sown}:
        out[(*path, "sent")] = jnp.stack([sown[(*path, "bn_mean")][0], sown[(*path, "bn_mean_sq")][0]])
        out[(*path, "received")] = sown[(*path, "bn_received")][0]
        out[(*path, "grad_sent")] = grads[(*path, "global")]
        out[(*path, "grad_received")] = grads[(*path, "local")]
    return flax.traverse_util.unflatten_dict(out)


def sync_bn_statistics(batch_stats: dict, traffic: dict) -> dict | None:
    """The statistics a synchronised-BatchNorm step normalised with, in the layout of ``batch_stats``.

    From one worker's traffic (`make_step`'s ``bn``; every worker received
    the same all-reduce): per layer mean = received[0] and var =
    max(0, received[1] - mean^2), as `models.SyncBatchNorm` computes them.
    Eval mode with these as running averages reproduces the step's forward
    pass. None when nothing travelled (BatchNorm local to each worker, eval
    mode, no BatchNorm).
    """
    if not batch_stats or not traffic:
        return None
    layers = flax.traverse_util.flatten_dict(flax.core.unfreeze(traffic))
    out = {}
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(batch_stats)).items():
        received = layers.get((*path[:-1], "received"))
        if path[-1] not in ("mean", "var") or received is None:
            return None
        mean = jnp.asarray(received[0], jnp.float32)
        out[path] = mean if path[-1] == "mean" else jnp.maximum(0.0, jnp.asarray(received[1], jnp.float32) - mean**2)
        if out[path].shape != np.shape(value):
            return None
    return flax.traverse_util.unflatten_dict(out)


def step_wire_cost(model, compressor, state: TrainState, step: int | None = None) -> dict:
    """Words one worker sends at one step: the compressor's message and the synchronised-BatchNorm statistics.

    ``step`` matters only for compressors whose message size changes with
    the step (PowerSGD's dense warm-up, ``start_iter``); see `compress.wire_cost`.
    """
    grads = compress_lib.wire_cost(compressor, state.params, step=step).words
    bn = sync_bn_words(model, state.batch_stats)
    dense = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state.params))
    return {
        "grad_words": grads,
        "bn_words": bn,
        "words": grads + bn,
        "bytes": 4 * (grads + bn),
        "uncompressed_words": dense + bn,
    }


BN_STATISTICS = ("train", "eval")


def make_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    compressor: compress_lib.Compressor,
    axis_name: str = AXIS,
    return_message: bool = False,
    bn_statistics: str = "train",
    loss_fn: LossFn = cross_entropy,
) -> Callable:
    """Per-worker train step ``(state, images, labels) -> (state, metrics[, message])``.

    The loss is the mean over the worker's batch of ``loss_fn(logits,
    labels)``, per-example losses (softmax cross-entropy by default).

    ``bn_statistics="train"`` is training: BatchNorm normalises by batch
    statistics (synchronised over ``axis_name`` for norm ``batch``) and
    updates its running averages. ``"eval"`` computes the gradient with the
    running averages (Geiping et al.'s setting for attacks; not training).

    The message is what this worker put on the wire and what it received:
    ``grads``, the compressor's message; ``bn``, with synchronised BatchNorm
    in train mode, its BatchNorm traffic (`bn_traffic`: the statistics and
    their cotangents it sent to and received from the two all-reduces per
    layer); ``update``, the averaged update every worker receives.
    """
    if bn_statistics not in BN_STATISTICS:
        raise ValueError(f"unknown bn_statistics {bn_statistics!r}; use one of {BN_STATISTICS}.")
    train = bn_statistics == "train"

    # With the message asked for, synchronised BatchNorm's backward all-reduce is observed too: the cotangents of
    # zero probes on its statistics (models.SyncBatchNorm). Training alone carries no probes.
    observe_bn = return_message and train and has_sync_bn(model)

    def step(state: TrainState, images, labels):
        def step_loss(params, probes):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            if probes:
                variables["perturbations"] = probes
            logits, updates = model.apply(variables, images, train=train, mutable=["batch_stats", "wire"])
            return loss_fn(logits, labels).mean(), (logits, updates)

        probes = _bn_probes(state.batch_stats) if observe_bn else {}
        (loss, (logits, updates)), (grads, probe_grads) = jax.value_and_grad(step_loss, argnums=(0, 1), has_aux=True)(
            state.params, probes
        )
        avg, comp_state, msg = compressor.reduce(grads, state.comp_state, axis_name)
        upd, opt_state = optimizer.update(avg, state.opt_state, state.params)
        params = optax.apply_updates(state.params, upd)
        new_state = TrainState(params, updates.get("batch_stats", state.batch_stats), opt_state, comp_state)
        metrics = {
            "loss": jax.lax.pmean(loss, axis_name),
            "accuracy": jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == labels), axis_name),
            "nonfinite_steps": comp_state.nonfinite,
        }
        if return_message:
            bn = bn_traffic(updates["wire"], probe_grads) if observe_bn else {}
            return new_state, metrics, {"grads": msg, "bn": bn, "update": avg}
        return new_state, metrics

    return step


def pmap_step(step: Callable, axis_name: str = AXIS, devices=None) -> Callable:
    return jax.pmap(step, axis_name=axis_name, devices=devices, donate_argnums=(0,))


def shard_map_step(step: Callable, mesh: Mesh, axis_name: str = AXIS) -> Callable:
    """The same per-worker step under ``jax.shard_map`` (manual mode).

    Takes and returns the stacked per-device arrays that `pmap_step` does
    (leading axis = devices), so the two are interchangeable.
    """

    def body(*args):
        out = step(*jax.tree.map(lambda x: x[0], args))
        return jax.tree.map(lambda x: x[None], out)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(axis_name), out_specs=P(axis_name)))


def replicate(tree, n: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *np.shape(x))), tree)


def _first_row(x):
    """x[0], read from the shard that holds row 0 when x spans several devices.

    Indexing a multi-device array eagerly compiles a program over all of its
    devices (a masked gather and an all-reduce). Dispatched between training
    steps, leaf after leaf, such programs deadlocked simulated CPU devices:
    seven of eight waited in an all-reduce that the eighth never reached
    (MIA training, 8 devices, 2 cores). The shard's own data is a one-device
    array, so this reads it without a collective.
    """
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
        for shard in x.addressable_shards:
            rows = shard.index[0] if shard.index else slice(None)
            start = rows.start or 0
            if start == 0:
                return shard.data[0]
    return x[0]


def unreplicate(tree):
    """Device 0's copy of a tree stacked over devices (leading axis), without cross-device work."""
    return jax.tree.map(_first_row, tree)


def check_batch(global_batch: int, num_devices: int) -> int:
    if global_batch < 1 or global_batch % num_devices:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the {num_devices} devices; "
            f"use a multiple of {num_devices} (e.g. {max(1, global_batch // num_devices) * num_devices})."
        )
    return global_batch // num_devices


def shard_batch(images, labels, num_local: int):
    """Reshapes one process's slice of the global batch to [local devices, per-device, ...]."""
    per = images.shape[0] // num_local
    return images.reshape(num_local, per, *images.shape[1:]), labels.reshape(num_local, per)


class StepMessage(NamedTuple):
    """What one training step put on the wire, for `fit`'s ``on_message``.

    ``variables``: the model (params, batch_stats of device 0) the step
    started from; ``message``: `make_step`'s message stacked over workers
    (``grads``, ``bn``, ``update``); ``batch_ids``: [workers, per-worker
    batch] indices into the training images each worker trained on.
    """

    step: int
    variables: dict
    message: Any
    batch_ids: np.ndarray


@dataclasses.dataclass
class FitResult:
    state: TrainState  # unreplicated (device 0) params/batch_stats; per-worker comp_state stays stacked
    history: list[dict]
    wire: dict
    seconds: float


def _index_stream(indices: np.ndarray, global_batch: int, seed: int) -> Iterator[np.ndarray]:
    """Seeded shuffled batches of `indices`, epoch after epoch (the order depends only on the seed)."""
    epoch = 0
    while True:
        for idx, _ in data_lib.batches(indices, indices, global_batch, seed, epoch):
            yield idx
        epoch += 1


def _run_steps(
    run: Callable,
    state,
    batch_fn: Callable[[], tuple],
    *,
    steps: int,
    log_every: int,
    progress: bool,
    words_through: Callable[[int], int],
    desc: str = "train",
    on_step: Callable[[int, Any], None] | None = None,
):
    """The training loop `fit` and `fit_many` share: steps, logging, the NaN/Inf stop, a progress bar.

    ``on_step(n, state)`` is called after step n (1-based) with the replicated state.
    """
    history: list[dict] = []
    t0 = time.time()
    bar = tqdm(
        total=steps, disable=not (progress and jax.process_index() == 0), desc=desc, unit="step", dynamic_ncols=True
    )
    for i in range(steps):
        state, metrics = run(state, *batch_fn())
        # One step in flight: with steps and batch transfers queued ahead (asynchronous dispatch), simulated CPU
        # devices deadlocked in an all-reduce that some never reached (8 devices, 2 cores). The wait's cost is
        # not measured.
        jax.block_until_ready(metrics)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            m = {k: np.asarray(v)[0] for k, v in metrics.items()}  # device 0 ([models] under fit_many)
            skipped = int(np.max(m["nonfinite_steps"]))
            if skipped > 0:
                raise FloatingPointError(
                    f"step {i + 1}: a worker's gradient had NaN/Inf ({skipped} step(s) skipped; error memory kept "
                    "clean). Lower the learning rate or check the input data."
                )
            rec = {k: float(v) if np.ndim(v) == 0 else np.asarray(v, float).tolist() for k, v in m.items()}
            rec.update(step=i + 1, seconds=time.time() - t0, wire_words=words_through(i + 1))
            history.append(rec)
            bar.set_postfix(loss=f"{np.mean(m['loss']):.3f}", acc=f"{np.mean(m['accuracy']):.3f}")
        if on_step is not None:
            on_step(i + 1, state)
        bar.update(1)
    bar.close()
    jax.block_until_ready(state)
    return state, history, time.time() - t0


def _words_through(model, compressor, state: TrainState) -> Callable[[int], int]:
    """n -> 32-bit words one worker sent in its first n steps (gradient messages, dense warm-up included, + BN)."""
    bn = sync_bn_words(model, state.batch_stats)
    return lambda n: compress_lib.training_words(compressor, state.params, n) + bn * n


def _check_fit_args(steps: int, global_batch: int, n_global: int, smallest: int) -> int:
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    per_device = check_batch(global_batch, n_global)
    if global_batch > smallest:
        raise ValueError(f"global batch {global_batch} exceeds the {smallest} training images.")
    return per_device


def fit(
    model: nn.Module,
    compressor: compress_lib.Compressor,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    steps: int,
    global_batch: int,
    optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
    log_every: int = 50,
    progress: bool = True,
    image_shape=None,
    use_shard_map: bool = False,
    devices: list | None = None,
    on_message: Callable[[StepMessage], None] | None = None,
    snapshot_steps=(),
    on_snapshot: Callable[[int, TrainState], None] | None = None,
) -> FitResult:
    """Trains `model` with `compressor` on normalised float images, data-parallel.

    Workers are all devices of all processes, or the given local `devices`
    (one process). Each process feeds its slice of every seeded global batch
    to its local devices, so single- and multi-process runs see the same data.
    ``on_message`` (one process) is called after every step with what went
    on the wire (`StepMessage`), for observers of a whole run.
    ``on_snapshot(n, state)`` is called after each step n in
    ``snapshot_steps`` with a host (NumPy) copy of the unreplicated
    `TrainState` (the model after n steps, as `fit(steps=n)` would return
    it), for curves over training from one run; evaluate it after `fit`
    returns.
    """
    optimizer = optimizer or optax.sgd(0.05, momentum=0.9)
    n_global = len(devices) if devices else jax.device_count()
    n_local = len(devices) if devices else jax.local_device_count()
    per_device = _check_fit_args(steps, global_batch, n_global, len(x_train))
    state = init_state(model, optimizer, compressor, image_shape or x_train.shape[1:], seed)
    wire = step_wire_cost(model, compressor, state, step=max(steps - 1, 0))  # the last step's: after any warm-up
    step_fn = make_step(model, optimizer, compressor, return_message=on_message is not None)
    if use_shard_map:
        run = shard_map_step(step_fn, Mesh(np.array(devices or jax.devices()), (AXIS,)))
    else:
        run = pmap_step(step_fn, devices=devices)
    lo = jax.process_index() * n_local * per_device
    stream = _index_stream(np.arange(len(x_train)), global_batch, seed)
    fed: list[np.ndarray] = []  # the indices of the batch being fed, for on_message

    def batch():
        idx = next(stream)[lo : lo + n_local * per_device]
        fed[:] = [idx]
        return shard_batch(x_train[idx], y_train[idx], n_local)

    if on_message is not None:
        if jax.process_count() > 1:
            raise ValueError("on_message observes one process's workers: run it in a single process.")
        step_with_message, steps_done = run, [0]

        def run(state, images, labels):
            before = jax.device_get(unreplicate({"params": state.params, "batch_stats": state.batch_stats}))
            state, metrics, message = step_with_message(state, images, labels)
            on_message(StepMessage(steps_done[0], before, message, fed[0].reshape(n_local, per_device)))
            steps_done[0] += 1
            return state, metrics

    def unreplicated(state) -> TrainState:
        return TrainState(
            unreplicate(state.params), unreplicate(state.batch_stats), unreplicate(state.opt_state), state.comp_state
        )

    state, history, seconds = _run_steps(
        run,
        replicate(state, n_local),
        batch,
        steps=steps,
        log_every=log_every,
        progress=progress,
        words_through=_words_through(model, compressor, state),
        on_step=_snapshot_hook(snapshot_steps, on_snapshot, unreplicated, steps),
    )
    return FitResult(unreplicated(state), history, wire, seconds)


def _snapshot_hook(snapshot_steps, on_snapshot, convert: Callable, steps: int):
    """`_run_steps`' on_step that calls ``on_snapshot(n, convert(state))`` at the steps asked for (checked)."""
    wanted = sorted({int(n) for n in snapshot_steps})
    if wanted and on_snapshot is None:
        raise ValueError("snapshot_steps were given without on_snapshot.")
    if wanted and not 1 <= wanted[0] <= wanted[-1] <= steps:
        raise ValueError(f"snapshot_steps must lie in [1, steps={steps}], got {wanted}.")
    if not wanted:
        return None

    def hook(n: int, state) -> None:
        if n in wanted:
            # Host copies: device work the callback would start between steps (an evaluation on device 0, say)
            # can leave simulated CPU devices waiting in the next step's all-reduce past XLA's rendezvous timeout.
            on_snapshot(n, jax.device_get(convert(state)))

    return hook


def fit_many(
    model: nn.Module,
    compressor: compress_lib.Compressor,
    x_train: np.ndarray,
    y_train: np.ndarray,
    masks: np.ndarray,
    seeds,
    *,
    steps: int,
    global_batch: int,
    optimizer: optax.GradientTransformation | None = None,
    log_every: int = 50,
    progress: bool = False,
    snapshot_steps=(),
    on_snapshot: Callable[[int, list[TrainState]], None] | None = None,
) -> list[TrainState]:
    """Trains K models at once, model k on ``x_train[masks[k]]`` with seed ``seeds[k]``, as `fit` trains one.

    The per-worker step is vmapped over a leading model axis inside the
    pmapped step, so each model is still trained data-parallel with the
    compressor over all devices (its collectives run over the device axis),
    and K models share every compiled program. With ``conv_impl='patches'``
    the per-model convolutions become batched matmuls. Returns K unreplicated
    states (params, batch_stats, opt_state; comp_state stacked per device).
    ``snapshot_steps`` / ``on_snapshot`` as in `fit`, with the K states.
    """
    masks = np.asarray(masks, bool)
    k = len(masks)
    if k < 1 or len(seeds) != k:
        raise ValueError(f"fit_many needs one seed per mask, got {len(seeds)} seeds for {k} masks.")
    optimizer = optimizer or optax.sgd(0.05, momentum=0.9)
    n_local = jax.local_device_count()
    per_device = _check_fit_args(steps, global_batch, jax.device_count(), int(masks.sum(1).min()))
    states = [init_state(model, optimizer, compressor, x_train.shape[1:], int(s)) for s in seeds]
    words_through = _words_through(model, compressor, states[0])
    state = replicate(jax.tree.map(lambda *xs: jnp.stack(xs), *states), n_local)
    run = pmap_step(jax.vmap(make_step(model, optimizer, compressor)))
    lo = jax.process_index() * n_local * per_device
    streams = [_index_stream(np.flatnonzero(m), global_batch, int(s)) for m, s in zip(masks, seeds, strict=True)]

    def batch():
        shards = [
            shard_batch(x_train[idx], y_train[idx], n_local)
            for idx in (next(s)[lo : lo + n_local * per_device] for s in streams)
        ]
        return np.stack([s[0] for s in shards], 1), np.stack([s[1] for s in shards], 1)

    def per_model(state) -> list[TrainState]:
        first = unreplicate(state)

        def model_state(j: int) -> TrainState:
            def pick(a):
                return a[j]

            return TrainState(
                jax.tree.map(pick, first.params),
                jax.tree.map(pick, first.batch_stats),
                jax.tree.map(pick, first.opt_state),
                jax.tree.map(lambda a: a[:, j], state.comp_state),
            )

        return [model_state(j) for j in range(k)]

    state, _, _ = _run_steps(
        run,
        state,
        batch,
        steps=steps,
        log_every=log_every,
        progress=progress,
        words_through=words_through,
        on_step=_snapshot_hook(snapshot_steps, on_snapshot, per_model, steps),
    )
    return per_model(state)


def eval_model(model: nn.Module) -> nn.Module:
    """The form of `model` to run inference with (`models.for_inference`: native convolutions)."""
    return models_lib.for_inference(model)


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(model: nn.Module, variables, images):
    return model.apply(variables, images, train=False)


def predict_logits(model: nn.Module, params, batch_stats, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Eval-mode logits (BatchNorm on running averages), in batches on one device, with `eval_model(model)`."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    run = eval_model(model)
    if not len(images):
        return np.zeros((0,))
    return np.concatenate(
        [
            np.asarray(_eval_logits(run, variables, images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
    )


def evaluate(model, params, batch_stats, images, labels, batch_size: int = 500) -> dict:
    logits = predict_logits(model, params, batch_stats, images, batch_size)
    loss = float(np.mean(np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))))
    return {"accuracy": float(np.mean(logits.argmax(-1) == labels)), "loss": loss}
