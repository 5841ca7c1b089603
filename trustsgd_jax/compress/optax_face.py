"""The optax face: a compressor as the first transformation of an ``optax.chain``, and its state's accessors."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from trustsgd_jax.compress.base import Compressor, CompressorState
from trustsgd_jax.compress.messages import PyTree


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
