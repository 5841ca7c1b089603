"""The exact alternatives to lax.top_k that benchmarks/bench_topk_select times pick the same entries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import topk_selections


@pytest.mark.parametrize(
    "pick", [topk_selections.two_stage, topk_selections.threshold_first], ids=["two_stage", "threshold_first"]
)
@pytest.mark.parametrize("case", ["continuous", "ties", "heavy_tail"])
def test_alternative_selection_sends_the_entries_of_lax_top_k(pick, case):
    n, k = 200_000, 700
    a = jnp.abs(jax.random.normal(jax.random.key(0), (n,)))
    if case == "ties":  # every magnitude equal: the sampled threshold admits all (past the cap: the fallback)
        a = jnp.ones((n,))
    elif case == "heavy_tail":  # a few huge entries above many equal ones: ties at the k-th value
        a = jnp.where(jnp.arange(n) % 1000 == 0, 10.0 + a, jnp.round(a * 4) / 4)
    want = np.asarray(jax.lax.top_k(a, k)[1])
    got = np.asarray(jax.jit(lambda a: pick(a, k))(a))
    assert got.shape == (k,)
    assert set(got.tolist()) == set(want.tolist())
