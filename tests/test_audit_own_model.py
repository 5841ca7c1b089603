"""Auditing your own Flax module, data and loss: the adapters, the checks before any round, the recorded setting."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trustsgd_jax import compress, data, models
from trustsgd_jax.attacks import audit, errors, invert, objectives, victim

# Your own data: 16x16 RGB images with their own normalisation (the CIFAR-10 sample, subsampled, stands in).
STATS = data.DatasetStats(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), image_shape=(16, 16, 3), num_classes=10)
FAST = invert.AttackConfig(iterations=30, chunk=30)


class PlainCNN(nn.Module):
    """A user's CNN: no ``axis_name`` field, no ``train`` argument, no BatchNorm."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class BatchNormCNN(nn.Module):
    """A user's CNN with BatchNorm and a ``train`` argument; ``sync_over`` its own name for a synchronised axis."""

    sync_over: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=2, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.sync_over)(x)
        x = nn.relu(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class TupleOut(nn.Module):
    @nn.compact
    def __call__(self, x):
        features = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(features), features


class VectorOut(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1)).sum(-1)


def weighted_ce(logits, labels):
    """Class-weighted softmax cross-entropy, per example (class c weighs 1 + c): a loss for imbalanced data.

    Unlike label smoothing, it turns the gradient of a batch of two classes, not only its length: at an untrained
    model's near-uniform softmax, label smoothing scales every example's logit gradient by about the same factor.
    """
    return (1.0 + labels) * optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@pytest.fixture(scope="module")
def images():
    ds = data.load("cifar10", source="sample")
    x = data.normalize(ds.x_train[:8, ::2, ::2], STATS)
    return x, ds.y_train[:8]


def init(model, x):
    return dict(model.init(jax.random.key(0), x[:1]))


def others(x, y, workers):
    """Workers 1..N-1 of one round, for victim image 0: [1, N-1, 1, ...]."""
    return x[1:workers][None, :, None], y[1:workers][None, :, None]


def test_wrapper_keeps_the_parameter_tree_and_the_function(images):
    x, _ = images
    for model in (PlainCNN(), BatchNormCNN()):
        variables = init(model, x)
        wrapped = models.adapt(model)
        assert isinstance(wrapped, models.OwnModule)
        assert jax.tree.structure(dict(wrapped.init(jax.random.key(0), x[:1]))) == jax.tree.structure(variables)
        np.testing.assert_array_equal(wrapped.apply(variables, x), model.apply(variables, x))
        for form in (models.for_attack(model), models.for_data_parallel(model, models.BatchNormSetting(), "batch")):
            np.testing.assert_array_equal(form.apply(variables, x, train=False), model.apply(variables, x))
    bn = BatchNormCNN()
    variables = init(bn, x)
    got = models.adapt(bn).apply(variables, x, train=True, mutable=["batch_stats"])
    want = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert models.train_keyword(PlainCNN()) is None and models.train_keyword(bn) == "train"
    assert models.train_keyword(bn, False) is None
    with pytest.raises(ValueError, match="takes no argument 'training'"):
        models.train_keyword(bn, "training")


def test_own_cnn_without_axis_name_or_train_is_audited_at_4_workers(images):
    x, y = images
    model = PlainCNN()
    ox, oy = others(x, y, 4)
    r = audit.audit(
        model,
        init(model, x),
        x[:1],
        y[:1],
        compress.none(),
        dataset=STATS,
        workers=4,
        other_images=ox,
        other_labels=oy,
        config=FAST,
        progress=False,
    )
    assert np.isfinite(r.per_image["ssim"]).all() and r.reconstructions.shape == (1, 16, 16, 3)
    assert r.setting == dict(
        workers=4,
        batch=1,
        observer="worker",
        bn_statistics="train",
        batchnorm="local",
        step=0,
        adapter="wrapped-user-module",
        train_argument=False,
        batchnorm_sync="none",
        loss="cross_entropy",
    )


@pytest.mark.parametrize("statistics", ["train", "eval"])
def test_own_cnn_with_batchnorm_local_in_both_statistics_modes(images, statistics):
    x, y = images
    model = BatchNormCNN()
    variables = init(model, x)
    ox, oy = others(x, y, 2)
    r = audit.audit(
        model,
        variables,
        x[:1],
        y[:1],
        compress.none(),
        dataset=STATS,
        workers=2,
        other_images=ox,
        other_labels=oy,
        bn_statistics=statistics,
        config=FAST,
        progress=False,
    )
    assert np.isfinite(r.per_image["ssim"]).all()
    assert r.setting["train_argument"] is True and r.setting["batchnorm_sync"] == "local"
    assert r.setting["bn_statistics"] == statistics
    # With local BatchNorm the attacker's model of the victim is exact in either mode: the objective vanishes at
    # the truth (two images per worker, so train-mode statistics are not degenerate).
    round_ = victim.make_round(model, compress.none(), workers=2, bn_statistics=statistics, batchnorm="local")
    msg = round_(variables, x[:4].reshape(2, 2, 16, 16, 3), y[:4].reshape(2, 2)).message
    weights = [1.0] * len(jax.tree.leaves(variables["params"]))
    attacker = invert.attack_model(model)
    loss = jax.jit(objectives.matching_loss(attacker, variables, "observed", weights, statistics == "train"))
    assert float(loss(jnp.asarray(x[:2]), msg, jnp.asarray(y[:2]))) < 1e-5


def test_own_cnn_with_synchronised_batchnorm_needs_its_axis_declared(images, monkeypatch):
    x, y = images
    ox, oy = others(x, y, 2)
    kw = dict(dataset=STATS, workers=2, other_images=ox, other_labels=oy, config=FAST, progress=False)
    synced = BatchNormCNN(sync_over="batch")
    variables = init(BatchNormCNN(), x)
    r = audit.audit(synced, variables, x[:1], y[:1], compress.none(), batchnorm="sync", batchnorm_axis="batch", **kw)
    assert np.isfinite(r.per_image["ssim"]).all() and r.setting["batchnorm_sync"] == "sync-user-axis:batch"
    # The round really all-reduced the statistics: worker 0's message depends on worker 1's images.
    rounds = {
        "sync": victim.make_round(synced, compress.none(), workers=2, batchnorm="sync"),
        "local": victim.make_round(BatchNormCNN(), compress.none(), workers=2, batchnorm="local"),
    }
    pair = (x[:4].reshape(2, 2, 16, 16, 3), y[:4].reshape(2, 2))
    msgs = {k: compress.decompress(f(variables, *pair).message) for k, f in rounds.items()}
    assert not np.allclose(msgs["sync"]["Dense_0"]["kernel"], msgs["local"]["Dense_0"]["kernel"])

    def no_round(*args, **kwargs):
        raise AssertionError("a round ran before the arguments were checked")

    monkeypatch.setattr(victim, "make_round", no_round)
    cases = [
        (synced, dict(batchnorm="sync"), "needs the axis name its nn.BatchNorm"),
        (BatchNormCNN(), dict(batchnorm="sync", batchnorm_axis="batch"), "does not reduce over axis 'batch'"),
        (BatchNormCNN(sync_over="data"), {}, "synchronises over an axis"),
    ]
    for model, extra, message in cases:
        with pytest.raises(errors.AttackError, match=message) as e:
            audit.audit(model, variables, x[:1], y[:1], compress.none(), **extra, **kw)
        assert "\n" not in str(e.value)


def test_a_custom_loss_changes_the_message_and_the_attacker_uses_it(images):
    x, y = images
    pair = [0, int(np.flatnonzero(y != y[0])[0])]  # two images of different classes
    xb, yb = jnp.asarray(x[pair]), jnp.asarray(y[pair])
    convnet = models.make_model("convnet", 10, norm="none", width=8)
    cases = [
        (PlainCNN(), init(PlainCNN(), x)),  # autodiff of a user's module
        # The project's ConvNet: its attack form takes the kernels' gradients as factors (attacks.factored).
        (convnet, models.init_variables(convnet, jax.random.key(0), (16, 16, 3))),
    ]
    for model, variables in cases:
        rounds = {
            name: victim.make_round(model, compress.none(), workers=1, loss_fn=fn)
            for name, fn in (("weighted", weighted_ce), ("ce", optax.softmax_cross_entropy_with_integer_labels))
        }
        msg = {name: round_(variables, xb[None], yb[None]).message for name, round_ in rounds.items()}
        heads = [jax.tree.leaves(compress.decompress(msg[k]))[-1] for k in ("weighted", "ce")]
        assert not np.allclose(*heads)
        weights = [1.0] * len(jax.tree.leaves(variables["params"]))
        attacker = invert.attack_model(model)
        matching = functools.partial(objectives.matching_loss, attacker, variables, "observed", weights, True)
        with_loss = jax.jit(matching(loss_fn=weighted_ce))
        plain = jax.jit(matching())
        assert float(with_loss(xb, msg["weighted"], yb)) < 1e-5, type(model).__name__
        assert float(plain(xb, msg["weighted"], yb)) > 1e-3, type(model).__name__
    model = PlainCNN()
    r = audit.audit(
        model,
        init(model, x),
        x[:1],
        y[:1],
        compress.none(),
        dataset=STATS,
        workers=1,
        loss_fn=weighted_ce,
        config=invert.AttackConfig(iterations=10, chunk=10),
        progress=False,
    )
    assert r.setting["loss"] == "weighted_ce" and np.isfinite(r.matching_loss).all()


def test_bad_input_is_one_line_before_any_round(images, monkeypatch):
    x, y = images
    plain = PlainCNN()
    variables = init(plain, x)
    calls = []
    monkeypatch.setattr(victim, "make_round", lambda *a, **k: calls.append(1))
    ox, oy = others(x, y, 4)
    kw = dict(dataset=STATS, other_images=ox, other_labels=oy, progress=False)
    cases = [
        (TupleOut(), {}, "returned a tuple"),
        (VectorOut(), {}, r"shape \(1,\)"),
        (plain, dict(images=x[:1, :8, :8]), "applying the model to one image of shape"),
        (plain, dict(labels=np.array([10])), r"labels must lie in \[0, 10\)"),
        (plain, dict(workers=9), "needs 9 local devices"),
        (plain, dict(dataset="svhn"), r"pass dataset=data.DatasetStats\("),
        (plain, dict(label_mode="idlg", loss_fn=weighted_ce), "label_mode='known'"),
        (plain, dict(loss_fn=lambda logits, labels: weighted_ce(logits, labels).mean()), "per-example losses"),
        (plain, dict(config=invert.AttackConfig(matmul_dtype="bfloat16")), "needs one of the project's models"),
        (plain, dict(train_argument="training"), "takes no argument 'training'"),
        (plain, dict(dataset=data.stats("cifar10")), r"images have shape \(16, 16, 3\) but the dataset's"),
    ]
    for model, change, message in cases:
        args = dict(images=x[:1], labels=y[:1], **kw)
        args.update(change)
        v = variables if model is plain else init(model, x)
        with pytest.raises(errors.AttackError, match=message) as e:
            audit.audit(model, v, args.pop("images"), args.pop("labels"), compress.none(), **args)
        assert "\n" not in str(e.value), message
    assert not calls


def test_defaults_and_the_progress_plan():
    assert invert.AttackConfig().iterations == 1000 and invert.PAPER_ITERATIONS == 24_000
    assert audit.default_workers() == 4  # 8 simulated devices: the runner's N
    # 2 batches x 1 restart, 5 objectives, parallel 8: one program of width 2 holds 4 objectives side by side,
    # so two programs run one after another, and the bar counts 2 x iterations.
    plan = invert.attack_plan(2, ["a", "b", "c", "d", "e"], invert.AttackConfig(parallel=8, devices=1))
    assert plan.width == 2 and plan.groups == [("a", "b", "c", "d"), ("e",)] and plan.programs == 2
