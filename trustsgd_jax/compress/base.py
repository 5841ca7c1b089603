"""The `Compressor` container, its state, the building blocks every compressor shares, and `none`.

A compressor is a `Compressor` of pure functions (``init``, ``reduce``,
``decompress``); its per-worker state is a `CompressorState`. The public
helpers below are what the compressor files (`sparse`, `quantize`,
`low_rank`) are written with:

* collectives against an ``axis_name`` that may be ``None`` (one worker):
  `psum`, `psum_many`, `all_gather`, `num_workers`, `worker_index`;
* shard_map's varying/invariant typing: `varying_axes`, `make_varying`;
* state: `new_state`, `with_memory` (error feedback);
* `guarded`, which wraps a compressor's core step with the tree check and
  the NaN/Inf guard (a bad gradient on any worker skips the step everywhere).

`wire_cost` and `training_words` count what a compressor sends, from the
shapes of its messages.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from trustsgd_jax.compress.messages import (
    Dense,
    DenseThenLowRank,
    PyTree,
    WireCost,
    decompress,
    is_message,
    message_cost,
)

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


def new_state(params, memory: bool, extra=None) -> CompressorState:
    """A fresh `CompressorState` for `params`: step 0, zero error memory if `memory`, and `extra` as given.

    Records the tree structure and shapes so that `guarded` can refuse a gradient of another model.
    """
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


# --------------------------------------------------------------------------
# Collectives. axis_name=None means one worker, so library users and tests can
# call reduce outside pmap.
# --------------------------------------------------------------------------


def psum(x, axis_name):
    """``lax.psum`` over `axis_name`; `x` itself for one worker (``axis_name=None``)."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def num_workers(axis_name) -> int:
    """The number of workers along `axis_name` (1 for ``None``)."""
    return 1 if axis_name is None else jax.lax.psum(1, axis_name)


def all_gather(x, axis_name):
    """Every worker's `x` stacked on a new leading axis (``x[None]`` for one worker)."""
    return x[None] if axis_name is None else jax.lax.all_gather(x, axis_name)


def worker_index(axis_name):
    """This worker's index along `axis_name` (0 for ``None``)."""
    return 0 if axis_name is None else jax.lax.axis_index(axis_name)


def varying_axes(x) -> frozenset:
    """The manual mesh axes `x` varies over inside ``jax.shard_map`` with type checks on (empty elsewhere)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def make_varying(tree, axes: frozenset):
    """Marks every leaf of `tree` as varying over `axes` (shard_map's type system; a no-op under pmap).

    ``lax.cond`` under ``shard_map`` needs both branches to return the same
    varying/invariant types; per-worker outputs are varying by meaning.
    """
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def psum_many(arrays: list, axis_name) -> list:
    """One all-reduce for a list of arrays (concatenated), as DDP's buckets do."""
    if not arrays:
        return []
    flat = psum(jnp.concatenate([a.reshape(-1) for a in arrays]), axis_name)
    out, offset = [], 0
    for a in arrays:
        out.append(flat[offset : offset + a.size].reshape(a.shape))
        offset += a.size
    return out


# --------------------------------------------------------------------------
# The guard every compressor's reduce runs in, and error feedback.
# --------------------------------------------------------------------------


def guarded(name: str, core: Callable) -> Callable:
    """Wraps a compressor's core step with tree checks and the NaN/Inf guard.

    ``core(grads, state, axis_name) -> (avg, new_state, msg)`` sees finite
    gradients only. A NaN/Inf on any worker makes every worker skip the step:
    ``avg`` is zero, ``memory`` and ``extra`` keep their old values, and
    ``state.nonfinite`` counts the skip instead of ``state.step``.
    """

    def reduce(grads, state: CompressorState, axis_name: str | None = None):
        _check_matches(grads, state, name)
        local_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        all_ok = psum(jnp.logical_not(local_ok).astype(jnp.int32), axis_name) == 0
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


def with_memory(grads, state) -> list:
    """The gradient leaves plus the error-feedback memory (the leaves as they are without memory)."""
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
        n = num_workers(axis_name)
        avg = [s / n for s in psum_many(leaves, axis_name)]
        msg = [Dense(g) for g in leaves]
        return jax.tree.unflatten(treedef, avg), state, jax.tree.unflatten(treedef, msg)

    return Compressor("none", lambda p: new_state(p, memory=False), guarded("none", core), decompress)


# --------------------------------------------------------------------------
# Wire accounting for a compressor.
# --------------------------------------------------------------------------


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
