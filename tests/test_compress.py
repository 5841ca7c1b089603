"""Algebra of the compressors: exactness, invariants, convergence, accounting, bad input."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_topk_approx_max_k_selection_is_named_and_sends_the_exact_entries_on_continuous_values():
    g = worker_grads([(40, 25), (7,)])
    exact, _, m_exact = run_pmapped(compress.topk(k=30), g)
    approx, _, m_approx = run_pmapped(compress.topk(k=30, selection="approx_max_k"), g)
    for key in g:  # continuous values: the same entries sent, so the same average
        np.testing.assert_array_equal(np.sort(m_exact[key].indices, -1), np.sort(m_approx[key].indices, -1))
        np.testing.assert_array_equal(exact[key], approx[key])
    # Equal magnitudes everywhere: exact takes the lowest indices; the option may not, hence its name.
    tied = jnp.ones((64,), jnp.float32)
    assert np.array_equal(np.sort(np.asarray(jax.lax.top_k(jnp.abs(tied), 8)[1])), np.arange(8))
    assert compress.topk(k=3, selection="approx_max_k").name == "topk+approx_max_k"
    with pytest.raises(ValueError, match="selection must be one of exact, approx_max_k"):
        compress.topk(k=3, selection="fast")


@settings(max_examples=12, deadline=None)  # each example compiles new shapes: 12 keep the suite short
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


@settings(max_examples=12, deadline=None)  # each example compiles new shapes: 12 keep the suite short
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    extra=st.integers(1, 3),
    rank=st.integers(1, 8),
    seed=st.integers(0, 1000),
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
        # One worker: the update is the sent message decompressed (from_matrix(P_hat Q^T), the matrix view),
        # which the step computes in the kernel layout instead.
        np.testing.assert_allclose(np.asarray(avg["a"]), np.asarray(msg["a"].dense()), rtol=1e-5, atol=1e-5)


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
    est = np.mean(
        [
            np.asarray(compress.decompress(c.reduce(g, c.init(g).replace(step=jnp.int32(i)), None)[2])["a"])
            for i in range(400)
        ],
        axis=0,
    )
    assert np.abs(est - np.asarray(g["a"])).max() < 0.25 * np.abs(np.asarray(g["a"])).max()


@pytest.mark.parametrize(
    "shapes",
    [
        [(3, 3, 64, 128), (128,), (3, 3, 128, 128), (512, 10), (10,)],
        # Many tiny tensors: the at-least-one-entry floor must not push the total over.
        [(3, 3, 3, 64), *[(64,)] * 40, (3, 3, 64, 64), (64, 10), (10,)],
    ],
)
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
    # The last one is in its dense warm-up at the bad step: the warm-up skips it the same way.
    for c in (compress.topk(ratio=0.1), compress.powersgd(rank=2), compress.powersgd(rank=2, start_iter=5)):
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
        avg, _, msg = run_pmapped(compress.from_spec(spec), g)
        chex.assert_trees_all_equal_shapes(avg, g)
        one = jax.tree.map(lambda x: x[0], g)
        chex.assert_trees_all_equal_shapes(compress.decompress(compress.worker_message(msg, 0)), one)


# --------------------------------------------------------------------------
# Public helpers and dispatch on types.
# --------------------------------------------------------------------------


def test_matrix_view_round_trips_and_checks_its_shape():
    x = jax.random.normal(jax.random.key(0), (3, 3, 4, 16))
    m = compress.to_matrix(x)
    assert m.shape == compress.matrix_shape(x.shape) == (16, 36)
    np.testing.assert_array_equal(m[5], np.moveaxis(np.asarray(x), -1, 0)[5].reshape(-1))  # row = output feature
    np.testing.assert_array_equal(compress.from_matrix(m, x.shape), x)
    with pytest.raises(AssertionError):  # chex: (36, 16) is not the (16, 36) view of that shape
        compress.from_matrix(m.T, x.shape)
    with pytest.raises(ValueError, match="at least one axis"):
        compress.to_matrix(jnp.zeros(()))


def test_sparse_messages_say_whether_indices_travel():
    g = {"a": jax.random.normal(jax.random.key(0), (10, 10))}
    top = compress.topk(k=7).reduce(g, compress.topk(k=7).init(g), None)[2]["a"]
    rnd = compress.randomk(k=7).reduce(g, compress.randomk(k=7).init(g), None)[2]["a"]
    assert top.indices_on_wire and not rnd.indices_on_wire
    assert compress.message_cost(top).words == 14 and compress.message_cost(rnd).words == 7
    assert compress.is_message(top) and not compress.is_message(g["a"])


# --------------------------------------------------------------------------
# PowerSGD's dense warm-up (start_iter, PyTorch's start_powerSGD_iter).
# --------------------------------------------------------------------------

DENSE_WORDS = sum(math.prod(s) for s in SHAPES)


def test_powersgd_start_iter_sends_the_exact_mean_then_compresses():
    K, rank = 3, 2
    c = compress.powersgd(rank=rank, start_iter=K)
    plain = compress.powersgd(rank=rank)  # K = 0
    params = jax.tree.map(lambda g: g[0], worker_grads(SHAPES))
    n = jax.local_device_count()
    init = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), c.init(params))
    f = jax.pmap(lambda g, s: c.reduce(g, s, AXIS), axis_name=AXIS)
    f_plain = jax.pmap(lambda g, s: plain.reduce(g, s, AXIS), axis_name=AXIS)
    f_none = jax.pmap(lambda g, s: compress.none().reduce(g, s, AXIS), axis_name=AXIS)
    none_state = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), compress.none().init(params))
    state, plain_state = init, init
    for t in range(K + 2):
        g = worker_grads(SHAPES, seed=10 + t)  # a new gradient every step
        avg, state, msg = f(g, state)
        assert int(state.step[0]) == t + 1 == int(state.step[7])
        if t < K:
            # The exact mean, bit for bit what uncompressed SGD's all-reduce gives.
            exact, _, _ = f_none(g, none_state)
            for k in g:
                np.testing.assert_array_equal(avg[k], exact[k])
                np.testing.assert_allclose(avg[k][0], np.asarray(g[k]).mean(0), rtol=1e-5, atol=1e-6)
            for w in (0, 3, 7):
                mine = compress.worker_message(msg, w)
                sent = compress.decompress(mine)
                for k in g:
                    np.testing.assert_array_equal(sent[k], g[k][w])  # the worker's full gradient
                assert isinstance(mine["t2"], compress.DenseThenLowRank) and not mine["t2"].is_compressed()
                assert all(
                    isinstance(m, compress.Dense)
                    for m in jax.tree.leaves(compress.as_sent(mine), is_leaf=compress.is_message)
                )
                assert not np.asarray(mine["t2"].low_rank.p).any()  # nothing of the unsent form is kept
                assert compress.message_cost(mine).words == DENSE_WORDS
            # Error memory untouched (zero), warm-start Q untouched.
            assert all(not np.asarray(m).any() for m in jax.tree.leaves(state.memory))
            for q, q0 in zip(state.extra, init.extra):
                if q is not None:
                    np.testing.assert_array_equal(q, q0)
        else:
            # From step K on: PowerSGD, continuing from the untouched state. It is
            # today's PowerSGD (K = 0) started from init on the gradients of step K on.
            plain_avg, plain_state, plain_msg = f_plain(g, plain_state)
            for k in g:
                np.testing.assert_array_equal(avg[k], plain_avg[k])
                np.testing.assert_array_equal(state.memory[k], plain_state.memory[k])
            assert not np.allclose(avg["t2"][0], np.asarray(g["t2"]).mean(0), atol=1e-3)  # compressed
            mine, plain_mine = compress.worker_message(msg, 2), compress.worker_message(plain_msg, 2)
            assert mine["t2"].is_compressed() and not np.asarray(mine["t2"].full.value).any()
            sent = compress.as_sent(mine)
            assert isinstance(sent["t2"], compress.LowRank) and isinstance(sent["t1"], compress.Dense)
            for k in g:
                np.testing.assert_array_equal(compress.decompress(mine)[k], compress.decompress(plain_mine)[k])
            np.testing.assert_array_equal(sent["t2"].p_hat, plain_mine["t2"].p_hat)
            assert compress.message_cost(mine).words == sum(compress.powersgd_words(SHAPES, rank)) < DENSE_WORDS


def powersgd_reference(grads, memory, qs, rank):
    """Algorithm 1 of Vogels et al. in float64 numpy, one round over all workers (warm start, error feedback)."""
    w = grads[next(iter(grads))].shape[0]
    avg, new_mem = {}, {}
    plan = dict(zip(grads, compress.powersgd_plan([g.shape[1:] for g in grads.values()], rank)))
    for i, k in enumerate(grads):
        m = np.asarray(grads[k], np.float64) + np.asarray(memory[k], np.float64)
        if plan[k]:
            mats = [np.moveaxis(m[j], -1, 0).reshape(m.shape[-1], -1) for j in range(w)]
            q = np.asarray(qs[i], np.float64)
            p_hat = np.linalg.qr(sum(mm @ q for mm in mats))[0]
            q_avg = sum(mm.T @ p_hat for mm in mats) / w
            approx = np.moveaxis((p_hat @ q_avg.T).reshape((m.shape[-1], *m.shape[1:-1])), 0, -1)
        else:
            approx = m.mean(0)
        avg[k], new_mem[k] = approx, m - approx
    return avg, new_mem


def test_powersgd_start_iter_zero_is_todays_powersgd():
    # K = 0 takes the code path PowerSGD had before start_iter existed (no cond,
    # plain LowRank/Dense messages); here it is checked against the default
    # compressor bit for bit and against a float64 numpy Algorithm 1.
    g = worker_grads(SHAPES, seed=4)
    c0, c = compress.powersgd(rank=2, start_iter=0), compress.powersgd(rank=2)
    assert c0.name == c.name == "powersgd:2"
    (a0, s0, m0), (a, s, m) = run_pmapped(c0, g, steps=2), run_pmapped(c, g, steps=2)
    for x, y in zip(jax.tree.leaves((a0, s0, m0)), jax.tree.leaves((a, s, m))):
        np.testing.assert_array_equal(x, y)
    kinds = {type(x).__name__ for x in jax.tree.leaves(m0, is_leaf=compress.is_message)}
    assert kinds == {"LowRank", "Dense"}
    params = jax.tree.map(lambda x: x[0], g)
    state = c0.init(params)
    avg, new = run_pmapped(c0, g)[:2]
    ref_avg, ref_mem = powersgd_reference(g, state.memory, state.extra, 2)
    for k in g:
        np.testing.assert_allclose(avg[k][0], ref_avg[k], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new.memory[k][5], ref_mem[k][5], rtol=1e-4, atol=1e-5)


def test_start_iter_wire_accounting_counts_dense_steps():
    params = jax.tree.map(lambda g: g[0], worker_grads(SHAPES))
    compressed = sum(compress.powersgd_words(SHAPES, 2))
    c = compress.powersgd(rank=2, start_iter=4)
    assert compress.wire_cost(c, params, step=0).words == compress.wire_cost(c, params, step=3).words == DENSE_WORDS
    assert compress.wire_cost(c, params, step=4).words == compressed
    assert compress.wire_cost(c, params, step=4).bytes == 4 * compressed
    assert compress.training_words(c, params, 3) == 3 * DENSE_WORDS
    assert compress.training_words(c, params, 10) == 4 * DENSE_WORDS + 6 * compressed
    with pytest.raises(ValueError, match="pass step="):
        compress.wire_cost(c, params)
    abstract = jax.eval_shape(lambda g, s: c.reduce(g, s, None)[2], params, c.init(params))
    with pytest.raises(ValueError, match="pass step="):
        compress.message_cost(abstract)
    # K = 0 and other compressors: one cost per step, step ignored.
    plain = compress.powersgd(rank=2)
    assert compress.wire_cost(plain, params).words == compress.wire_cost(plain, params, step=7).words == compressed
    assert compress.training_words(plain, params, 10) == 10 * compressed
    assert compress.training_words(compress.none(), params, 5) == 5 * DENSE_WORDS
    # A concrete message counts what it sent; a contradicting step is refused.
    msg = compress.worker_message(run_pmapped(c, worker_grads(SHAPES))[2], 0)
    assert compress.message_cost(msg).words == compress.message_cost(msg, step=0).words == DENSE_WORDS
    with pytest.raises(ValueError, match="contradicts"):
        compress.message_cost(msg, step=4)
    stacked = run_pmapped(c, worker_grads(SHAPES))[2]
    with pytest.raises(ValueError, match="worker_message"):
        compress.message_cost(stacked)


def test_pytorch_defaults_spec():
    d = compress.PYTORCH_POWERSGD_DEFAULTS
    assert dict(d) == {
        "rank": 1,
        "start_iter": 1000,
        "min_compression_rate": 2,
        "warm_start": True,
        "error_feedback": True,
    }
    with pytest.raises(TypeError):
        d["rank"] = 2  # read-only
    params = jax.tree.map(lambda g: g[0], worker_grads(SHAPES))
    c = compress.powersgd_pytorch()
    assert c.name == "powersgd:1:start_iter=1000"
    rank1 = sum(compress.powersgd_words(SHAPES, 1))
    assert compress.training_words(c, params, 1010) == 1000 * DENSE_WORDS + 10 * rank1
    assert compress.powersgd_pytorch(start_iter=0).name == "powersgd:1"
    same = compress.from_spec("powersgd:1", params, start_iter=1000)
    assert same.name == c.name
    assert compress.training_words(same, params, 1010) == compress.training_words(c, params, 1010)


def test_bad_start_iter_raises_one_line_errors():
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match=r"start_iter must be an integer >= 0") as e:
            compress.powersgd(rank=2, start_iter=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"start_iter must be an integer >= 0"):
        compress.from_spec("powersgd:2", start_iter=-3)
    with pytest.raises(ValueError, match="applies to powersgd specs only.*pass start_iter=0"):
        compress.from_spec("topk:0.1", start_iter=5)
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        compress.training_words(compress.none(), {"w": jnp.zeros(3)}, -1)


def test_orthonormal_columns_span_the_columns_like_qr_batched():
    a = np.asarray(jax.random.normal(jax.random.key(3), (3, 40, 6)), np.float64)
    a[1, :, 5] = a[1, :, 0] + 2 * a[1, :, 1]  # a dependent column
    a[2, :, 3] = 0.0  # a zero column
    q = np.asarray(compress.orthonormal_columns(jnp.asarray(a, jnp.float32)), np.float64)
    assert np.isfinite(q).all()
    for i in range(3):
        np.testing.assert_allclose(q[i] @ (q[i].T @ a[i]), a[i], atol=1e-4)  # spans every column
    np.testing.assert_allclose(q[0].T @ q[0], np.eye(6), atol=1e-5)  # full rank: orthonormal
    # Gram-Schmidt's nested spans: column j is QR's column j up to sign.
    np.testing.assert_allclose(np.abs(np.sum(q[0] * np.linalg.qr(a[0])[0], 0)), 1.0, atol=1e-4)
    np.testing.assert_array_equal(q[2][:, 3], 0.0)  # nothing left of a zero column
    np.testing.assert_array_equal(q[1][:, 5], 0.0)  # nor of a dependent one: rounding residue is not a direction
    np.testing.assert_allclose(q[2][:, [0, 1, 2, 4, 5]].T @ q[2][:, [0, 1, 2, 4, 5]], np.eye(5), atol=1e-5)
