"""The data-parallel step: exact gradients, pmap == shard_map, real training, several processes."""

import os
import re
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from trustsgd_jax import compress, data, models, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mnist():
    ds = data.load("mnist", source="sample")
    return ds, data.normalize(ds.x_train, "mnist"), data.normalize(ds.x_test, "mnist")


def _one_step_grads(model_dp, model_single, images, labels):
    """Per-worker averaged gradient from 8 pmapped workers with `none`, and the single-device full-batch one."""
    state = train.init_state(model_dp, optax.sgd(0.0), compress.none(), images.shape[1:], 0)

    def step(st, x, y):
        def loss_fn(p):
            logits, upd = model_dp.apply(
                {"params": p, "batch_stats": st.batch_stats}, x, train=True, mutable=["batch_stats", "wire"]
            )
            return train.cross_entropy(logits, y).mean()

        g = jax.grad(loss_fn)(st.params)
        avg, _, _ = compress.none().reduce(g, st.comp_state, train.AXIS)
        return avg

    xs, ys = train.shard_batch(images, labels, 8)
    avg = jax.pmap(step, axis_name=train.AXIS)(train.replicate(state, 8), xs, ys)

    def full_loss(p):
        logits, _ = model_single.apply(
            {"params": p, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats", "wire"]
        )
        return train.cross_entropy(logits, labels).mean()

    return avg, jax.grad(full_loss)(state.params)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_none_equals_the_single_device_gradient_of_the_whole_batch(mnist, norm):
    ds, x, _ = mnist
    dp = models.make_model("convnet", 10, norm=norm, axis_name=train.AXIS)
    single = models.make_model("convnet", 10, norm=norm, axis_name=None)
    avg, full = _one_step_grads(dp, single, jnp.asarray(x[:64]), jnp.asarray(ds.y_train[:64]))
    for a, f in zip(jax.tree.leaves(avg), jax.tree.leaves(full)):
        np.testing.assert_allclose(a[5], f, rtol=2e-4, atol=2e-6)


def test_local_batchnorm_differs_from_synchronised(mnist):
    ds, x, _ = mnist
    dp = models.make_model("convnet", 10, norm="batch_local", axis_name=train.AXIS)
    single = models.make_model("convnet", 10, norm="batch", axis_name=None)
    avg, full = _one_step_grads(dp, single, jnp.asarray(x[:64]), jnp.asarray(ds.y_train[:64]))
    diff = max(float(jnp.abs(a[0] - f).max()) for a, f in zip(jax.tree.leaves(avg), jax.tree.leaves(full)))
    assert diff > 1e-4  # per-worker statistics: not the full-batch gradient
    assert train.sync_bn_words(dp, {"x": jnp.zeros(5)}) == 0


def test_sync_batchnorm_is_counted_and_visible_on_the_wire(mnist):
    ds, x, _ = mnist
    model = models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS)
    c = compress.powersgd(rank=1)
    state = train.init_state(model, optax.sgd(0.01), c, x.shape[1:], 0)
    wire = train.step_wire_cost(model, c, state)
    # Three BN layers of 32, 64, 64 channels: mean and mean of squares forward, their cotangents backward.
    assert wire["bn_words"] == 4 * (32 + 64 + 64)
    assert wire["words"] == wire["grad_words"] + wire["bn_words"]
    step = jax.pmap(train.make_step(model, optax.sgd(0.01), c, return_message=True), axis_name=train.AXIS)
    xs, ys = train.shard_batch(x[:64], ds.y_train[:64], 8)
    _, _, msg = step(train.replicate(state, 8), xs, ys)
    bn = msg["bn"]["norm0"]["BatchNorm_0"]
    assert set(bn) == {"sent", "received", "grad_sent", "grad_received"}
    local_mean = np.asarray(bn["sent"][:, 0])
    assert local_mean.shape == (8, 32)  # one local statistic per worker and channel
    assert not np.allclose(local_mean[0], local_mean[1])  # each worker's own batch
    # The all-reduces: every worker receives the mean of what all sent, forward and backward.
    np.testing.assert_allclose(np.asarray(bn["received"][3]), np.asarray(bn["sent"]).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(bn["grad_received"][3]), np.asarray(bn["grad_sent"]).mean(0), rtol=1e-4, atol=1e-7
    )
    # What worker 3 contributes is the statistic of its own shard of the batch.
    first_conv = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        jnp.asarray(xs[3]),
        train=False,
        capture_intermediates=True,
        mutable=["intermediates"],
    )[1]
    conv_out = first_conv["intermediates"]["Conv_0"]["__call__"][0]
    np.testing.assert_allclose(local_mean[3], np.asarray(conv_out).mean((0, 1, 2)), rtol=1e-4, atol=1e-5)


def _all_reduced_words(model, state, x, y, workers: int) -> int:
    """Elements all-reduced by the compiled train step, read off its HLO."""
    step = jax.pmap(train.make_step(model, optax.sgd(0.01), compress.none()), axis_name=train.AXIS)
    xs, ys = train.shard_batch(x, y, workers)
    hlo = step.lower(train.replicate(state, workers), xs, ys).compile().as_text()
    total = 0
    for shape in re.findall(r"= \(?((?:f32\[[\d,]*\][^ ]*(?:, )?)+)\)? all-reduce\(", hlo):
        for dims in re.findall(r"f32\[([\d,]*)\]", shape):
            total += int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    return total


def test_sync_batchnorm_wire_count_matches_the_compiled_all_reduces(mnist):
    """sync_bn_words counts what the compiled step really all-reduces for BatchNorm: forward and backward."""
    ds, x, _ = mnist
    xs, ys = x[:16], ds.y_train[:16]
    words = {}
    for norm in ("batch", "batch_local"):
        model = models.make_model("convnet", 10, norm=norm, axis_name=train.AXIS, width=8)
        state = train.init_state(model, optax.sgd(0.01), compress.none(), x.shape[1:], 0)
        words[norm] = _all_reduced_words(model, state, xs, ys, 8)
    sync = models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS, width=8)
    state = train.init_state(sync, optax.sgd(0.01), compress.none(), x.shape[1:], 0)
    assert words["batch"] - words["batch_local"] == train.sync_bn_words(sync, state.batch_stats) == 4 * (8 + 16 + 16)


def test_shard_map_step_equals_pmap_step(mnist):
    ds, x, _ = mnist
    model = models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS)
    opt = optax.sgd(0.05, momentum=0.9)
    params = models.init_variables(model, jax.random.key(0), x.shape[1:])["params"]
    for c in (compress.powersgd(rank=2), compress.topk_level(params, 2)):
        step = train.make_step(model, opt, c)
        s_p = train.replicate(train.init_state(model, opt, c, x.shape[1:], 0), 8)
        s_s = train.replicate(train.init_state(model, opt, c, x.shape[1:], 0), 8)
        run_p = jax.pmap(step, axis_name=train.AXIS)
        run_s = train.shard_map_step(step, Mesh(np.array(jax.devices()), (train.AXIS,)))
        for i in range(3):
            xs, ys = train.shard_batch(x[64 * i : 64 * (i + 1)], ds.y_train[64 * i : 64 * (i + 1)], 8)
            s_p, m_p = run_p(s_p, xs, ys)
            s_s, m_s = run_s(s_s, xs, ys)
        for a, b in zip(jax.tree.leaves(s_p.params), jax.tree.leaves(s_s.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
        # unreplicate reads device 0's shard: a one-device result, so no program spans the 8 devices (the
        # eager x[0] of a sharded array does, and such programs between steps deadlocked simulated devices).
        for tree in (s_p.params, s_s.params):
            for first, stacked in zip(jax.tree.leaves(train.unreplicate(tree)), jax.tree.leaves(tree), strict=True):
                assert len(stacked.sharding.device_set) == 8 and len(first.sharding.device_set) == 1
                np.testing.assert_array_equal(np.asarray(first), np.asarray(stacked)[0])


def test_compressed_training_reaches_uncompressed_accuracy_on_real_mnist(mnist):
    ds, x, xt = mnist
    acc = {}
    for spec in ("none", "powersgd:2", "topk_level:2"):
        model = models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS)
        params = models.init_variables(model, jax.random.key(0), x.shape[1:])["params"]
        r = train.fit(
            model, compress.from_spec(spec, params), x, ds.y_train, steps=150, global_batch=64, seed=0, progress=False
        )
        acc[spec] = train.evaluate(model, r.state.params, r.state.batch_stats, xt, ds.y_test)["accuracy"]
        if spec != "none":
            assert r.wire["grad_words"] < 0.15 * r.wire["uncompressed_words"]
    assert acc["none"] > 0.9, acc  # the run really trains
    for spec in ("powersgd:2", "topk_level:2"):
        assert acc[spec] >= acc["none"] - 0.02, acc


def test_bad_batch_and_nonfinite_data_raise(mnist):
    ds, x, _ = mnist
    model = models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        train.fit(model, compress.none(), x, ds.y_train, steps=1, global_batch=60, progress=False)
    bad = x[:256].copy()
    bad[:] = np.nan
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        train.fit(
            model, compress.powersgd(2), bad, ds.y_train[:256], steps=2, global_batch=64, progress=False, log_every=1
        )


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_apply_identical_updates(tmp_path):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=ROOT)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.train",
                "--steps=15",
                "--batch_size=32",
                "--compressor=powersgd:2",
                f"--workdir={tmp_path / str(i)}",
                "--checkpoint=false",
                "--progress=false",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    sums = [re.search(r"process \d param_abs_sum (\S+)", o).group(1) for o in outs]
    assert sums[0] == sums[1], sums
    assert "4 devices in 2 process(es)" in outs[0]


def test_fit_many_trains_the_same_models_as_sequential_fits(mnist):
    ds, x, _ = mnist
    x, y = x[:512], ds.y_train[:512]
    rng = np.random.default_rng(0)
    masks = np.stack([rng.random(512) < 0.5, rng.random(512) < 0.5])
    model = models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS, width=8, conv_impl="patches")
    c = compress.powersgd(rank=1)
    kept = {}
    many = train.fit_many(
        model, c, x, y, masks, [3, 4], steps=6, global_batch=64, snapshot_steps=[3], on_snapshot=kept.setdefault
    )
    for k, seed in enumerate([3, 4]):
        for steps, got in ((6, many[k]), (3, kept[3][k])):  # the final models and the snapshot, in model order
            one = train.fit(model, c, x[masks[k]], y[masks[k]], steps=steps, global_batch=64, seed=seed, progress=False)
            for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(one.state.params)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
    "h,cin,cout,k,stride,padding",
    [
        (8, 3, 16, 3, 1, ((1, 1), (1, 1))),  # the ResNet stem / 3x3 convs
        (8, 16, 32, 3, 2, ((1, 1), (1, 1))),  # strided 3x3
        (8, 16, 32, 1, 2, ((0, 0), (0, 0))),  # 1x1 shortcut
        (9, 4, 5, 3, 2, "SAME"),
        (7, 4, 5, 3, 1, "VALID"),
    ],
)
def test_patches_conv_equals_native_conv_to_second_order(h, cin, cout, k, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, h, h, cin))
    kw = dict(features=cout, kernel_size=(k, k), strides=stride, padding=padding, use_bias=True)
    native, patches = nn.Conv(**kw, precision="highest"), models.PatchesConv(**kw)
    params = native.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
    assert jax.tree.structure(patches.init(jax.random.key(1), x)) == jax.tree.structure(params)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(patches.apply(params, x), native.apply(params, x), rtol=1e-5, atol=1e-4)

        # The attack differentiates the weight gradient w.r.t. the input: compare that mixed second derivative.
        def weight_grad_norm(layer):
            return lambda x: sum(
                jnp.sum(g**2) for g in jax.tree.leaves(jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply(p, x))))(params))
            )

        np.testing.assert_allclose(
            jax.grad(weight_grad_norm(patches))(x), jax.grad(weight_grad_norm(native))(x), rtol=1e-4, atol=1e-2
        )


def test_a_snapshot_is_the_model_fit_returns_at_that_step(mnist):
    ds, x, _ = mnist
    x, y = x[:256], ds.y_train[:256]
    model = models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS, width=8)
    c = compress.powersgd(rank=1)
    kept = {}
    train.fit(
        model,
        c,
        x,
        y,
        steps=5,
        global_batch=64,
        progress=False,
        snapshot_steps=[2, 4],
        on_snapshot=lambda n, st: kept.setdefault(n, jax.device_get(st.params)),
    )
    assert sorted(kept) == [2, 4]
    for n in (2, 4):
        short = train.fit(model, c, x, y, steps=n, global_batch=64, progress=False).state
        for a, b in zip(jax.tree.leaves(kept[n]), jax.tree.leaves(short.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="snapshot_steps must lie in"):
        train.fit(model, c, x, y, steps=3, global_batch=64, progress=False, snapshot_steps=[4], on_snapshot=print)


def test_sync_batchnorm_is_flax_batchnorm_written_out():
    """models.SyncBatchNorm computes what nn.BatchNorm(axis_name=...) computes: output, buffers, every gradient."""

    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, axis_name=train.AXIS)(x)

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x):
            return models.SyncBatchNorm(train.AXIS, name="BatchNorm_0")(x)

    x = 2 * jax.random.normal(jax.random.key(1), (4, 2, 5, 5, 3)) + 1
    variables = {
        "params": {"BatchNorm_0": {"scale": jnp.arange(1.0, 4.0), "bias": jnp.ones(3)}},
        "batch_stats": {"BatchNorm_0": {"mean": jnp.full(3, 0.5), "var": jnp.full(3, 2.0)}},
    }

    def run(module):
        def one(x):
            def loss(params, x):
                y, upd = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
                return jnp.sum(jnp.sin(y) * jnp.arange(75.0).reshape(5, 5, 3)), (y, upd)

            (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
            return out, grads

        return jax.pmap(one, axis_name=train.AXIS, devices=jax.local_devices()[:4])(x)

    leaves = zip(jax.tree.leaves(run(Flax())), jax.tree.leaves(run(Ours())), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
