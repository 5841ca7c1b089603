"""Algebra of the compressors: exactness, invariants, convergence, accounting, bad input."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from trustsgd_jax import compress

AXIS = "batch"


def run_pmapped(c, grads_per_worker, state=None, steps=1):
    """Runs `steps` reduces of the same per-worker gradients on 8 devices; returns (avg, state, msg)."""
    n = jax.local_device_count()
    params = jax.tree.map(lambda g: g[0], grads_per_worker)
    if state is None:
        state = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), c.init(params))
    f = jax.pmap(lambda g, s: c.reduce(g, s, AXIS), axis_name=AXIS)
    out = None
    for _ in range(steps):
        avg, state, msg = f(grads_per_worker, state)
        out = avg, state, msg
    return out


def worker_grads(shapes, seed=0, n=8):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {f"t{i}": jax.random.normal(k, (n, *s)) for i, (k, s) in enumerate(zip(keys, shapes))}


SHAPES = [(3, 3, 4, 16), (16,), (48, 32), (5,)]


def test_none_is_the_mean():
    g = worker_grads(SHAPES)
    avg, _, msg = run_pmapped(compress.none(), g)
    for k in g:
        np.testing.assert_allclose(avg[k][3], g[k].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(compress.decompress(compress.worker_message(msg, 3))[k], g[k][3])


def test_powersgd_full_rank_is_exact_mean():
    g = worker_grads(SHAPES)
    avg, _, _ = run_pmapped(compress.powersgd(rank=64), g)
    for k in g:
        np.testing.assert_allclose(avg[k][0], g[k].mean(0), rtol=1e-5, atol=1e-5)


def truncated_svd(m, r):
    u, s, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def low_rank_plus_noise(key, n, m, decay=0.6):
    u, _ = np.linalg.qr(np.asarray(jax.random.normal(key, (n, n))))
    v, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (m, n))))
    s = decay ** np.arange(n)
    return (u * s) @ v.T  # n x m, spectrum 1, 0.6, 0.36, ...


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_powersgd_warm_start_converges_to_truncated_svd(rank):
    # A Dense kernel (in=96, out=64): PowerSGD's matrix is its transpose (out x in).
    m = low_rank_plus_noise(jax.random.key(rank), 64, 96).astype(np.float32)
    params = {"w": jnp.zeros((96, 64))}
    c = compress.powersgd(rank=rank, error_feedback=False)
    state = c.init(params)
    reduce = jax.jit(lambda g, s: c.reduce(g, s, None))
    for _ in range(40):
        avg, state, msg = reduce({"w": jnp.asarray(m.T)}, state)
    best = truncated_svd(m, rank)
    got = np.asarray(avg["w"]).T
    assert np.linalg.norm(got - best) / np.linalg.norm(best) < 1e-3
    assert isinstance(msg["w"], compress.LowRank)


def test_powersgd_eight_workers_approximate_the_mean_gradient():
    base = low_rank_plus_noise(jax.random.key(7), 64, 96).astype(np.float32)
    noise = 0.01 * np.asarray(jax.random.normal(jax.random.key(8), (8, 64, 96)))
    per_worker = {"w": jnp.asarray(np.transpose(base[None] + noise, (0, 2, 1)))}
    c = compress.powersgd(rank=2, error_feedback=False)
    avg, _, _ = run_pmapped(c, per_worker, steps=40)
    best = truncated_svd((base[None] + noise).mean(0), 2)
    got = np.asarray(avg["w"][0]).T
    assert np.linalg.norm(got - best) / np.linalg.norm(best) < 1e-3
    # Every worker applies the same update.
    np.testing.assert_array_equal(avg["w"][0], avg["w"][5])


def test_powersgd_error_feedback_is_what_the_average_missed():
    g = worker_grads(SHAPES, seed=3)
    c = compress.powersgd(rank=1)
    avg, state, msg = run_pmapped(c, g)
    for k in g:  # first step: memory was zero, so M = g and e = M - update
        np.testing.assert_allclose(state.memory[k][2] + avg[k][2], g[k][2], rtol=1e-5, atol=1e-5)
    # The (48, 32) matrix is compressed at rank 1: P and Q are (32x1) and (48x1).
    assert msg["t2"].p.shape[1:] == (32, 1) and msg["t2"].q.shape[1:] == (48, 1)
    assert isinstance(msg["t1"], compress.Dense)  # biases travel in full


def test_topk_ratio_one_is_exact():
    g = worker_grads(SHAPES)
    avg, state, _ = run_pmapped(compress.topk(ratio=1.0), g)
    for k in g:
        np.testing.assert_allclose(avg[k][0], g[k].mean(0), rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(state.memory[k]).max()) == 0.0


def test_topk_keeps_the_k_largest_of_gradient_plus_memory():
    g = worker_grads([(40, 25)])
    c = compress.topk(k=30)
    _, state, _ = run_pmapped(c, g)  # memory now holds the residual
    g2 = worker_grads([(40, 25)], seed=1)
    _, state2, msg = run_pmapped(c, g2, state=state)
    for w in (0, 6):
        p = np.asarray(g2["t0"][w] + state.memory["t0"][w]).reshape(-1)
        expected = np.sort(np.argsort(-np.abs(p))[:30])
        np.testing.assert_array_equal(np.sort(np.asarray(msg["t0"].indices[w])), expected)
        # Mass conservation, exactly: sent + new memory == gradient + old memory.
        sent = np.asarray(compress.decompress(compress.worker_message(msg, w))["t0"]).reshape(-1)
        np.testing.assert_array_equal(sent + np.asarray(state2.memory["t0"][w]).reshape(-1), p)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple),
    ratio=st.floats(0.01, 1.0),
    seed=st.integers(0, 1000),
)
def test_topk_invariants_property(shape, ratio, seed):
    g = {"a": jax.random.normal(jax.random.key(seed), shape)}
    mem = {"a": jax.random.normal(jax.random.key(seed + 1), shape)}
    c = compress.topk(ratio=ratio)
    state = c.init(g).replace(memory=mem)
    _, new, msg = c.reduce(g, state, None)
    size = math.prod(shape)
    k = min(size, max(1, math.ceil(ratio * size - 1e-9)))
    assert msg["a"].values.shape == (k,)
    assert len(set(np.asarray(msg["a"].indices).tolist())) == k
    p = np.asarray(g["a"] + mem["a"])
    np.testing.assert_array_equal(np.asarray(compress.decompress(msg)["a"]) + np.asarray(new.memory["a"]), p)
    kept = np.abs(p.reshape(-1))[np.asarray(msg["a"].indices)]
    dropped = np.abs(np.asarray(new.memory["a"]).reshape(-1))
    assert kept.min() >= dropped.max() - 1e-7
    assert compress.message_cost(msg).words == 2 * k


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40), m=st.integers(1, 40), extra=st.integers(1, 3),
    rank=st.integers(1, 8), seed=st.integers(0, 1000),
)
def test_powersgd_invariants_property(n, m, extra, rank, seed):
    shape = (extra, m, n)  # flax-style: output axis last -> matrix n x (extra*m)
    g = {"a": jax.random.normal(jax.random.key(seed), shape), "b": jax.random.normal(jax.random.key(seed), (n,))}
    c = compress.powersgd(rank=rank)
    avg, new, msg = c.reduce(g, c.init(g), None)
    rows, cols = n, extra * m
    r = min(rank, rows, cols)
    compressed = (rows + cols) * r * 2 < rows * cols
    assert isinstance(msg["a"], compress.LowRank if compressed else compress.Dense)
    expected_words = ((rows + cols) * r if compressed else rows * cols) + n
    assert compress.message_cost(msg).words == expected_words
    assert sum(compress.powersgd_words([shape, (n,)], rank)) == expected_words
    # Single worker: update + new error == gradient (nothing is lost).
    np.testing.assert_allclose(np.asarray(avg["a"] + new.memory["a"]), np.asarray(g["a"]), rtol=1e-4, atol=1e-4)
    if compressed:
        ph = np.asarray(msg["a"].p_hat)
        np.testing.assert_allclose(ph.T @ ph, np.eye(r), atol=1e-4)


@pytest.mark.parametrize("spec", ["randomk:0.2", "qsgd:8", "signsgd"])
def test_other_compressors_conserve_mass_and_count_words(spec):
    g = worker_grads(SHAPES, seed=5)
    params = jax.tree.map(lambda x: x[0], g)
    c = compress.from_spec(spec)
    avg, state, msg = run_pmapped(c, g)
    seen = [compress.decompress(compress.worker_message(msg, w)) for w in range(8)]
    for k in g:
        np.testing.assert_allclose(seen[1][k] + state.memory[k][1], g[k][1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(avg[k][0], np.mean([s[k] for s in seen], 0), rtol=1e-5, atol=1e-5)
    sizes = [math.prod(s) for s in SHAPES]
    if spec.startswith("randomk"):
        expected = sum(math.ceil(0.2 * s - 1e-9) for s in sizes)
        # Same coordinates on every worker (shared seed).
        np.testing.assert_array_equal(msg["t0"].indices[0], msg["t0"].indices[7])
    elif spec.startswith("qsgd"):
        expected = sum(1 + math.ceil(s * (1 + math.ceil(math.log2(9))) / 32) for s in sizes)
    else:
        expected = sum(1 + math.ceil(s / 32) for s in sizes)
    assert compress.wire_cost(c, params).words == expected


def test_qsgd_is_unbiased():
    g = {"a": jax.random.normal(jax.random.key(0), (200,))}
    c = compress.qsgd(levels=2, error_feedback=False)
    est = np.mean([np.asarray(compress.decompress(c.reduce(g, c.init(g).replace(step=jnp.int32(i)), None)[2])["a"])
                   for i in range(400)], axis=0)
    assert np.abs(est - np.asarray(g["a"])).max() < 0.25 * np.abs(np.asarray(g["a"])).max()


@pytest.mark.parametrize("shapes", [
    [(3, 3, 64, 128), (128,), (3, 3, 128, 128), (512, 10), (10,)],
    # Many tiny tensors: the at-least-one-entry floor must not push the total over.
    [(3, 3, 3, 64), *[(64,)] * 40, (3, 3, 64, 64), (64, 10), (10,)],
])
def test_topk_level_matches_powersgd_words(shapes):
    params = {f"p{i}": jnp.zeros(s) for i, s in enumerate(shapes)}
    for r in (1, 2, 4, 30, 50):
        w_power = sum(compress.powersgd_words(shapes, r))
        c = compress.topk_level(params, r)
        words = compress.wire_cost(c, params).words
        assert words == 2 * (w_power // 2)
        assert words == compress.wire_cost(compress.powersgd(r), params).words - (w_power % 2)


def test_nonfinite_gradient_is_flagged_and_memory_kept_clean():
    g = worker_grads(SHAPES, seed=2)
    for c in (compress.topk(ratio=0.1), compress.powersgd(rank=2)):
        _, state, _ = run_pmapped(c, g)
        bad = dict(g)
        bad["t2"] = g["t2"].at[3, 0, 0].set(jnp.nan)  # one worker, one entry
        avg, new, _ = run_pmapped(c, bad, state=state)
        assert int(new.nonfinite[0]) == 1 and int(new.nonfinite[5]) == 1
        for k in g:
            assert bool(jnp.all(avg[k] == 0))
            np.testing.assert_array_equal(new.memory[k], state.memory[k])
        assert int(new.step[0]) == int(state.step[0])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        compress.powersgd(rank=0)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            compress.topk(ratio=bad)
    with pytest.raises(ValueError, match="unknown compressor spec"):
        compress.from_spec("powerful:4")
    with pytest.raises(ValueError, match="needs an argument"):
        compress.from_spec("powersgd")
    with pytest.raises(ValueError, match="needs the model's params"):
        compress.from_spec("topk_level:2")
    with pytest.raises(ValueError, match="levels must be a positive integer"):
        compress.qsgd(levels=0)


def test_state_from_another_model_is_rejected():
    c = compress.powersgd(rank=2)
    state = c.init({"w": jnp.zeros((8, 4))})
    with pytest.raises(ValueError, match="does not match the tree the state was built for"):
        c.reduce({"w": jnp.zeros((8, 5))}, state, None)
    with pytest.raises(ValueError, match="does not match"):
        c.reduce({"v": jnp.zeros((8, 4))}, state, None)
    with pytest.raises(TypeError, match="state must come from"):
        c.reduce({"w": jnp.zeros((8, 4))}, {"not": "a state"}, None)


def test_reduce_shapes_are_checked_with_chex():
    g = worker_grads(SHAPES)
    for spec in ("none", "powersgd:2", "topk:0.3", "randomk:0.3", "qsgd:4", "signsgd"):
        avg, state, msg = run_pmapped(compress.from_spec(spec), g)
        chex.assert_trees_all_equal_shapes(avg, g)
        one = jax.tree.map(lambda x: x[0], g)
        chex.assert_trees_all_equal_shapes(compress.decompress(compress.worker_message(msg, 0)), one)
