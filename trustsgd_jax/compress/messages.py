"""Messages: what one worker puts on the wire, one object per parameter tensor.

Each message type knows the dense gradient it stands for (``dense()``) and
its size in bits (``bits()``), so decompression and wire accounting are
written once, here. The matrix views PowerSGD compresses a tensor as
(`matrix_shape`, `to_matrix`, `from_matrix`) live here too, because
`LowRank` decompresses through them.

chex is used at API boundaries where a shape mismatch would otherwise surface
far from its cause (`from_matrix`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PyTree = Any  # a JAX pytree (nested lists, tuples, dicts, dataclasses of arrays)


# --------------------------------------------------------------------------
# Matrix views (PowerSGD compresses each tensor as a matrix).
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


# --------------------------------------------------------------------------
# Message types.
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


# --------------------------------------------------------------------------
# Walking, decompressing and costing message trees.
# --------------------------------------------------------------------------


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
