"""Exact alternatives to ``lax.top_k`` for Top-K's selection, timed by `benchmarks.bench_topk_select`.

Each returns the indices of the k largest entries of a >= 0, the same set as
``lax.top_k`` (ties to the lowest index; tested). Neither was faster on this
CPU (README, ``bench_compress``), so neither is in `trustsgd_jax.compress`.
Kept apart from the benchmark's flags so that tests can import them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ROWS = 16  # two stages: rows of the first top_k
STRIDE, MARGIN = 16, 2.0  # threshold first: sample every STRIDE-th entry, aim at MARGIN x k entries above


def two_stage(a, k: int):
    """Indices of the k largest of a >= 0: top_k per row, then among the rows' winners (exact)."""
    n = a.size
    if n < ROWS * k * 4:
        return jax.lax.top_k(a, k)[1]
    rows = jnp.pad(a, (0, (-n) % ROWS), constant_values=-1.0).reshape(ROWS, -1)
    values, idx = jax.lax.top_k(rows, k)
    flat = (idx + jnp.arange(ROWS)[:, None] * rows.shape[1]).reshape(-1)
    return flat[jax.lax.top_k(values.reshape(-1), k)[1]]


def threshold_first(a, k: int):
    """Indices of the k largest of a >= 0: candidates above a sampled threshold, then top_k among them (exact)."""
    n = a.size
    k_sample = int(np.ceil(k / STRIDE * MARGIN)) + 8
    if n < 65536 or k_sample * STRIDE >= n // 2:
        return jax.lax.top_k(a, k)[1]
    threshold = jax.lax.top_k(a[::STRIDE], k_sample)[0][-1]
    cap = int(min(n, 4 * k_sample * STRIDE))
    above = a >= threshold
    count = jnp.sum(above)

    def among_candidates():
        # nonzero keeps index order, so top_k's ties still go to the lowest index.
        cand = jnp.nonzero(above, size=cap, fill_value=0)[0]
        values = jnp.where(jnp.arange(cap) < count, a[cand], -1.0)
        return cand[jax.lax.top_k(values, k)[1]]

    return jax.lax.cond((count >= k) & (count <= cap), among_candidates, lambda: jax.lax.top_k(a, k)[1])


CASES = {
    "lax.top_k (compress.topk, exact)": lambda a, k: jax.lax.top_k(a, k)[1],
    "lax.approx_max_k, recall 1.0": lambda a, k: jax.lax.approx_max_k(a, k, recall_target=1.0)[1],
    f"two stages ({ROWS} rows)": two_stage,
    f"threshold first (1/{STRIDE} sample, nonzero)": threshold_first,
}
