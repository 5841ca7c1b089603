"""Quantisation: QSGD and EF-SignSGD, with error feedback."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from trustsgd_jax.compress.base import Compressor, guarded, new_state, num_workers, psum_many, with_memory, worker_index
from trustsgd_jax.compress.messages import Quantized, Signs, decompress


def _elementwise_compressor(name, error_feedback, encode):
    """Compressors whose messages decode independently per worker and sum (psum of decoded values)."""

    def core(grads, state, axis_name):
        treedef = jax.tree.structure(grads)
        ps = with_memory(grads, state)
        msgs = [encode(p, i, state, axis_name) for i, p in enumerate(ps)]
        decoded = [m.dense() for m in msgs]
        n = num_workers(axis_name)
        avg = [s / n for s in psum_many(decoded, axis_name)]
        memory = [p - d for p, d in zip(ps, decoded)]
        new = state.replace(memory=jax.tree.unflatten(treedef, memory) if state.memory is not None else None)
        return jax.tree.unflatten(treedef, avg), new, jax.tree.unflatten(treedef, msgs)

    return Compressor(name, lambda p: new_state(p, memory=error_feedback), guarded(name, core), decompress)


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
        key = jax.random.fold_in(jax.random.fold_in(key, worker_index(axis_name)), i)
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
