"""The optax face of the compressors (`compress.as_optax`): the README program, identity with `reduce`, accessors."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from trustsgd_jax import compress

AXIS = "batch"
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using the compressors in your own data-parallel training"
SHAPES = [(3, 3, 4, 16), (16,), (48, 32), (5,)]


def readme_program() -> str:
    """The first Python block of the README's section on using the compressors, verbatim."""
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    block = re.search(r"```python\n(.*?)```", text[start : end if end >= 0 else None], re.DOTALL)
    assert block, "the README section has no python block"
    return block.group(1)


def worker_grads(seed, n=8):
    keys = jax.random.split(jax.random.key(seed), len(SHAPES))
    return {f"t{i}": jax.random.normal(k, (n, *s)) for i, (k, s) in enumerate(zip(keys, SHAPES))}


def replicate(tree, n=8):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


COMPRESSORS = {
    "powersgd": lambda: compress.powersgd(rank=2),
    "topk": lambda: compress.topk(ratio=0.1),
    "powersgd_start_iter": lambda: compress.powersgd(rank=2, start_iter=2),
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_optax_updates_are_bit_identical_to_reduce_under_pmap(kind):
    c = COMPRESSORS[kind]()
    params = jax.tree.map(lambda g: g[0], worker_grads(0))
    tx = compress.as_optax(c, axis_name=AXIS)
    direct = jax.pmap(lambda g, s: c.reduce(g, s, AXIS), axis_name=AXIS)
    via_optax = jax.pmap(lambda g, s: tx.update(g, s, None), axis_name=AXIS)
    state, opt_state = replicate(c.init(params)), replicate(tx.init(params))
    for t in range(4):
        g = worker_grads(t + 1)
        avg, state, msg = direct(g, state)
        updates, opt_state = via_optax(g, opt_state)
        assert_trees_equal(updates, avg)
        assert_trees_equal(compress.compressor_state(opt_state), state)
        assert_trees_equal(compress.last_message(opt_state), msg)


def test_chain_with_sgd_is_sgd_on_the_reduced_gradient():
    c = compress.powersgd(rank=2)
    params = jax.tree.map(lambda g: g[0], worker_grads(0))
    sgd = optax.sgd(0.1, momentum=0.9)
    tx = optax.chain(compress.as_optax(c, axis_name=AXIS), sgd)

    def by_hand(g, s, o):
        avg, s, _ = c.reduce(g, s, AXIS)
        u, o = sgd.update(avg, o)
        return u, s, o

    by_hand = jax.pmap(by_hand, axis_name=AXIS)
    chained = jax.pmap(lambda g, o, p: tx.update(g, o, p), axis_name=AXIS)
    s, o, opt_state = replicate(c.init(params)), replicate(sgd.init(params)), replicate(tx.init(params))
    for t in range(3):
        g = worker_grads(t + 1)
        u, s, o = by_hand(g, s, o)
        u2, opt_state = chained(g, opt_state, replicate(params))  # params are ignored by the compressor
        assert_trees_equal(u2, u)
    assert_trees_equal(compress.compressor_state(opt_state), s)


def test_as_optax_under_shard_map_matches_pmap():
    c = compress.powersgd(rank=2, start_iter=2)  # the warm-up's lax.cond under shard_map's type checks
    params = jax.tree.map(lambda g: g[0], worker_grads(0))
    tx = compress.as_optax(c, axis_name=AXIS)
    mesh = Mesh(np.array(jax.devices()), (AXIS,))

    def body(g, o):
        one = lambda t: jax.tree.map(lambda x: x[0], t)
        u, o = tx.update(one(g), one(o))
        return jax.tree.map(lambda x: x[None], (u, o))

    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    pmapped = jax.pmap(lambda g, o: tx.update(g, o), axis_name=AXIS)
    o1 = o2 = replicate(tx.init(params))
    for t in range(4):
        g = worker_grads(t + 1)
        u1, o1 = pmapped(g, o1)
        u2, o2 = sharded(g, o2)
        for k in g:
            np.testing.assert_array_equal(np.asarray(u2[k]), np.asarray(u1[k]))
    assert int(compress.compressor_state(o2).step[3]) == 4


def test_state_accessors_and_their_errors():
    c = compress.topk(ratio=0.5)
    params = {"w": jnp.ones((4, 3))}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.chain(compress.as_optax(c, axis_name=None), optax.sgd(0.1)))
    opt_state = tx.init(params)
    # Before any update: a zero message with the structure every update returns.
    before = compress.last_message(opt_state)
    assert isinstance(before["w"], compress.Sparse) and not np.asarray(before["w"].values).any()
    g = {"w": jnp.arange(12.0).reshape(4, 3)}
    _, opt_state2 = tx.update(g, opt_state, params)
    msg = compress.last_message(opt_state2)
    assert jax.tree.structure(msg) == jax.tree.structure(before)
    np.testing.assert_array_equal(np.sort(np.asarray(msg["w"].indices)), [6, 7, 8, 9, 10, 11])
    assert int(compress.compressor_state(opt_state2).step) == 1
    with pytest.raises(ValueError, match="found 0"):
        compress.last_message(optax.sgd(0.1).init(params))
    two = optax.chain(compress.as_optax(c, None), compress.as_optax(c, None))
    with pytest.raises(ValueError, match="found 2"):
        compress.compressor_state(two.init(params))
    lean = compress.as_optax(c, axis_name=None, keep_message=False)
    _, lean_state = lean.update(g, lean.init(params))
    assert lean_state.message is None
    with pytest.raises(ValueError, match="keep_message=True"):
        compress.last_message(lean_state)
