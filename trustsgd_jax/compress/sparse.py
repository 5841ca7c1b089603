"""Sparsification: Top-K and Random-K, with error feedback."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from trustsgd_jax.compress.base import Compressor, all_gather, guarded, new_state, with_memory
from trustsgd_jax.compress.messages import Sparse, decompress


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
        ps = with_memory(grads, state)
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
        all_vals = all_gather(jnp.concatenate(values), axis_name)
        all_idx = all_gather(jnp.concatenate(indices), axis_name)
        n = all_vals.shape[0]
        avg, offset = [], 0
        for p, kk in zip(ps, ks):
            v, ix = all_vals[:, offset : offset + kk].reshape(-1), all_idx[:, offset : offset + kk].reshape(-1)
            avg.append((jnp.zeros((p.size,), p.dtype).at[ix].add(v) / n).reshape(p.shape))
            offset += kk
        msg = [Sparse(v, ix, tuple(p.shape), indices_on_wire) for v, ix, p in zip(values, indices, ps)]
        new = state.replace(memory=jax.tree.unflatten(treedef, memory) if state.memory is not None else None)
        return jax.tree.unflatten(treedef, avg), new, jax.tree.unflatten(treedef, msg)

    return core


TOPK_SELECTIONS = ("exact", "approx_max_k")


def selection_suffix(selection: str) -> str:
    """What a Top-K compressor's name adds for a non-default selection (``""`` or ``"+approx_max_k"``).

    Shared with `topk_level` (levels.py), whose names carry the same suffix.
    """
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
    name += selection_suffix(selection)
    return Compressor(
        name,
        lambda p: new_state(p, memory=error_feedback),
        guarded(name, _sparse_core("topk", ratio, k, select, indices_on_wire=True)),
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
        lambda p: new_state(p, memory=error_feedback),
        guarded(name, _sparse_core("randomk", ratio, k, select, indices_on_wire=False)),
        decompress,
    )
