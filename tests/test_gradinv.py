"""Gradient inversion: it reconstructs real images, compression hurts it, metrics and errors are right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustsgd_jax import compress, data, metrics, models, train
from trustsgd_jax.attacks import audit, errors, factored, gradients, invert, labels, objectives, victim

CFG = invert.AttackConfig(iterations=400, chunk=100, parallel=4)


def one_worker_message(model, variables, x, y, compressor, bn_statistics="eval", comp_state=None):
    """Worker 0's message in a one-worker round (a real round of the training step)."""
    round_ = victim.make_round(model, compressor, workers=1, bn_statistics=bn_statistics)
    return round_(variables, x[None], y[None], comp_state).message


@pytest.fixture(scope="module")
def cifar():
    ds = data.load("cifar10", source="sample")
    model = models.make_model("convnet", 10, norm="batch", conv_impl="patches")
    variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
    return ds, model, variables


@pytest.fixture(scope="module")
def ssim_by_setting(cifar):
    ds, model, variables = cifar
    # Two real images, each attacked as its own victim batch.
    x, y = data.normalize(ds.x_train[[3, 140]], "cifar10"), ds.y_train[[3, 140]]
    out = {}
    # Top-K's observed SSIM comes from `strongest`'s own `observed` candidate (the same seeds and budget), so
    # the comparison needs no fourth attack.
    for spec, threat in [("none", "observed"), ("powersgd:1", "observed"), ("topk_level:1", "strongest")]:
        r = audit.audit(
            model,
            variables,
            x,
            y,
            compress.from_spec(spec, variables["params"]),
            dataset="cifar10",
            threat=threat,
            config=CFG,
            workers=1,
            bn_statistics="eval",
            batchnorm="sync",
            progress=False,
        )
        assert np.isfinite(r.per_image["ssim"]).all()
        out[spec, threat] = r.summary["ssim"]["mean"]
        if threat == "strongest":
            out[spec, "observed"] = float(np.mean(r.candidate_ssim["observed"]))
    return out


def test_uncompressed_attack_reconstructs_real_images(ssim_by_setting):
    assert ssim_by_setting["none", "observed"] > 0.7, ssim_by_setting


def test_powersgd_rank1_leaks_clearly_less(ssim_by_setting):
    assert ssim_by_setting["powersgd:1", "observed"] < ssim_by_setting["none", "observed"] - 0.2, ssim_by_setting


def test_factored_gradients_equal_plain_autodiff(cifar):
    """The attack's objective keeps convolution weight gradients as P^T D: same values, same input gradient."""
    ds = cifar[0]
    # 16x16 inputs (real images, every other pixel): the first layer takes the explicit route, the last the Gram one.
    model = models.make_model("convnet", 10, norm="batch", conv_impl="patches")
    variables = models.init_variables(model, jax.random.key(1), (16, 16, 3))
    x = data.normalize(ds.x_train[:2, ::2, ::2], "cifar10")
    y = jnp.asarray(ds.y_train[:2].astype(np.int32))
    plain = jax.tree.leaves(jax.jit(gradients.param_grads, static_argnums=0)(model, variables, x, y))
    fact = jax.jit(gradients.factored_param_grads, static_argnums=0)(model, variables, x, y)
    routes = set()
    for p, f in zip(plain, fact):
        if isinstance(f, factored.Factored):
            rows, k, c = f.patches.size // f.patches.shape[-1], f.patches.shape[-1], f.cotangent.shape[-1]
            routes.add(rows * (k + c) < k * c)  # True: the Gram route
            f = f.dense(p.shape)
        np.testing.assert_allclose(f, p, rtol=1e-4, atol=1e-6)
    assert routes == {True, False}, "both the Gram and the explicit route should be exercised"
    # A target from other images; the linear weights make the tensor order matter.
    target = jax.tree.leaves(gradients.param_grads(model, variables, x[::-1] + 0.5, y))
    w = objectives.tensor_weights(len(target), "linear")
    loss_plain = lambda z: objectives.cosine_distance(
        jax.tree.leaves(gradients.param_grads(model, variables, z, y)), target, w
    )
    loss_factored = lambda z: objectives.cosine_distance(
        gradients.factored_param_grads(model, variables, z, y), target, w
    )
    np.testing.assert_allclose(jax.jit(loss_factored)(x), jax.jit(loss_plain)(x), rtol=1e-5)
    g_plain, g_factored = jax.jit(jax.grad(loss_plain))(x), jax.jit(jax.grad(loss_factored))(x)
    assert float(jnp.linalg.norm(g_factored - g_plain) / jnp.linalg.norm(g_plain)) < 1e-4


def test_native_and_patches_models_are_the_same_model(cifar):
    ds = cifar[0]
    x = data.normalize(ds.x_train[:2], "cifar10")
    for name, width in (("convnet", 32), ("resnet18", 8)):
        native = models.make_model(name, 10, norm="batch", conv_impl="xla", width=width)
        patches = models.make_model(name, 10, norm="batch", conv_impl="patches", width=width)
        v_native = models.init_variables(native, jax.random.key(0), (32, 32, 3))
        v_patches = models.init_variables(patches, jax.random.key(0), (32, 32, 3))
        assert jax.tree.structure(v_native) == jax.tree.structure(v_patches)  # checkpoints interchange
        for a, b in zip(jax.tree.leaves(v_native), jax.tree.leaves(v_patches)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(patches.apply(v_native, x), native.apply(v_native, x), rtol=1e-4, atol=1e-5)


def test_adaptive_powersgd_matches_projected_gradient(cifar):
    ds, model, variables = cifar
    x, y = data.normalize(ds.x_train[:1], "cifar10"), ds.y_train[:1]
    msg = one_worker_message(model, variables, x, y, compress.powersgd(2))
    grads = gradients.param_grads(model, variables, x, y)
    # At the true image the adaptive features coincide: M(x)^T P_hat == sent Q.
    a = objectives.dummy_features(grads, msg, "factors")
    b = objectives.target_features(msg, "factors")
    assert float(objectives.cosine_distance(a, b, [1.0] * len(a))) < 1e-5
    assert any(isinstance(m, compress.LowRank) for m in objectives.message_leaves(msg))


def test_cosine_distance_and_tv_by_hand():
    a, b = [jnp.array([1.0, 0.0]), jnp.array([0.0])], [jnp.array([1.0, 1.0]), jnp.array([0.0])]
    np.testing.assert_allclose(objectives.cosine_distance(a, b, [1.0, 1.0]), 1 - 1 / np.sqrt(2), rtol=1e-6)
    x = jnp.zeros((1, 2, 3, 1)).at[0, 0, 0, 0].set(1.0)
    # |dH|: one of 3 differences is 1 -> 1/3; |dW|: one of 4 -> 1/4.
    np.testing.assert_allclose(objectives.total_variation(x), 1 / 3 + 1 / 4, rtol=1e-6)


def test_metrics_identity_and_hand_computed_values():
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(3, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(metrics.ssim(img, img), 1.0, atol=1e-5)
    assert (metrics.psnr(img, img) == metrics.PSNR_CAP).all()
    a, b = np.full((1, 16, 16, 1), 0.5, np.float32), np.full((1, 16, 16, 1), 0.25, np.float32)
    c1 = 0.01**2
    np.testing.assert_allclose(metrics.ssim(a, b), (2 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1), rtol=1e-4)
    np.testing.assert_allclose(metrics.mse(a, b), 0.0625, rtol=1e-6)
    np.testing.assert_allclose(metrics.psnr(a, b), 10 * np.log10(1 / 0.0625), rtol=1e-5)
    with pytest.raises(ValueError, match="equal shape"):
        metrics.ssim(a, img)


def test_hungarian_matching_recovers_a_shuffled_batch():
    ds = data.load("cifar10", source="sample")
    batch = ds.x_train[:6].astype(np.float32) / 255
    perm = np.array([4, 0, 5, 2, 1, 3])
    shuffled = batch[perm] + 0.05 * np.random.default_rng(1).normal(size=batch.shape).astype(np.float32)
    order = metrics.match(batch, shuffled)
    np.testing.assert_array_equal(perm[order], np.arange(6))


def test_idlg_infers_labels_untrained_and_trained():
    ds = data.load("mnist", source="sample")
    x, y = data.normalize(ds.x_train, "mnist"), ds.y_train
    model = models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS)
    fitted = train.fit(model, compress.none(), x, y, steps=30, global_batch=64, progress=False)
    eval_model = models.make_model("convnet", 10, norm="batch")
    untrained = models.init_variables(eval_model, jax.random.key(3), (28, 28, 1))
    trained = {"params": fitted.state.params, "batch_stats": fitted.state.batch_stats}
    idx = np.arange(0, 4000, 400)  # one image of every class
    round_ = victim.make_round(eval_model, compress.none(), workers=1, bn_statistics="eval")  # compiled once
    for variables in (untrained, trained):
        for i in idx:
            msg = round_(variables, x[None, i : i + 1], y[None, i : i + 1]).message
            assert labels.infer_labels_idlg(msg, 10)[0] == y[i]


def test_bad_inputs_raise_clear_errors(cifar):
    ds, model, variables = cifar
    x, y = data.normalize(ds.x_train[:1], "cifar10"), ds.y_train[:1]
    c = compress.none()
    kw = dict(dataset="cifar10", config=CFG, progress=False)
    with pytest.raises(errors.AttackError, match="applying the model to one image of shape"):
        audit.audit(model, variables, np.zeros((1, 28, 28, 1), np.float32), y, c, **kw)
    with pytest.raises(errors.AttackError, match="normalised floats"):
        audit.audit(model, variables, ds.x_train[:1], y, c, **kw)
    with pytest.raises(errors.AttackError, match=r"labels must lie in \[0, 10\)"):
        audit.audit(model, variables, x, np.array([10]), c, **kw)
    with pytest.raises(errors.AttackError, match="iterations >= 1"):
        audit.audit(model, variables, x, y, c, dataset="cifar10", config=CFG._replace(iterations=0))
    with pytest.raises(errors.AttackError, match="unknown threat"):
        audit.audit(model, variables, x, y, c, threat="oracle", **kw)
    other = models.make_model("convnet", 10, norm="batch", width=8)
    other_vars = models.init_variables(other, jax.random.key(0), (32, 32, 3))
    foreign = one_worker_message(other, other_vars, x, y, c)
    with pytest.raises(errors.AttackError, match="another model"):
        invert.invert_gradients(model, variables, [foreign], y[None], (32, 32, 3), "cifar10", config=CFG)
    zeros = jax.tree.map(jnp.zeros_like, variables["params"])
    zero_msg = c.reduce(zeros, c.init(variables["params"]), None)[2]
    with pytest.raises(errors.AttackError, match="all zeros"):
        invert.invert_gradients(model, variables, [zero_msg], y[None], (32, 32, 3), "cifar10", config=CFG)


def test_attack_at_step_t_of_a_real_compressed_run():
    """At step t the round starts from a real 4-worker run's state: error memory and the warm-started Q."""
    ds = data.load("mnist", source="sample")
    x, y = data.normalize(ds.x_train, "mnist"), ds.y_train
    dp = models.make_model("convnet", 10, norm="batch_local", axis_name=train.AXIS)
    c = compress.powersgd(rank=1)
    fitted = train.fit(dp, c, x, y, steps=5, global_batch=64, progress=False, devices=jax.local_devices()[:4])
    states = fitted.state.comp_state
    assert np.asarray(states.step).tolist() == [5] * 4
    assert max(float(jnp.abs(m[0]).max()) for m in jax.tree.leaves(states.memory)) > 0
    model = models.make_model("convnet", 10, norm="batch")
    variables = {"params": fitted.state.params, "batch_stats": fitted.state.batch_stats}
    ids = np.array([0, 1, 2, 3])
    round_ = victim.make_round(model, c, workers=4, bn_statistics="train", batchnorm="local")
    later = round_(variables, x[ids][:, None], y[ids][:, None], states).message
    first = round_(variables, x[ids][:, None], y[ids][:, None]).message
    assert not np.allclose(
        compress.decompress(later)["Conv_1"]["kernel"], compress.decompress(first)["Conv_1"]["kernel"]
    )
    r = audit.audit(
        model,
        variables,
        x[:1],
        y[:1],
        c,
        dataset="mnist",
        config=CFG._replace(iterations=50),
        workers=4,
        other_images=x[1:4][None, :, None],
        other_labels=y[1:4][None, :, None],
        bn_statistics="train",
        batchnorm="local",
        comp_state=states,
        step=5,
        progress=False,
    )
    assert np.isfinite(r.per_image["ssim"]).all() and r.iterations == 50
    assert r.setting == dict(
        workers=4,
        batch=1,
        observer="worker",
        bn_statistics="train",
        batchnorm="local",
        step=5,
        adapter="project-model",
        train_argument=True,
        batchnorm_sync="local",
        loss="cross_entropy",
    )


def test_linear_layer_weights_follow_depth_on_resnet18():
    """Flax sorts parameter names (``fc`` first); the forward pass decides: the stem weighs most, the head least."""
    model = models.make_model("resnet18", 10, norm="batch", width=8)
    variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"])]
    w = objectives.tensor_weights(len(paths), "linear", objectives.forward_order(model, variables, (32, 32, 3)))
    by_path = dict(zip(paths, w, strict=True))
    assert by_path["['stem_conv']['kernel']"] == 1.0 == max(w)
    assert by_path["['fc']['bias']"] == min(w) and by_path["['fc']['kernel']"] > by_path["['fc']['bias']"]
    assert by_path["['layer1_0']['conv1']['kernel']"] > by_path["['layer4_1']['conv2']['kernel']"]
    assert paths[0].startswith("['fc']")  # leaf order alone would have put the head first


def test_attacks_spread_over_8_devices_equal_one_device(cifar):
    """invert_gradients over the 8 simulated devices (shard_map over the attack axis) = the same attacks on one."""
    ds, _, _ = cifar
    model = models.make_model("convnet", 10, norm="batch", width=8)
    variables = models.init_variables(model, jax.random.key(0), (16, 16, 3))
    x = data.normalize(ds.x_train[:4, ::2, ::2], "cifar10")
    y = ds.y_train[:4]
    # SGD: `strongest` then has one objective, and its candidates are the 2 restarts (one program to compile;
    # PowerSGD's three objectives tripled the compile time of both placements).
    c = compress.none()
    msgs = [one_worker_message(model, variables, x[i : i + 1], y[i : i + 1], c) for i in range(4)]
    out = {}
    for devices in (1, 8):
        # 4 batches x 2 restarts = 8 attacks: one per device, or all 8 vmapped on one.
        cfg = invert.AttackConfig(iterations=30, chunk=15, restarts=2, parallel=8, devices=devices)
        out[devices] = invert.invert_gradients(
            invert.attack_model(model),
            variables,
            msgs,
            y[:, None],
            (16, 16, 3),
            "cifar10",
            threat="strongest",
            config=cfg,
            progress=False,
        )
    assert len(jax.local_devices()) == 8
    np.testing.assert_allclose(out[8].images, out[1].images, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[8].loss, out[1].loss, rtol=1e-4, atol=1e-6)
    assert out[8].chosen == out[1].chosen
    with pytest.raises(errors.AttackError, match="local devices exist"):
        invert.attack_devices(invert.AttackConfig(devices=9))


def test_attack_on_a_message_from_a_pmapped_round_runs_on_one_device(cifar):
    """A round's message is replicated over its N devices; the attack must not run replicated on all of them."""
    ds, _, _ = cifar
    model = models.make_model("convnet", 10, norm="batch", width=8)
    variables = models.init_variables(model, jax.random.key(0), (16, 16, 3))
    x = data.normalize(ds.x_train[:2, ::2, ::2], "cifar10")
    y = ds.y_train[:2].astype(np.int32)
    round_ = victim.make_round(model, compress.none(), workers=2, bn_statistics="eval", batchnorm="local")
    msg = round_(variables, x[:, None], y[:, None]).message
    assert len(jax.tree.leaves(msg)[0].devices()) == 2  # what the round hands over
    cfg = invert.AttackConfig(iterations=2, chunk=2, parallel=1, devices=1)
    attack = invert.compile_attack(
        invert.attack_model(model), variables, "observed", cfg, "cifar10", (16, 16, 3), train=False, width=1
    )
    xs = jnp.zeros((1, 1, 16, 16, 3))
    out, _, _ = attack.run_chunk(xs, attack.init(xs), jax.tree.map(lambda t: t[None], msg), jnp.asarray(y[None, :1]), 2)
    assert out.devices() == {jax.local_devices()[0]}
