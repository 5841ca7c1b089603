"""PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): low-rank compression by one power-iteration step.

`powersgd` builds the compressor; its step is split into the parts of
Algorithm 1: `_power_step` (P = M Q, all-reduce, orthonormalise, Q = M^T
P_hat, all-reduce), `_compressed_round` (update, error memory, warm-start Q
and messages from those factors), `_warmup_round` (PyTorch's dense warm-up,
``start_iter``) and `_core` (which of the two runs at this step).
`powersgd_plan` says which tensors are compressed and at what rank;
`orthonormal_columns` is the orthonormalisation.
"""

from __future__ import annotations

import functools
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trustsgd_jax.compress.base import (
    Compressor,
    guarded,
    make_varying,
    new_state,
    num_workers,
    psum_many,
    varying_axes,
    with_memory,
)
from trustsgd_jax.compress.messages import Dense, DenseThenLowRank, LowRank, decompress, matrix_shape


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


# --------------------------------------------------------------------------
# The steps of `powersgd`, module-level so that each can be read on its own.
# --------------------------------------------------------------------------


class _Config(NamedTuple):
    """`powersgd`'s arguments, checked; every step below takes it first."""

    rank: int
    error_feedback: bool
    warm_start: bool
    min_compression_rate: float
    seed: int
    start_iter: int


def _initial_q(seed: int, shape, r: int, i: int, step) -> jax.Array:
    """The Q a round starts from when there is no warm start: drawn from (seed, tensor i, step), orthonormal."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), step)
    q = jax.random.normal(key, (matrix_shape(shape)[1], r), jnp.float32)
    return orthonormal_columns(q)


def _init(cfg: _Config, params):
    """`Compressor.init`: a fresh state whose ``extra`` is the first Q per compressed tensor (None for the rest)."""
    shapes = [np.shape(x) for x in jax.tree.leaves(params)]
    plan = powersgd_plan(shapes, cfg.rank, cfg.min_compression_rate)
    qs = [_initial_q(cfg.seed, s, r, i, 0) if r else None for i, (s, r) in enumerate(zip(shapes, plan))]
    return new_state(params, memory=cfg.error_feedback, extra=qs)


class _Factors(NamedTuple):
    """One round's factors, by tensor index: compressed tensors in the first four, the others in ``full_avg``."""

    p_local: dict  # P_w = M_w Q (sent)
    p_hat: dict  # orthonormalise(sum_w P_w) (known to all)
    q_local: dict  # Q_w = M_w^T P_hat (sent)
    q_avg: dict  # (1/W) sum_w Q_w
    full_avg: dict  # the mean of each tensor sent in full


def _power_step(ms: list, qs: dict, full: list, n_workers, axis_name) -> _Factors:
    """The collectives of one round: P = sum_w M_w Q, P_hat = orthonormalise(P), Q = mean_w M_w^T P_hat.

    `ms`: every tensor with its error memory added; `qs`: the Q of each compressed tensor (its keys are the
    compressed tensors); `full`: the indices of the tensors averaged in full.
    """
    comp = list(qs)
    # M = to_matrix(m) is used as its transpose, the kernel layout K = M^T ([kh*kw*in, out], a free reshape of
    # Flax's kernel), with the transposes inside the products: forming M would copy every gradient once per
    # step and its decompression once more, passes over 11.2M entries per device for ResNet-18. One device's
    # rank-4 reduce there: 0.70 -> 0.61 GB by XLA's count, 68 -> 57 ms (interleaved, 2-core CPU, 2026-12-03).
    kern = {i: ms[i].reshape(-1, ms[i].shape[-1]) for i in comp}
    p_local = {i: _t_matmul(kern[i], qs[i]) for i in comp}  # M Q = K^T Q
    p_sum = dict(zip(comp, psum_many([p_local[i] for i in comp], axis_name)))
    p_hat = _orthonormalise_many(p_sum)
    q_local = {i: kern[i] @ p_hat[i] for i in comp}  # M^T P_hat = K P_hat
    q_avg = {i: s / n_workers for i, s in zip(comp, psum_many([q_local[i] for i in comp], axis_name))}
    full_avg = dict(zip(full, [s / n_workers for s in psum_many([ms[i] for i in full], axis_name)]))
    return _Factors(p_local, p_hat, q_local, q_avg, full_avg)


def _compressed_round(cfg: _Config, grads, state, axis_name):
    """One PowerSGD round: per-tensor update, new error memory, new Q, and the messages."""
    treedef = jax.tree.structure(grads)
    plan = powersgd_plan(state.shapes, cfg.rank, cfg.min_compression_rate)
    n_workers = num_workers(axis_name)
    ms = with_memory(grads, state)
    comp = [i for i, r in enumerate(plan) if r]
    full = [i for i, r in enumerate(plan) if not r]
    if cfg.warm_start:
        qs = {i: state.extra[i] for i in comp}
    else:
        qs = {i: _initial_q(cfg.seed, state.shapes[i], plan[i], i, state.step) for i in comp}
    f = _power_step(ms, qs, full, n_workers, axis_name)

    avg: list = []
    msg: list = []
    memory: list = []
    extra: list = []
    for i, m in enumerate(ms):
        if plan[i]:
            approx = _matmul_t(f.q_avg[i], f.p_hat[i]).reshape(m.shape)  # from_matrix(P_hat Q^T) = (Q P_hat^T) as K
            msg.append(LowRank(f.p_local[i], f.q_local[i], f.p_hat[i], qs[i], tuple(m.shape)))
            extra.append(f.q_avg[i] if cfg.warm_start else state.extra[i])
        else:
            approx = f.full_avg[i]
            msg.append(Dense(m))
            extra.append(None)
        avg.append(approx)
        memory.append(m - approx)
    new_memory = jax.tree.unflatten(treedef, memory) if state.memory is not None else None
    return jax.tree.unflatten(treedef, avg), new_memory, extra, msg


def _zero_low_rank(g: jax.Array, r: int) -> LowRank:
    """All-zero factors of rank `r` for `g`: the half of a warm-up `DenseThenLowRank` that did not travel."""
    rows, cols = matrix_shape(g.shape)
    dtype = jnp.result_type(g.dtype, jnp.float32)
    return LowRank(
        jnp.zeros((rows, r), dtype),
        jnp.zeros((cols, r), dtype),
        jnp.zeros((rows, r), dtype),
        jnp.zeros((cols, r), jnp.float32),
        tuple(g.shape),
    )


def _warmup_round(cfg: _Config, grads, state, axis_name):
    """PyTorch's warm-up: the exact mean of the raw gradients; memory and Q untouched."""
    leaves, treedef = jax.tree.flatten(grads)
    plan = powersgd_plan(state.shapes, cfg.rank, cfg.min_compression_rate)
    n = num_workers(axis_name)
    avg = [s / n for s in psum_many(leaves, axis_name)]
    msg: list = []
    for g, r in zip(leaves, plan):
        if r:
            msg.append(DenseThenLowRank(Dense(g), _zero_low_rank(g, r), jnp.asarray(False), cfg.start_iter))
        else:
            msg.append(Dense(g))
    return jax.tree.unflatten(treedef, avg), state.memory, list(state.extra), msg


def _phased_compressed_round(cfg: _Config, grads, state, axis_name):
    """`_compressed_round` after a warm-up: its `LowRank` messages as `DenseThenLowRank` (one structure always)."""
    avg, memory, extra, msg = _compressed_round(cfg, grads, state, axis_name)
    msg = [
        DenseThenLowRank(Dense(jnp.zeros_like(g)), m, jnp.asarray(True), cfg.start_iter)
        if isinstance(m, LowRank)
        else m
        for m, g in zip(msg, jax.tree.leaves(grads))
    ]
    return avg, memory, extra, msg


def _core(cfg: _Config, grads, state, axis_name):
    """The step `guarded` wraps: a compressed round, or (``start_iter > 0``) the phase the step counter picks."""
    treedef = jax.tree.structure(grads)
    if cfg.start_iter == 0:
        avg, memory, extra, msg = _compressed_round(cfg, grads, state, axis_name)
    else:
        # Both phases return the average as all-reduced (invariant) and the
        # rest as per-worker (varying) values, as shard_map's cond requires.
        axes = frozenset().union(*[varying_axes(x) for x in jax.tree.leaves((grads, state))])

        def phase(round_fn):
            avg, *per_worker = round_fn(cfg, grads, state, axis_name)
            return avg, *make_varying(tuple(per_worker), axes)

        avg, memory, extra, msg = jax.lax.cond(
            state.step < cfg.start_iter, lambda: phase(_warmup_round), lambda: phase(_phased_compressed_round)
        )
    return avg, state.replace(memory=memory, extra=extra), jax.tree.unflatten(treedef, msg)


def _check_args(rank, min_compression_rate, start_iter) -> None:
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"powersgd: rank must be an integer >= 1, got {rank!r}.")
    if min_compression_rate <= 0:
        raise ValueError(f"powersgd: min_compression_rate must be > 0, got {min_compression_rate!r}.")
    if isinstance(start_iter, bool) or not isinstance(start_iter, (int, np.integer)) or start_iter < 0:
        raise ValueError(
            f"powersgd: start_iter must be an integer >= 0 (the number of uncompressed warm-up steps; "
            f"0 compresses from the first step), got {start_iter!r}."
        )


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
    _check_args(rank, min_compression_rate, start_iter)
    cfg = _Config(rank, error_feedback, warm_start, min_compression_rate, seed, int(start_iter))
    name = f"powersgd:{rank}" if cfg.start_iter == 0 else f"powersgd:{rank}:start_iter={cfg.start_iter}"
    return Compressor(name, functools.partial(_init, cfg), guarded(name, functools.partial(_core, cfg)), decompress)


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
