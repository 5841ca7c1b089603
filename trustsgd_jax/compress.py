"""Gradient compressors for data-parallel SGD, applied before the collective.

Each constructor returns a `Compressor`, an optax-style NamedTuple of pure
functions::

    c = compress.powersgd(rank=4)        # or topk(ratio=...), none(), ...
    state = c.init(params)               # per-worker: error memory, warm-start Q, step
    avg, state, msg = c.reduce(grads, state, axis_name="batch")  # inside pmap/shard_map
    seen = c.decompress(msg)             # the gradient an observer attributes to this worker
    wire_cost(c, params)                 # 32-bit words / bytes one worker sends per step

``avg`` is the averaged update every worker applies. ``msg`` is what an
honest-but-curious aggregator receives from this worker (plus what it can
compute from all workers' messages, e.g. PowerSGD's orthonormalised P). All
collectives are written against ``axis_name`` (``psum``/``all_gather``), so the
same function runs under ``jax.pmap`` and ``jax.shard_map``; ``axis_name=None``
means a single worker.

Robustness: a gradient with NaN/Inf on *any* worker makes every worker skip
the step: ``avg`` is zero, the error memory and warm-start state are kept as
they were (never poisoned), and ``state.nonfinite`` counts the skipped steps,
so a trainer can stop with a clear error.

The same compressors as an optax transformation (`as_optax`), first in a
chain, for a user's own pmapped or shard_mapped step::

    tx = optax.chain(compress.as_optax(compress.powersgd(4), axis_name="batch"), optax.sgd(0.1))
    updates, opt_state = tx.update(grads, opt_state)   # the compressed all-reduce runs here
    compress.last_message(opt_state)                    # what this worker last sent, for auditing

PowerSGD's dense warm-up (``powersgd(..., start_iter=K)``, PyTorch's
``start_powerSGD_iter``) sends the full gradients for the first K steps;
`DenseThenLowRank` messages record which form travelled, and
`wire_cost(c, params, step=...)` / `training_words` count the dense steps.

chex is used at API boundaries where a shape mismatch would otherwise surface
far from its cause (`from_matrix`); tree mismatches between a gradient and a
compressor state get this module's own error, which names the fix.
"""

from __future__ import annotations

import itertools
import math
import re
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

PyTree = Any

# --------------------------------------------------------------------------
# Messages: what one worker puts on the wire, one object per parameter tensor.
# Each knows the dense gradient it stands for and its size in bits, so
# decompression and wire accounting are written once, here.
# --------------------------------------------------------------------------


@struct.dataclass
class Dense:
    """The tensor itself, 32 bits per entry."""

    value: jax.Array

    def dense(self):
        return self.value

    def bits(self) -> int:
        return 32 * int(np.prod(self.value.shape))


@struct.dataclass
class Sparse:
    """k values at flat indices of a tensor of `shape`.

    ``indices_on_wire=False`` for Random-K, whose indices every party derives
    from the shared seed.
    """

    values: jax.Array  # [k]
    indices: jax.Array  # [k] int32
    shape: tuple = struct.field(pytree_node=False)
    indices_on_wire: bool = struct.field(pytree_node=False, default=True)

    def dense(self):
        size = int(np.prod(self.shape))
        return jnp.zeros((size,), self.values.dtype).at[self.indices].set(self.values).reshape(self.shape)

    def bits(self) -> int:
        k = int(np.prod(self.values.shape))
        return 32 * k * (2 if self.indices_on_wire else 1)


@struct.dataclass
class LowRank:
    """PowerSGD factors of the matrix view M (n x m) of a tensor.

    The worker sends ``p = M Q_prev`` (n x r) and ``q = M^T p_hat`` (m x r);
    ``p_hat`` (orthonormalised sum of all workers' p) and ``q_prev`` (the
    shared Q this round started from: seeded at the first step, the previous
    round's aggregate later) are known to everyone and not counted as this
    worker's traffic. The observer's estimate of this worker's gradient is
    ``p_hat q^T``.
    """

    p: jax.Array
    q: jax.Array
    p_hat: jax.Array
    q_prev: jax.Array
    shape: tuple = struct.field(pytree_node=False)

    def dense(self):
        return from_matrix(self.p_hat @ self.q.T, self.shape)

    def bits(self) -> int:
        return 32 * (int(np.prod(self.p.shape)) + int(np.prod(self.q.shape)))


@struct.dataclass
class Quantized:
    """QSGD: one norm and, per entry, a sign and a level in {0..s}."""

    norm: jax.Array  # []
    levels: jax.Array  # int32, signed level in [-s, s]
    num_levels: int = struct.field(pytree_node=False)

    def dense(self):
        return self.norm * self.levels.astype(jnp.float32) / self.num_levels

    def bits(self) -> int:
        per_entry = 1 + math.ceil(math.log2(self.num_levels + 1))
        return 32 + per_entry * int(np.prod(self.levels.shape))


@struct.dataclass
class Signs:
    """Scaled sign (EF-SignSGD): one scale and one bit per entry."""

    scale: jax.Array  # []
    signs: jax.Array  # int8 in {-1, +1}

    def dense(self):
        return self.scale * self.signs.astype(jnp.float32)

    def bits(self) -> int:
        return 32 + int(np.prod(self.signs.shape))


def _is_abstract(x) -> bool:
    return isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))


@struct.dataclass
class DenseThenLowRank:
    """A tensor PowerSGD compresses after a dense warm-up (``powersgd(start_iter=K)``).

    PyTorch's ``powerSGD_hook`` all-reduces the full gradient for the first
    ``start_powerSGD_iter`` steps and sends the factors afterwards. The step
    runs under jit with a traced step counter, so the message has one pytree
    structure at every step: it holds both forms and a flag saying which one
    travelled.

    * ``compressed == False`` (steps before ``start_iter``): ``full`` is the
      worker's gradient, sent in full; every array of ``low_rank`` is zero.
    * ``compressed == True``: ``low_rank`` holds the factors that were sent
      (`LowRank`); ``full`` is zero.

    The half that did not travel is zeros, so the message never holds more
    than was sent. ``dense()`` is what an observer reconstructs from what was
    sent at that step, and ``bits(step)`` counts the half that travelled.
    `as_sent` swaps each one for its travelling `Dense` or `LowRank`.
    """

    full: Dense
    low_rank: LowRank
    compressed: jax.Array  # bool []
    start_iter: int = struct.field(pytree_node=False)

    def is_compressed(self, step: int | None = None) -> bool:
        """Whether the factors travelled: the concrete flag, or ``step >= start_iter`` for an abstract message.

        With a concrete message, a given ``step`` must agree with the flag.
        """
        if _is_abstract(self.compressed):
            if step is None:
                raise ValueError(
                    "this DenseThenLowRank message is abstract (traced or from eval_shape), so which form "
                    "it sent is unknown: pass step= (e.g. message_cost(msg, step=s))."
                )
            return step >= self.start_iter
        value = np.asarray(self.compressed)
        if value.shape != ():
            raise ValueError(
                f"this message is stacked over {value.shape} workers: select one first with "
                "compress.worker_message(msg, w)."
            )
        flag = bool(value)
        if step is not None and flag != (step >= self.start_iter):
            raise ValueError(
                f"step={step} contradicts the message: it was sent "
                f"{'compressed' if flag else 'dense'} and start_iter is {self.start_iter}."
            )
        return flag

    def dense(self):
        return jnp.where(self.compressed, self.low_rank.dense(), self.full.dense())

    def bits(self, step: int | None = None) -> int:
        return self.low_rank.bits() if self.is_compressed(step) else self.full.bits()


MESSAGE_TYPES = (Dense, Sparse, LowRank, Quantized, Signs, DenseThenLowRank)


def is_message(x) -> bool:
    """Whether `x` is one tensor's message (one of `MESSAGE_TYPES`).

    Messages are pytrees themselves; pass this as ``is_leaf`` to walk a
    message tree tensor by tensor::

        for m in jax.tree.leaves(msg, is_leaf=compress.is_message): ...
    """
    return isinstance(x, MESSAGE_TYPES)


def as_sent(msg: PyTree) -> PyTree:
    """The message with each `DenseThenLowRank` replaced by the form that travelled.

    That is its `Dense` during PowerSGD's warm-up and its `LowRank` after, so
    code that dispatches on message types sees only the basic types. Needs a
    concrete single-worker message (`worker_message` first for pmap output).
    """

    def pick(m):
        if isinstance(m, DenseThenLowRank):
            return m.low_rank if m.is_compressed() else m.full
        return m

    return jax.tree.map(pick, msg, is_leaf=is_message)


def decompress(msg: PyTree) -> PyTree:
    """The gradient-shaped pytree an observer reconstructs from one worker's message.

    Takes a single worker's message; out of ``pmap`` (stacked over devices)
    select one first with `worker_message`.
    """
    return jax.tree.map(lambda m: m.dense(), msg, is_leaf=is_message)


def worker_message(stacked_msg: PyTree, worker: int) -> PyTree:
    """Worker `worker`'s message out of a message stacked over devices (pmap output)."""
    return jax.tree.map(lambda x: x[worker], stacked_msg)


class WireCost(NamedTuple):
    words: int  # 32-bit words, each tensor's message rounded up to whole words
    bytes: int


def message_cost(msg: PyTree, step: int | None = None) -> WireCost:
    """Words and bytes one worker's message put on the wire.

    Sizes come from shapes, so abstract messages (``jax.eval_shape``) work
    too. A `DenseThenLowRank` (PowerSGD with ``start_iter``) counts the form
    that travelled: read from its flag when the message is concrete, from
    ``step`` (the step it was sent at) when it is abstract.
    """
    words = 0
    for m in jax.tree.leaves(msg, is_leaf=is_message):
        bits = m.bits(step) if isinstance(m, DenseThenLowRank) else m.bits()
        words += -(-bits // 32)
    return WireCost(words=words, bytes=4 * words)


# --------------------------------------------------------------------------
# Compressor container and shared state.
# --------------------------------------------------------------------------


@struct.dataclass
class CompressorState:
    step: jax.Array  # int32, steps taken (drives warm start / shared randomness)
    nonfinite: jax.Array  # int32, steps skipped because a gradient was NaN/Inf
    memory: PyTree  # error-feedback memory (params-shaped) or None
    extra: PyTree  # compressor-specific (PowerSGD: warm-start Q per tensor) or None
    treedef: Any = struct.field(pytree_node=False)
    shapes: tuple = struct.field(pytree_node=False)


class Compressor(NamedTuple):
    name: str
    init: Callable[[PyTree], CompressorState]
    reduce: Callable[..., tuple[PyTree, CompressorState, PyTree]]
    decompress: Callable[[PyTree], PyTree]


def _new_state(params, memory: bool, extra=None) -> CompressorState:
    leaves, treedef = jax.tree.flatten(params)
    return CompressorState(
        step=jnp.zeros((), jnp.int32),
        nonfinite=jnp.zeros((), jnp.int32),
        memory=jax.tree.map(jnp.zeros_like, params) if memory else None,
        extra=extra,
        treedef=treedef,
        shapes=tuple(tuple(np.shape(x)) for x in leaves),
    )


def _check_matches(grads, state: CompressorState, name: str) -> None:
    if not isinstance(state, CompressorState):
        raise TypeError(f"{name}: state must come from the compressor's init(params), got {type(state).__name__}.")
    leaves, treedef = jax.tree.flatten(grads)
    shapes = tuple(tuple(np.shape(x)) for x in leaves)
    if treedef != state.treedef or shapes != state.shapes:
        raise ValueError(
            f"{name}: the gradient tree does not match the tree the state was built for "
            f"(init(params) with another model?). gradient: {treedef} {shapes[:4]}...; "
            f"state: {state.treedef} {state.shapes[:4]}... Call init() on the params you train."
        )


# Collectives. axis_name=None means one worker, so library users and tests can
# call reduce outside pmap.
def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _num_workers(axis_name) -> int:
    return 1 if axis_name is None else jax.lax.psum(1, axis_name)


def _all_gather(x, axis_name):
    return x[None] if axis_name is None else jax.lax.all_gather(x, axis_name)


def _worker_index(axis_name):
    return 0 if axis_name is None else jax.lax.axis_index(axis_name)


def _varying_axes(x) -> frozenset:
    """The manual mesh axes `x` varies over inside ``jax.shard_map`` with type checks on (empty elsewhere)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def _make_varying(tree, axes: frozenset):
    """Marks every leaf of `tree` as varying over `axes` (shard_map's type system; a no-op under pmap).

    ``lax.cond`` under ``shard_map`` needs both branches to return the same
    varying/invariant types; per-worker outputs are varying by meaning.
    """
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - _varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _psum_many(arrays: list, axis_name) -> list:
    """One all-reduce for a list of arrays (concatenated), as DDP's buckets do."""
    if not arrays:
        return []
    flat = _psum(jnp.concatenate([a.reshape(-1) for a in arrays]), axis_name)
    out, offset = [], 0
    for a in arrays:
        out.append(flat[offset : offset + a.size].reshape(a.shape))
        offset += a.size
    return out


def _guarded(name: str, core: Callable) -> Callable:
    """Wraps a compressor's core step with tree checks and the NaN/Inf guard."""

    def reduce(grads, state: CompressorState, axis_name: str | None = None):
        _check_matches(grads, state, name)
        local_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        all_ok = _psum(jnp.logical_not(local_ok).astype(jnp.int32), axis_name) == 0
        # Zeros in place of bad values keep the (discarded) arithmetic finite.
        safe = jax.tree.map(lambda g: jnp.where(all_ok, g, jnp.zeros_like(g)), grads)
        avg, new_state, msg = core(safe, state, axis_name)
        keep = lambda new, old: jnp.where(all_ok, new, old)
        new_state = new_state.replace(
            memory=jax.tree.map(keep, new_state.memory, state.memory),
            extra=jax.tree.map(keep, new_state.extra, state.extra),
            step=state.step + all_ok.astype(jnp.int32),
            nonfinite=state.nonfinite + (1 - all_ok.astype(jnp.int32)),
        )
        avg = jax.tree.map(lambda a: jnp.where(all_ok, a, jnp.zeros_like(a)), avg)
        return avg, new_state, msg

    return reduce


def _with_memory(grads, state):
    if state.memory is None:
        return jax.tree.leaves(grads)
    return [g + m for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(state.memory))]


# --------------------------------------------------------------------------
# No compression.
# --------------------------------------------------------------------------


def none() -> Compressor:
    """Plain data-parallel SGD: the mean of the workers' gradients (one ``psum``)."""

    def core(grads, state, axis_name):
        leaves, treedef = jax.tree.flatten(grads)
        n = _num_workers(axis_name)
        avg = [s / n for s in _psum_many(leaves, axis_name)]
        msg = [Dense(g) for g in leaves]
        return treedef.unflatten(avg), state, treedef.unflatten(msg)

    return Compressor("none", lambda p: _new_state(p, memory=False), _guarded("none", core), decompress)


# --------------------------------------------------------------------------
# Sparsification: Top-K and Random-K.
# --------------------------------------------------------------------------


def _k_tree(name, ratio, k, shapes):
    if (ratio is None) == (k is None):
        raise ValueError(f"{name}: give exactly one of ratio= or k=.")
    sizes = [int(np.prod(s)) for s in shapes]
    if ratio is not None:
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ValueError(f"{name}: ratio must be in (0, 1], got {ratio!r}.")
        return [min(n, max(1, math.ceil(ratio * n - 1e-9))) for n in sizes]
    ks = list(k) if isinstance(k, (list, tuple)) else [k] * len(sizes)
    if len(ks) != len(sizes):
        raise ValueError(f"{name}: k has {len(ks)} entries for {len(sizes)} tensors.")
    for kk in ks:
        if not isinstance(kk, (int, np.integer)) or kk < 1:
            raise ValueError(f"{name}: k must be a positive integer per tensor, got {kk!r}.")
    return [min(int(kk), n) for kk, n in zip(ks, sizes)]


def _check_ratio_arg(name, ratio, k):
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"{name}: ratio must be in (0, 1], got {ratio!r}.")
    if ratio is None and k is None:
        raise ValueError(f"{name}: give ratio= (fraction of entries per tensor) or k=.")


def _sparse_core(name, ratio, k, select, indices_on_wire: bool):
    """Shared body of Top-K and Random-K; `select(p_flat, k, leaf_idx, state, axis_name)` -> indices.

    ``indices_on_wire``: whether the worker sends its indices (Top-K) or every
    party derives them from shared randomness (Random-K).
    """

    def core(grads, state, axis_name):
        treedef = jax.tree.structure(grads)
        ks = _k_tree(name, ratio, k, state.shapes)
        ps = _with_memory(grads, state)
        values, indices, memory = [], [], []
        for i, (p, kk) in enumerate(zip(ps, ks)):
            flat = p.reshape(-1)
            idx = select(flat, kk, i, state, axis_name).astype(jnp.int32)
            values.append(flat[idx])
            indices.append(idx)
            # Exactly what was not sent: sent + memory == gradient + old memory.
            memory.append(flat.at[idx].set(0).reshape(p.shape))
        # Top-K is not closed under summation: gather every worker's values
        # and indices (one collective each), then scatter-add and average.
        all_vals = _all_gather(jnp.concatenate(values), axis_name)
        all_idx = _all_gather(jnp.concatenate(indices), axis_name)
        n = all_vals.shape[0]
        avg, offset = [], 0
        for p, kk in zip(ps, ks):
            v, ix = all_vals[:, offset : offset + kk].reshape(-1), all_idx[:, offset : offset + kk].reshape(-1)
            avg.append((jnp.zeros((p.size,), p.dtype).at[ix].add(v) / n).reshape(p.shape))
            offset += kk
        msg = [Sparse(v, ix, tuple(p.shape), indices_on_wire) for v, ix, p in zip(values, indices, ps)]
        new_state = state.replace(memory=treedef.unflatten(memory) if state.memory is not None else None)
        return treedef.unflatten(avg), new_state, treedef.unflatten(msg)

    return core


TOPK_SELECTIONS = ("exact", "approx_max_k")


def _selection_suffix(selection: str) -> str:
    """What a Top-K compressor's name adds for a non-default selection."""
    return "" if selection == "exact" else f"+{selection}"


def topk(
    ratio: float | None = None,
    k: int | list[int] | None = None,
    error_feedback: bool = True,
    selection: str = "exact",
) -> Compressor:
    """Top-K sparsification with error feedback (Stich et al. 2018; Alistarh et al. 2018).

    Per tensor: p = g + e; send the k entries of largest |p| as (value, int32
    index) pairs (2k words); e <- p with those entries zeroed. Aggregation
    all-gathers values and indices, scatter-adds and divides by the number of
    workers. ``ratio`` gives k = ceil(ratio * size) per tensor (at least 1);
    ``k`` is an int for every tensor or a list, one per tensor in tree order.

    ``selection`` picks the k entries: ``"exact"`` (default) is
    ``lax.top_k``, whose ties go to the lowest index; ``"approx_max_k"`` is
    ``lax.approx_max_k`` at ``recall_target=1.0``, a named option because it
    can send other entries: on XLA:CPU it chose the same set as ``"exact"``
    on continuous values and other entries among equal magnitudes (tested),
    and on TPU it is an approximate search by design. Whether it makes the
    ResNet-18 step faster on this CPU is not settled (README,
    ``bench_compress``).
    """
    _check_ratio_arg("topk", ratio, k)
    if selection not in TOPK_SELECTIONS:
        raise ValueError(f"topk: selection must be one of {', '.join(TOPK_SELECTIONS)}, got {selection!r}.")

    def select(flat, kk, i, state, axis_name):
        if selection == "approx_max_k":
            return jax.lax.approx_max_k(jnp.abs(flat), kk, recall_target=1.0)[1]
        return jax.lax.top_k(jnp.abs(flat), kk)[1]

    name = f"topk:{ratio}" if ratio is not None else "topk"
    name += _selection_suffix(selection)
    return Compressor(
        name,
        lambda p: _new_state(p, memory=error_feedback),
        _guarded(name, _sparse_core("topk", ratio, k, select, indices_on_wire=True)),
        decompress,
    )


def randomk(
    ratio: float | None = None, k: int | list[int] | None = None, error_feedback: bool = True, seed: int = 0
) -> Compressor:
    """Random-K sparsification with error feedback (Stich et al. 2018).

    All workers draw the same k coordinates per tensor from (seed, step,
    tensor), so only the k values travel (k words); aggregation is a psum.
    """
    _check_ratio_arg("randomk", ratio, k)

    def select(flat, kk, i, state, axis_name):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.step), i)
        return jax.lax.top_k(jax.random.uniform(key, flat.shape), kk)[1]

    name = f"randomk:{ratio}" if ratio is not None else "randomk"
    return Compressor(
        name,
        lambda p: _new_state(p, memory=error_feedback),
        _guarded(name, _sparse_core("randomk", ratio, k, select, indices_on_wire=False)),
        decompress,
    )


# --------------------------------------------------------------------------
# Quantisation: QSGD and EF-SignSGD.
# --------------------------------------------------------------------------


def _elementwise_compressor(name, error_feedback, encode):
    """Compressors whose messages decode independently per worker and sum (psum of decoded values)."""

    def core(grads, state, axis_name):
        treedef = jax.tree.structure(grads)
        ps = _with_memory(grads, state)
        msgs = [encode(p, i, state, axis_name) for i, p in enumerate(ps)]
        decoded = [m.dense() for m in msgs]
        n = _num_workers(axis_name)
        avg = [s / n for s in _psum_many(decoded, axis_name)]
        memory = [p - d for p, d in zip(ps, decoded)]
        new_state = state.replace(memory=treedef.unflatten(memory) if state.memory is not None else None)
        return treedef.unflatten(avg), new_state, treedef.unflatten(msgs)

    return Compressor(name, lambda p: _new_state(p, memory=error_feedback), _guarded(name, core), decompress)


def qsgd(levels: int = 16, error_feedback: bool = True, seed: int = 0) -> Compressor:
    """QSGD (Alistarh et al. 2017): stochastic rounding of |p|/||p||_2 to `levels` levels.

    Per tensor: send ||p||_2 (32 bits) and per entry sign + level
    (1 + ceil(log2(levels+1)) bits); unbiased. Each worker rounds with its
    own randomness (seed, step, worker, tensor).
    """
    if not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"qsgd: levels must be a positive integer, got {levels!r}.")

    def encode(p, i, state, axis_name):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        key = jax.random.fold_in(jax.random.fold_in(key, _worker_index(axis_name)), i)
        norm = jnp.linalg.norm(p.reshape(-1))
        scaled = jnp.abs(p) / jnp.where(norm > 0, norm, 1.0) * levels
        level = jnp.floor(scaled + jax.random.uniform(key, p.shape))
        return Quantized(norm, (jnp.sign(p) * level).astype(jnp.int32), int(levels))

    return _elementwise_compressor(f"qsgd:{levels}", error_feedback, encode)


def signsgd(error_feedback: bool = True) -> Compressor:
    """Scaled sign compression with error feedback (EF-SignSGD, Karimireddy et al. 2019).

    Per tensor: delta = (||p||_1 / d) sign(p), one 32-bit scale plus d bits.
    """

    def encode(p, i, state, axis_name):
        scale = jnp.mean(jnp.abs(p))
        return Signs(scale, jnp.where(p >= 0, 1, -1).astype(jnp.int8))

    return _elementwise_compressor("signsgd", error_feedback, encode)


# --------------------------------------------------------------------------
# PowerSGD.
# --------------------------------------------------------------------------


def matrix_shape(shape) -> tuple[int, int]:
    """The (n, m) matrix PowerSGD compresses a tensor as.

    PyTorch's hook views a tensor as (shape[0], -1) with its (out, in, kh, kw)
    layout. Flax kernels put the output axis last ((kh, kw, in, out)), so the
    same matrix is (out, kh*kw*in): output features first.
    """
    shape = tuple(shape)
    return shape[-1], int(np.prod(shape[:-1]))


def to_matrix(x: jax.Array) -> jax.Array:
    """A tensor as the (n, m) matrix PowerSGD compresses (`matrix_shape`): output features first.

    Flax keeps the output axis last, so the last axis becomes the rows and the
    others, in order, the columns. `from_matrix` inverts it.
    """
    if np.ndim(x) < 1:
        raise ValueError(f"to_matrix: needs a tensor with at least one axis, got shape {np.shape(x)}.")
    return jnp.moveaxis(x, -1, 0).reshape(x.shape[-1], -1)


def from_matrix(m: jax.Array, shape) -> jax.Array:
    """The tensor of `shape` whose `to_matrix` view is `m` (checked: m must be `matrix_shape(shape)`)."""
    shape = tuple(shape)
    chex.assert_shape(m, matrix_shape(shape))
    return jnp.moveaxis(m.reshape((shape[-1], *shape[:-1])), 0, -1)


def _t_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T b, with the transpose in the product's dimension numbers (no transposed copy of a)."""
    return jnp.einsum("kn,kr->nr", a, b)


def _matmul_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """a b^T, with the transpose in the product's dimension numbers (no transposed copy of b)."""
    return jnp.einsum("mr,nr->mn", a, b)


def powersgd_plan(shapes, rank: int, min_compression_rate: float = 2) -> list[int]:
    """Per tensor, the rank it is compressed with, or 0 where it is sent in full.

    As PyTorch's ``powerSGD_hook``: tensors of ndim <= 1 are sent in full; the
    rank is min(rank, n, m); a matrix is compressed only where
    (n + m) * r * min_compression_rate < n * m.
    """
    plan = []
    for s in shapes:
        if len(s) <= 1:
            plan.append(0)
            continue
        n, m = matrix_shape(s)
        r = min(rank, n, m)
        plan.append(r if (n + m) * r * min_compression_rate < n * m else 0)
    return plan


# A column whose remainder after Gram-Schmidt is below this fraction of its norm lies in the previous columns'
# span up to float32 rounding (residue ~1e-7 of the column), and becomes a zero column.
DEPENDENT_RESIDUE = 1e-5


def orthonormal_columns(a: jax.Array) -> jax.Array:
    """Orthonormal columns spanning those of a [..., n, r] (r <= n), by Gram-Schmidt with reorthogonalisation.

    Column j is a_j minus its projection on columns 0..j-1, projected out
    twice ("twice is enough": Giraud et al. 2005, classical Gram-Schmidt
    then orthogonal to working precision), then normalised; a column with
    nothing left (a_j in the span of the previous ones up to rounding,
    `DEPENDENT_RESIDUE`) is zero, so Q Q^T stays the projector on the span.
    The span, and Q Q^T, are those of the QR factor Q; column signs may
    differ from LAPACK's (here R has a positive diagonal), which changes no
    product P_hat Q^T. Batched over leading axes.

    Not `jnp.linalg.qr`: on CPU, jaxlib 0.10.2's LAPACK kernels split a batch
    over XLA's intra-op thread pool and block waiting for the parts, so when
    as many independent batched calls as the pool has threads run at once,
    every thread waits and the program deadlocks (seen here: a batched
    attack at width 8 on 2 cores stopped at 0% CPU, both pool threads in
    ``QrFactorization`` under ``ParallelBatchMap``). This is plain XLA:
    matrix-vector products, r steps of ``lax.scan``.
    """
    *batch, n, r = a.shape
    hi = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: orthogonality to fp32 precision

    def one(m):
        def column(q, j):
            v = jax.lax.dynamic_index_in_dim(m, j, axis=1, keepdims=False)
            before = jnp.sqrt(jnp.sum(jnp.square(v)))
            for _ in range(2):
                v = v - jnp.matmul(q, jnp.matmul(q.T, v, precision=hi), precision=hi)
            norm = jnp.sqrt(jnp.sum(jnp.square(v)))
            # What is left of a column in the span of the previous ones is float residue: normalised, it would be
            # a column not orthogonal to them (Q Q^T no projector). Below DEPENDENT_RESIDUE of the column, drop it.
            kept = norm > DEPENDENT_RESIDUE * before
            v = jnp.where(kept, v / jnp.where(kept, norm, 1.0), 0.0)
            return jax.lax.dynamic_update_index_in_dim(q, v, j, axis=1), None

        return jax.lax.scan(column, jnp.zeros_like(m), jnp.arange(r))[0]

    return jax.vmap(one)(a.reshape(-1, n, r)).reshape(*batch, n, r)


def _orthonormalise_many(mats: dict) -> dict:
    """`orthonormal_columns` of every matrix, batched per shape (ResNet-18 has 11 compressed shapes for 21
    matrices)."""
    by_shape: dict[tuple, list] = {}
    for i, m in mats.items():
        by_shape.setdefault(tuple(m.shape), []).append(i)
    out = {}
    for ids in by_shape.values():
        q = orthonormal_columns(jnp.stack([mats[i] for i in ids]))
        out.update({i: q[j] for j, i in enumerate(ids)})
    return out


def powersgd(
    rank: int = 4,
    error_feedback: bool = True,
    warm_start: bool = True,
    min_compression_rate: float = 2,
    seed: int = 0,
    start_iter: int = 0,
) -> Compressor:
    """PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019, Algorithm 1), PyTorch-hook semantics.

    Per tensor with matrix view M_w (n x m) on worker w (`matrix_shape`), with
    error feedback M_w <- M_w + e_w, and Q (m x r) shared by all workers::

        P_w = M_w Q;            P = sum_w P_w           (all-reduce)
        P_hat = orthonormalise(P)                       (Gram-Schmidt)
        Q_w = M_w^T P_hat;      Q = (1/W) sum_w Q_w     (all-reduce)
        update = P_hat Q^T;     e_w = M_w - P_hat Q^T;  Q kept for the warm start

    Tensors that `powersgd_plan` leaves uncompressed are averaged in full and,
    as in PyTorch's hook, their error memory is the local value minus the
    average (zero on average over workers). The first Q (and every Q when
    ``warm_start=False``) is drawn from ``seed`` (and the step), identical on
    all workers. Message per compressed tensor: P_w and Q_w, (n + m) r words.
    PyTorch orthonormalises with QR (Gram-Schmidt when its epsilon is set):
    the same span; this uses Gram-Schmidt, `orthonormal_columns`.

    ``start_iter=K`` is PyTorch's ``start_powerSGD_iter``: for the first K
    steps every worker sends its full gradient and all workers apply the exact
    mean (one all-reduce, as `none`), with the error memory and the warm-start
    Q left untouched; PowerSGD runs from step K on, starting from that
    untouched state. Steps are counted by ``state.step``, which a step skipped
    for a NaN/Inf gradient does not advance. The phase is chosen on the traced
    step counter with ``lax.cond``; the counter is the same on every worker, so
    all workers run the same collectives. Compressed tensors then travel as
    `DenseThenLowRank` messages (one structure at every step; see there), and
    `wire_cost` needs ``step=`` (`training_words` sums a whole run).
    ``start_iter=0`` compresses from the first step and sends plain `LowRank`
    messages. PyTorch requires K > 1 with error feedback or warm start, because
    DDP rebuilds its gradient buckets after the first iteration; nothing here
    is rebuilt, so any K >= 0 is accepted. `powersgd_pytorch` gives the hook's
    defaults.
    """
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"powersgd: rank must be an integer >= 1, got {rank!r}.")
    if min_compression_rate <= 0:
        raise ValueError(f"powersgd: min_compression_rate must be > 0, got {min_compression_rate!r}.")
    if isinstance(start_iter, bool) or not isinstance(start_iter, (int, np.integer)) or start_iter < 0:
        raise ValueError(
            f"powersgd: start_iter must be an integer >= 0 (the number of uncompressed warm-up steps; "
            f"0 compresses from the first step), got {start_iter!r}."
        )
    start_iter = int(start_iter)

    def initial_q(shape, r, i, step):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), step)
        q = jax.random.normal(key, (matrix_shape(shape)[1], r), jnp.float32)
        return orthonormal_columns(q)

    def init(params):
        shapes = [np.shape(x) for x in jax.tree.leaves(params)]
        plan = powersgd_plan(shapes, rank, min_compression_rate)
        qs = [initial_q(s, r, i, 0) if r else None for i, (s, r) in enumerate(zip(shapes, plan))]
        return _new_state(params, memory=error_feedback, extra=qs)

    def compressed_round(grads, state, axis_name):
        """One PowerSGD round: per-tensor update, new error memory, new Q, and the messages."""
        treedef = jax.tree.structure(grads)
        plan = powersgd_plan(state.shapes, rank, min_compression_rate)
        n_workers = _num_workers(axis_name)
        ms = _with_memory(grads, state)
        comp = [i for i, r in enumerate(plan) if r]
        full = [i for i, r in enumerate(plan) if not r]
        if warm_start:
            qs = {i: state.extra[i] for i in comp}
        else:
            qs = {i: initial_q(state.shapes[i], plan[i], i, state.step) for i in comp}
        # M = to_matrix(m) is used as its transpose, the kernel layout K = M^T ([kh*kw*in, out], a free reshape of
        # Flax's kernel), with the transposes inside the products: forming M would copy every gradient once per
        # step and its decompression once more, passes over 11.2M entries per device for ResNet-18. One device's
        # rank-4 reduce there: 0.70 -> 0.61 GB by XLA's count, 68 -> 57 ms (interleaved, 2-core CPU, 2026-12-03).
        kern = {i: ms[i].reshape(-1, ms[i].shape[-1]) for i in comp}
        p_local = {i: _t_matmul(kern[i], qs[i]) for i in comp}  # M Q = K^T Q
        p_sum = dict(zip(comp, _psum_many([p_local[i] for i in comp], axis_name)))
        p_hat = _orthonormalise_many(p_sum)
        q_local = {i: kern[i] @ p_hat[i] for i in comp}  # M^T P_hat = K P_hat
        q_avg = {i: s / n_workers for i, s in zip(comp, _psum_many([q_local[i] for i in comp], axis_name))}
        full_avg = dict(zip(full, [s / n_workers for s in _psum_many([ms[i] for i in full], axis_name)]))

        avg, msg, memory, extra = [], [], [], []
        for i, m in enumerate(ms):
            if plan[i]:
                approx = _matmul_t(q_avg[i], p_hat[i]).reshape(m.shape)  # from_matrix(P_hat Q^T) = (Q P_hat^T) as K
                msg.append(LowRank(p_local[i], q_local[i], p_hat[i], qs[i], tuple(m.shape)))
                extra.append(q_avg[i] if warm_start else state.extra[i])
            else:
                approx = full_avg[i]
                msg.append(Dense(m))
                extra.append(None)
            avg.append(approx)
            memory.append(m - approx)
        memory = treedef.unflatten(memory) if state.memory is not None else None
        return treedef.unflatten(avg), memory, extra, msg

    def warmup_round(grads, state, axis_name):
        """PyTorch's warm-up: the exact mean of the raw gradients; memory and Q untouched."""
        leaves, treedef = jax.tree.flatten(grads)
        plan = powersgd_plan(state.shapes, rank, min_compression_rate)
        n = _num_workers(axis_name)
        avg = [s / n for s in _psum_many(leaves, axis_name)]
        msg = []
        for g, r in zip(leaves, plan):
            if r:
                rows, cols = matrix_shape(g.shape)
                dtype = jnp.result_type(g.dtype, jnp.float32)
                zero = LowRank(
                    jnp.zeros((rows, r), dtype),
                    jnp.zeros((cols, r), dtype),
                    jnp.zeros((rows, r), dtype),
                    jnp.zeros((cols, r), jnp.float32),
                    tuple(g.shape),
                )
                msg.append(DenseThenLowRank(Dense(g), zero, jnp.asarray(False), start_iter))
            else:
                msg.append(Dense(g))
        return treedef.unflatten(avg), state.memory, list(state.extra), msg

    def phased_compressed_round(grads, state, axis_name):
        avg, memory, extra, msg = compressed_round(grads, state, axis_name)
        msg = [
            DenseThenLowRank(Dense(jnp.zeros_like(g)), m, jnp.asarray(True), start_iter)
            if isinstance(m, LowRank)
            else m
            for m, g in zip(msg, jax.tree.leaves(grads))
        ]
        return avg, memory, extra, msg

    def core(grads, state, axis_name):
        treedef = jax.tree.structure(grads)
        if start_iter == 0:
            avg, memory, extra, msg = compressed_round(grads, state, axis_name)
        else:
            # Both phases return the average as all-reduced (invariant) and the
            # rest as per-worker (varying) values, as shard_map's cond requires.
            axes = frozenset().union(*[_varying_axes(x) for x in jax.tree.leaves((grads, state))])

            def phase(round_fn):
                avg, *per_worker = round_fn(grads, state, axis_name)
                return avg, *_make_varying(tuple(per_worker), axes)

            avg, memory, extra, msg = jax.lax.cond(
                state.step < start_iter, lambda: phase(warmup_round), lambda: phase(phased_compressed_round)
            )
        return avg, state.replace(memory=memory, extra=extra), treedef.unflatten(msg)

    name = f"powersgd:{rank}" if start_iter == 0 else f"powersgd:{rank}:start_iter={start_iter}"
    return Compressor(name, init, _guarded(name, core), decompress)


PYTORCH_POWERSGD_DEFAULTS = types.MappingProxyType(
    {"rank": 1, "start_iter": 1000, "min_compression_rate": 2, "warm_start": True, "error_feedback": True}
)
"""The defaults of PyTorch's ``PowerSGDState`` as `powersgd` arguments.

``matrix_approximation_rank=1, start_powerSGD_iter=1_000, min_compression_rate=2,
use_error_feedback=True, warm_start=True`` (torch.distributed.algorithms.
ddp_comm_hooks.powerSGD_hook). Its other fields have no counterpart here:
``orthogonalization_epsilon=0`` (exact orthonormalisation; this uses
reorthogonalised Gram-Schmidt, `orthonormal_columns`),
``random_seed=0`` (the first Q comes from `powersgd`'s ``seed`` through JAX's
PRNG, so the draws differ from torch's), batching of same-shape tensors and
compression-statistics logging.
"""


def powersgd_pytorch(**overrides) -> Compressor:
    """PowerSGD with PyTorch's ``powerSGD_hook`` defaults (`PYTORCH_POWERSGD_DEFAULTS`), any of them overridden."""
    return powersgd(**{**PYTORCH_POWERSGD_DEFAULTS, **overrides})


# --------------------------------------------------------------------------
# The paper's "Top-K SGD level r", specs and accounting.
# --------------------------------------------------------------------------


def powersgd_words(shapes, rank: int, min_compression_rate: float = 2) -> list[int]:
    """Analytic 32-bit words per tensor of a PowerSGD rank-`rank` message."""
    out = []
    for s, r in zip(shapes, powersgd_plan(shapes, rank, min_compression_rate)):
        n, m = matrix_shape(s) if len(s) > 1 else (int(np.prod(s)), 1)
        out.append((n + m) * r if r else int(np.prod(s)))
    return out


def topk_level_k(shapes, rank: int, min_compression_rate: float = 2) -> list[int]:
    """k per tensor for the paper's "Top-K SGD level r".

    Rule: the Top-K message (value + int32 index = 2 words per entry) has the
    same total number of words as PowerSGD rank r on the same model, i.e.
    K = floor(W_r / 2) entries with W_r = sum of `powersgd_words`. K is spread
    over tensors in proportion to their size (one common ratio K / D, floors,
    then the remainder one entry at a time to the largest tensors with room),
    at least 1 and at most the tensor's size each (any overshoot of the
    at-least-one rule is taken back from the largest tensors). The totals
    match exactly unless W_r is odd (one word less), W_r >= 2D (then every
    entry is sent) or there are more tensors than K.
    """
    sizes = np.array([int(np.prod(s)) for s in shapes], np.int64)
    total_k = min(sum(powersgd_words(shapes, rank, min_compression_rate)) // 2, int(sizes.sum()))
    ks = np.clip(np.floor(sizes * total_k / sizes.sum()).astype(np.int64), 1, sizes)
    order = np.argsort(-sizes, kind="stable")
    for i in order:  # the floors may leave entries over: give them to the largest tensors
        if ks.sum() >= total_k:
            break
        ks[i] += min(sizes[i] - ks[i], total_k - ks.sum())
    for i in order:  # the at-least-one rule may overshoot: take back from the largest
        if ks.sum() <= total_k:
            break
        ks[i] -= min(ks[i] - 1, ks.sum() - total_k)
    return [int(k) for k in ks]


def topk_level(
    params: PyTree,
    rank: int,
    error_feedback: bool = True,
    min_compression_rate: float = 2,
    selection: str = "exact",
) -> Compressor:
    """Top-K whose message is as large as PowerSGD rank `rank`'s on `params` (see `topk_level_k`; `topk`'s
    ``selection``)."""
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"topk_level: rank must be an integer >= 1, got {rank!r}.")
    shapes = [np.shape(x) for x in jax.tree.leaves(params)]
    c = topk(k=topk_level_k(shapes, rank, min_compression_rate), error_feedback=error_feedback, selection=selection)
    return c._replace(name=f"topk_level:{rank}{_selection_suffix(selection)}")


SPEC_HELP = (
    "none | powersgd:RANK | topk:RATIO | topk_level:RANK | randomk:RATIO | qsgd:LEVELS | signsgd "
    "(e.g. 'powersgd:4', 'topk:0.01', 'topk_level:4')"
)


class Spec(NamedTuple):
    """A parsed compressor spec: ``kind`` and its argument as written (None where the kind takes none).

    ``str(spec)`` writes it back (``"powersgd:4"``, ``"none"``); `parse_spec`
    is the one parser of the ``"kind:arg"`` strings (flags, records, reports).
    """

    kind: str
    arg: str | None = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"

    @property
    def number(self) -> float:
        """The argument as a number (rank, level, ratio, levels); 0 for kinds without one."""
        return 0.0 if self.arg is None else float(self.arg)


SPEC_KINDS = ("none", "sgd", "signsgd", "powersgd", "topk", "topk_level", "randomk", "qsgd")
_NO_ARG = ("none", "sgd", "signsgd")
_INT_ARG = ("powersgd", "topk_level", "qsgd")


def parse_spec(spec: str) -> Spec:
    """`Spec` of a compressor spec string such as ``powersgd:4``; a one-line ValueError naming `SPEC_HELP` if bad."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*(?::\s*([0-9.eE+-]+))?\s*", spec or "")
    if not m:
        raise ValueError(f"cannot parse compressor spec {spec!r}; expected {SPEC_HELP}.")
    kind, arg = m.group(1), m.group(2)
    if kind not in SPEC_KINDS:
        raise ValueError(f"unknown compressor spec {spec!r}; expected {SPEC_HELP}.")
    if kind in _NO_ARG:
        if arg is not None:
            raise ValueError(f"compressor spec {spec!r} takes no argument; expected {SPEC_HELP}.")
        return Spec(kind)
    if arg is None:
        raise ValueError(f"compressor spec {spec!r} needs an argument; expected {SPEC_HELP}.")
    try:
        (int if kind in _INT_ARG else float)(arg)
    except ValueError:
        raise ValueError(f"bad argument {arg!r} in compressor spec {spec!r}; expected {SPEC_HELP}.") from None
    return Spec(kind, arg)


def from_spec(spec: str | Spec, params: PyTree | None = None, seed: int = 0, start_iter: int = 0) -> Compressor:
    """Builds a compressor from a spec such as ``powersgd:4`` (see ``SPEC_HELP``), a string or a `Spec`.

    ``start_iter`` is `powersgd`'s dense warm-up (PyTorch's
    ``start_powerSGD_iter``); other compressors have none, and a nonzero
    value with them is an error rather than silently ignored.
    """
    kind, arg = parse_spec(str(spec))
    if kind == "powersgd":
        return powersgd(rank=int(arg), seed=seed, start_iter=start_iter)  # type: ignore[arg-type]
    if start_iter != 0:
        raise ValueError(
            f"start_iter={start_iter!r} applies to powersgd specs only (PyTorch's start_powerSGD_iter); "
            f"{str(spec)!r} has no dense warm-up: pass start_iter=0."
        )
    if kind in ("none", "sgd"):
        return none()
    if kind == "signsgd":
        return signsgd()
    if kind == "topk":
        return topk(ratio=float(arg))  # type: ignore[arg-type]
    if kind == "randomk":
        return randomk(ratio=float(arg), seed=seed)  # type: ignore[arg-type]
    if kind == "qsgd":
        return qsgd(levels=int(arg), seed=seed)  # type: ignore[arg-type]
    if params is None:
        raise ValueError("topk_level needs the model's params to size k: from_spec(spec, params).")
    return topk_level(params, rank=int(arg))  # type: ignore[arg-type]


def _abstract_message(c: Compressor, params: PyTree) -> PyTree:
    state = c.init(params)
    return jax.eval_shape(lambda g, s: c.reduce(g, s, None)[2], params, state)


def wire_cost(c: Compressor, params: PyTree, step: int | None = None) -> WireCost:
    """Words/bytes one worker puts on the wire at one step with `c` on `params` (from message shapes).

    Every compressor sends the same size at every step, except PowerSGD with
    a dense warm-up (``start_iter=K``): the full gradient at steps < K, the
    factors from K on. For it ``step`` is required; `training_words` sums a
    run. Other compressors ignore ``step``.
    """
    msg = _abstract_message(c, params)
    if step is None and any(isinstance(m, DenseThenLowRank) for m in jax.tree.leaves(msg, is_leaf=is_message)):
        raise ValueError(
            f"wire_cost: {c.name} sends dense messages for its first steps, so the cost depends on the "
            "step: pass step= (wire_cost(c, params, step=s)) or use training_words(c, params, steps)."
        )
    return message_cost(msg, step=step)


def training_words(c: Compressor, params: PyTree, steps: int) -> int:
    """32-bit words one worker sends over steps 0 .. steps-1 with `c` on `params`, dense warm-up steps included.

    Assumes every step is taken (a step skipped for a NaN/Inf gradient does
    not advance the compressor's step counter, so it shifts the warm-up).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"training_words: steps must be an integer >= 0, got {steps!r}.")
    msg = _abstract_message(c, params)
    switches = {m.start_iter for m in jax.tree.leaves(msg, is_leaf=is_message) if isinstance(m, DenseThenLowRank)}
    bounds = [0, *sorted(k for k in switches if 0 < k < steps), int(steps)]
    return sum((b - a) * message_cost(msg, step=a).words for a, b in itertools.pairwise(bounds) if b > a)


# --------------------------------------------------------------------------
# The optax face.
# --------------------------------------------------------------------------


class CompressionState(NamedTuple):
    """The optax state of `as_optax`.

    ``compressor_state``: the compressor's `CompressorState` (error memory,
    warm-start Q, step, skipped-step count). ``message``: the message this
    worker sent at its last update (all zeros before the first one), or
    ``None`` with ``keep_message=False``.
    """

    compressor_state: CompressorState
    message: PyTree


def as_optax(
    compressor: Compressor, axis_name: str | None = "batch", keep_message: bool = True
) -> optax.GradientTransformationExtraArgs:
    """`compressor` as an optax transformation: the (compressed) all-reduce of the gradients.

    Put it first in an ``optax.chain``; what follows sees the averaged update::

        tx = optax.chain(compress.as_optax(compress.powersgd(4), axis_name="batch"), optax.sgd(0.1))

    ``update(grads, state)`` calls ``compressor.reduce(grads, ..., axis_name)``
    and must run where ``axis_name`` is bound: inside ``jax.pmap(...,
    axis_name=...)`` or ``jax.shard_map`` over a mesh axis of that name
    (``None``: a single worker). ``params`` are used by ``init`` only, to size
    the state; ``update`` ignores them and any extra arguments. Updates are
    those of ``compressor.reduce``, bit for bit.

    The state (`CompressionState`) keeps the compressor's state and, for
    auditing, the message this worker last sent: `last_message` and
    `compressor_state` find them inside a chain's state. Keeping the message
    costs its size in memory (for `none`, a copy of the gradient);
    ``keep_message=False`` keeps ``None`` instead. A step skipped for a
    NaN/Inf gradient gives a zero update here, but transformations later in
    the chain still step (momentum keeps moving): watch
    ``compressor_state(opt_state).nonfinite``.
    """

    def init_fn(params):
        state = compressor.init(params)
        message = None
        if keep_message:  # zeros with the structure every update returns, so the state's structure is fixed
            shapes = jax.eval_shape(lambda p, s: compressor.reduce(p, s, None)[2], params, state)
            message = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        return CompressionState(state, message)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        avg, new_state, message = compressor.reduce(updates, state.compressor_state, axis_name)
        return avg, CompressionState(new_state, message if keep_message else None)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _the_compression_state(opt_state, who: str) -> CompressionState:
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, CompressionState))
        if isinstance(x, CompressionState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"{who}: expected exactly one compress.as_optax state inside the optimizer state, found "
            f"{len(found)}. Pass the state of the chain built with compress.as_optax."
        )
    return found[0]


def last_message(opt_state: PyTree) -> PyTree:
    """The message the `as_optax` transformation inside `opt_state` last sent (any nesting of optax states).

    Out of ``pmap`` the state is stacked over devices, and so is the message:
    take one worker's with `worker_message`, then `decompress` or
    `message_cost` it.
    """
    state = _the_compression_state(opt_state, "last_message")
    if state.message is None:
        raise ValueError(
            "last_message: this transformation was built with keep_message=False; build it with "
            "compress.as_optax(..., keep_message=True) to keep the message."
        )
    return state.message


def compressor_state(opt_state: PyTree) -> CompressorState:
    """The `CompressorState` of the `as_optax` transformation inside `opt_state` (stacked out of ``pmap``)."""
    return _the_compression_state(opt_state, "compressor_state").compressor_state
