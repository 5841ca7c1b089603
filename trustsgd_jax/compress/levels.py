"""Matched message sizes: the paper's "Top-K SGD level r", Top-K as large on the wire as PowerSGD rank r."""

from __future__ import annotations

import jax
import numpy as np

from trustsgd_jax.compress.base import Compressor
from trustsgd_jax.compress.low_rank import powersgd_plan
from trustsgd_jax.compress.messages import PyTree, matrix_shape
from trustsgd_jax.compress.sparse import selection_suffix, topk


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
    return c._replace(name=f"topk_level:{rank}{selection_suffix(selection)}")
