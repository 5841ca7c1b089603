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
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, PartitionSpec as P

from trustsgd_jax import compress as compress_lib
from trustsgd_jax import data as data_lib

AXIS = "batch"


@struct.dataclass
class TrainState:
    params: Any
    batch_stats: Any  # {} when the model has no BatchNorm
    opt_state: Any
    comp_state: compress_lib.CompressorState


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, compressor: compress_lib.Compressor,
               image_shape, seed: int) -> TrainState:
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(params, variables.get("batch_stats", {}), optimizer.init(params), compressor.init(params))


def sync_bn_words(model: nn.Module, batch_stats) -> int:
    """32-bit words a worker sends per step for synchronised BatchNorm.

    Flax all-reduces each BN layer's batch mean and mean of squares: 2 C words
    per layer, the size of its (mean, var) running statistics. Uncompressed,
    whatever the gradient compressor.
    """
    if getattr(model, "norm", None) != "batch" or getattr(model, "axis_name", None) is None:
        return 0
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(batch_stats))


def step_wire_cost(model, compressor, state: TrainState) -> dict:
    grads = compress_lib.wire_cost(compressor, state.params).words
    bn = sync_bn_words(model, state.batch_stats)
    dense = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state.params))
    return {"grad_words": grads, "bn_words": bn, "words": grads + bn, "bytes": 4 * (grads + bn),
            "uncompressed_words": dense + bn}


def make_step(model: nn.Module, optimizer: optax.GradientTransformation, compressor: compress_lib.Compressor,
              axis_name: str = AXIS, return_message: bool = False) -> Callable:
    """Per-worker train step ``(state, images, labels) -> (state, metrics[, message])``.

    The returned message is what this worker put on the wire: the compressor's
    message and, with synchronised BatchNorm, the local BN statistics it
    contributed (``bn``).
    """

    def step(state: TrainState, images, labels):
        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats", "wire"])
            return cross_entropy(logits, labels).mean(), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
            return new_state, metrics, {"grads": msg, "bn": updates.get("wire", {})}
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


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


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


@dataclasses.dataclass
class FitResult:
    state: TrainState  # unreplicated (device 0) params/batch_stats; per-worker comp_state stays stacked
    history: list[dict]
    wire: dict
    seconds: float


def fit(model: nn.Module, compressor: compress_lib.Compressor, x_train: np.ndarray, y_train: np.ndarray, *,
        steps: int, global_batch: int, optimizer: optax.GradientTransformation | None = None,
        seed: int = 0, log_every: int = 50, progress: bool = True, image_shape=None,
        use_shard_map: bool = False) -> FitResult:
    """Trains `model` with `compressor` on normalised float images over all devices (all processes).

    Each process feeds its slice of every seeded global batch to its local
    devices, so single- and multi-process runs see the same data.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    optimizer = optimizer or optax.sgd(0.05, momentum=0.9)
    n_global, n_local = jax.device_count(), jax.local_device_count()
    per_device = check_batch(global_batch, n_global)
    if global_batch > len(x_train):
        raise ValueError(f"global batch {global_batch} exceeds the {len(x_train)} training images.")
    image_shape = image_shape or x_train.shape[1:]
    state = init_state(model, optimizer, compressor, image_shape, seed)
    wire = step_wire_cost(model, compressor, state)
    state = replicate(state, n_local)
    step_fn = make_step(model, optimizer, compressor)
    if use_shard_map:
        mesh = Mesh(np.array(jax.devices()), (AXIS,))
        run = shard_map_step(step_fn, mesh)
    else:
        run = pmap_step(step_fn)
    lo = jax.process_index() * n_local * per_device
    hi = lo + n_local * per_device
    history, t0, epoch, it = [], time.time(), 0, None
    bar = _progress(steps, progress and jax.process_index() == 0)
    for i in range(steps):
        batch = next(it, None) if it is not None else None
        if batch is None:
            it = data_lib.batches(x_train, y_train, global_batch, seed, epoch)
            epoch += 1
            batch = next(it)
        xb, yb = shard_batch(batch[0][lo:hi], batch[1][lo:hi], n_local)
        state, metrics = run(state, xb, yb)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            m = {k: float(np.asarray(v)[0]) for k, v in metrics.items()}
            if m["nonfinite_steps"] > 0:
                raise FloatingPointError(
                    f"step {i + 1}: a worker's gradient had NaN/Inf ({int(m['nonfinite_steps'])} step(s) skipped; "
                    "error memory kept clean). Lower the learning rate or check the input data."
                )
            m.update(step=i + 1, seconds=time.time() - t0, wire_words=wire["words"] * (i + 1))
            history.append(m)
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.3f}")
        bar.update(1)
    bar.close()
    jax.block_until_ready(state)
    out = TrainState(unreplicate(state.params), unreplicate(state.batch_stats), unreplicate(state.opt_state),
                     state.comp_state)
    return FitResult(out, history, wire, time.time() - t0)


def _progress(total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def predict_logits(model: nn.Module, params, batch_stats, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Eval-mode logits (BatchNorm on running averages), in batches on one device."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    fwd = _eval_fn(model)
    return np.concatenate([np.asarray(fwd(variables, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)]) if len(images) else np.zeros((0,))


_EVAL_CACHE: dict = {}


def _eval_fn(model):
    # Keyed by identity; the model is kept in the value so its id is never reused.
    if id(model) not in _EVAL_CACHE:
        # Inference needs no weight gradients, and the im2col form holds kh*kw
        # copies of every activation (ResNet-18 scoring 500 images passed 24 GB
        # and was OOM-killed); the native form is the same model.
        run = model.clone(conv_impl="xla") if getattr(model, "conv_impl", None) == "patches" else model
        _EVAL_CACHE[id(model)] = (model, jax.jit(lambda v, x: run.apply(v, x, train=False)))
    return _EVAL_CACHE[id(model)][1]


def evaluate(model, params, batch_stats, images, labels, batch_size: int = 500) -> dict:
    logits = predict_logits(model, params, batch_stats, images, batch_size)
    loss = float(np.mean(np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))))
    return {"accuracy": float(np.mean(logits.argmax(-1) == labels)), "loss": loss}


def fit_many(model: nn.Module, compressor: compress_lib.Compressor, x_train: np.ndarray, y_train: np.ndarray,
             masks: np.ndarray, seeds, *, steps: int, global_batch: int,
             optimizer: optax.GradientTransformation | None = None, progress: bool = False) -> list[TrainState]:
    """Trains K models at once, model k on ``x_train[masks[k]]`` with seed ``seeds[k]``.

    The per-worker step is vmapped over a leading model axis inside the
    pmapped step, so each model is still trained data-parallel with the
    compressor over all devices (its collectives run over the device axis),
    and K models share every compiled program. With ``conv_impl='patches'``
    the per-model convolutions become batched matmuls. Returns K unreplicated
    states (params, batch_stats, opt_state; comp_state stacked per device).
    """
    masks = np.asarray(masks, bool)
    k = len(masks)
    if k < 1 or len(seeds) != k:
        raise ValueError(f"fit_many needs one seed per mask, got {len(seeds)} seeds for {k} masks.")
    optimizer = optimizer or optax.sgd(0.05, momentum=0.9)
    n_global, n_local = jax.device_count(), jax.local_device_count()
    per_device = check_batch(global_batch, n_global)
    if global_batch > masks.sum(1).min():
        raise ValueError(f"global batch {global_batch} exceeds the smallest training subset ({masks.sum(1).min()}).")
    states = [init_state(model, optimizer, compressor, x_train.shape[1:], int(s)) for s in seeds]
    state = replicate(jax.tree.map(lambda *xs: jnp.stack(xs), *states), n_local)
    run = pmap_step(jax.vmap(make_step(model, optimizer, compressor)))
    subsets = [np.flatnonzero(m) for m in masks]
    lo = jax.process_index() * n_local * per_device
    iters = [None] * k
    epochs = [0] * k
    bar = _progress(steps, progress and jax.process_index() == 0)
    for _ in range(steps):
        xs, ys = [], []
        for j in range(k):
            batch = next(iters[j], None) if iters[j] is not None else None
            if batch is None:
                iters[j] = data_lib.batches(subsets[j], subsets[j], global_batch, int(seeds[j]), epochs[j])
                epochs[j] += 1
                batch = next(iters[j])
            idx = batch[0][lo:lo + n_local * per_device]
            xb, yb = shard_batch(x_train[idx], y_train[idx], n_local)
            xs.append(xb)
            ys.append(yb)
        state, metrics = run(state, np.stack(xs, 1), np.stack(ys, 1))
        bar.update(1)
    bar.close()
    if int(np.asarray(metrics["nonfinite_steps"]).max()) > 0:
        raise FloatingPointError("a worker's gradient had NaN/Inf while training several models; "
                                 "lower the learning rate or check the input data.")
    first = unreplicate(state)
    return [TrainState(jax.tree.map(lambda a: a[j], first.params), jax.tree.map(lambda a: a[j], first.batch_stats),
                       jax.tree.map(lambda a: a[j], first.opt_state),
                       jax.tree.map(lambda a: a[:, j], state.comp_state)) for j in range(k)]
