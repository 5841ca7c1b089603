"""The attacked message is the training step's own output: N workers, BatchNorm modes, observers, bad input."""

import jax
import numpy as np
import optax
import pytest

from trustsgd_jax import compress, data, models, train
from trustsgd_jax.attacks import audit, errors, invert, victim


@pytest.fixture(scope="module")
def mnist():
    ds = data.load("mnist", source="sample")
    return data.normalize(ds.x_train[:64], "mnist"), ds.y_train[:64]


def tiny_model(norm="batch"):
    return models.make_model("convnet", 10, norm=norm, width=8)


def trainer_messages(model, compressor, x, y, workers, batchnorm):
    """What the trainer's own data-parallel step returns on `workers` devices (all workers' messages)."""
    dp = victim.data_parallel_model(model, batchnorm)
    opt = optax.sgd(0.1, momentum=0.9)
    state = train.replicate(train.init_state(dp, opt, compressor, x.shape[2:], 0), workers)
    step = jax.pmap(
        train.make_step(dp, opt, compressor, return_message=True),
        axis_name=train.AXIS,
        devices=jax.local_devices()[:workers],
    )
    return step(state, x, y)[2]


@pytest.mark.parametrize("workers", [2, 8])
@pytest.mark.parametrize("spec", ["none", "powersgd:1", "topk:0.05"])
def test_worker_observer_sees_exactly_what_the_trainer_sends(mnist, workers, spec):
    x, y = mnist
    xs, ys = x[: 2 * workers].reshape(workers, 2, 28, 28, 1), y[: 2 * workers].reshape(workers, 2)
    model = tiny_model()
    variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    c = compress.from_spec(spec, variables["params"])
    seen = victim.make_round(model, c, workers=workers, bn_statistics="train", batchnorm="sync")(variables, xs, ys)
    sent = trainer_messages(model, c, xs, ys, workers, "sync")
    for a, b in zip(
        jax.tree.leaves(seen.message), jax.tree.leaves(compress.worker_message(sent["grads"], 0)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Synchronised BatchNorm in train mode: worker 0's statistics and their cotangents travel too.
    assert set(seen.bn["norm0"]["BatchNorm_0"]) == {"sent", "received", "grad_sent", "grad_received"}
    for a, b in zip(jax.tree.leaves(seen.bn), jax.tree.leaves(compress.worker_message(sent["bn"], 0)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_powersgd_p_hat_comes_from_all_workers(mnist):
    """Rank 1: P_hat is the normalised sum of all workers' P, not the victim's own P."""
    x, y = mnist
    model = tiny_model()
    variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    c = compress.powersgd(rank=1)
    xs, ys = x[:4].reshape(4, 1, 28, 28, 1), y[:4].reshape(4, 1)
    four = victim.make_round(model, c, workers=4, bn_statistics="eval")(variables, xs, ys).message
    alone = victim.make_round(model, c, workers=1, bn_statistics="eval")(variables, xs[:1], ys[:1]).message
    low_rank = [
        (f, a)
        for f, a in zip(
            jax.tree.leaves(four, is_leaf=compress.is_message),
            jax.tree.leaves(alone, is_leaf=compress.is_message),
            strict=True,
        )
        if isinstance(f, compress.LowRank)
    ]
    assert low_rank
    for f, a in low_rank:
        np.testing.assert_allclose(f.p, a.p, rtol=1e-5, atol=1e-7)  # the victim's own P_0 = M_0 Q is the same
        own = np.asarray(a.p[:, 0]) / np.linalg.norm(a.p[:, 0])
        np.testing.assert_allclose(np.abs(np.asarray(a.p_hat[:, 0])), np.abs(own), rtol=1e-4, atol=1e-6)
        assert abs(float(np.dot(np.asarray(f.p_hat[:, 0]), own))) < 0.999  # the all-worker direction differs


def test_aggregate_observer_sees_the_averaged_update(mnist):
    x, y = mnist
    model = tiny_model()
    variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    xs, ys = x[:4].reshape(4, 1, 28, 28, 1), y[:4].reshape(4, 1)
    c = compress.none()
    agg = victim.make_round(model, c, workers=4, observer="aggregate", bn_statistics="train", batchnorm="local")(
        variables, xs, ys
    )
    sent = trainer_messages(model, c, xs, ys, 4, "local")["grads"]
    mean = jax.tree.map(lambda g: np.asarray(g).mean(0), compress.decompress(sent))
    for a, b in zip(jax.tree.leaves(compress.decompress(agg.message)), jax.tree.leaves(mean), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert agg.bn == {}
    with pytest.raises(errors.AttackError, match="adaptive attacker does not apply"):
        invert.threat_objectives("adaptive", agg.message)


def test_eval_mode_and_local_batchnorm_send_no_statistics(mnist):
    x, y = mnist
    model = tiny_model()
    variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    xs, ys = x[:2].reshape(2, 1, 28, 28, 1), y[:2].reshape(2, 1)
    for bn, sync in (("eval", "sync"), ("train", "local")):
        seen = victim.make_round(model, compress.none(), workers=2, bn_statistics=bn, batchnorm=sync)(variables, xs, ys)
        assert jax.tree.leaves(seen.bn) == []
    train_msg = victim.make_round(model, compress.none(), workers=2, bn_statistics="train")(variables, xs, ys).message
    eval_msg = victim.make_round(model, compress.none(), workers=2, bn_statistics="eval")(variables, xs, ys).message
    assert not np.allclose(
        compress.decompress(train_msg)["Conv_0"]["kernel"], compress.decompress(eval_msg)["Conv_0"]["kernel"]
    )


def test_no_batchnorm_models_are_attacked_in_both_modes(mnist):
    """norm=group and norm=none: the mode plays no role, and the audit runs end to end."""
    x, y = mnist
    for norm in ("group", "none"):
        model = tiny_model(norm)
        variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
        msgs = [
            victim.make_round(model, compress.none(), workers=1, bn_statistics=bn)(
                variables, x[None, :1], y[None, :1]
            ).message
            for bn in ("train", "eval")
        ]
        for a, b in zip(jax.tree.leaves(msgs[0]), jax.tree.leaves(msgs[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        r = audit.audit(
            model,
            variables,
            x[:1],
            y[:1],
            compress.none(),
            dataset="mnist",
            workers=1,
            bn_statistics="train",
            config=invert.AttackConfig(iterations=20, chunk=10),
            progress=False,
        )
        assert np.isfinite(r.per_image["ssim"]).all()


def test_other_worker_ids_are_seeded_disjoint_and_independent_of_neighbours():
    a = victim.other_worker_ids(np.array([5]), 100, 4, seed=0)
    assert a.shape == (3, 1) and 5 not in a and len(set(a.ravel())) == 3
    np.testing.assert_array_equal(a, victim.other_worker_ids(np.array([5]), 100, 4, seed=0))
    assert not np.array_equal(a, victim.other_worker_ids(np.array([6]), 100, 4, seed=0))


def test_bad_round_settings_fail_with_one_line(mnist):
    x, y = mnist
    model = tiny_model()
    variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    c = compress.none()
    cases = [
        (lambda: victim.make_round(model, c, workers=9), "needs 9 local devices"),
        (lambda: victim.make_round(model, c, workers=2, observer="server"), "unknown observer 'server'"),
        (lambda: victim.make_round(model, c, workers=2, bn_statistics="frozen"), "unknown BatchNorm mode"),
        (lambda: victim.make_round(model, c, workers=2, batchnorm="ghost"), "unknown BatchNorm synchronisation"),
        (lambda: victim.other_worker_ids(np.array([0, 1]), 7, 4, 0), "need 8 training images"),
        (
            lambda: audit.audit(model, variables, x[:1], y[:1], c, dataset="mnist", workers=2, progress=False),
            "needs the other workers' batches",
        ),
        (lambda: compress.powersgd(1, start_iter=-1), "start_iter"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


def test_powersgd_warm_up_round_sends_the_full_gradient(mnist):
    """PyTorch's start_powerSGD_iter: before step K the worker sends its full gradient, and the observer sees it."""
    x, y = mnist
    model = tiny_model()
    variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    xs, ys = x[:2].reshape(2, 1, 28, 28, 1), y[:2].reshape(2, 1)
    warm = victim.make_round(model, compress.powersgd(1, start_iter=1), workers=2, bn_statistics="eval")
    plain = victim.make_round(model, compress.none(), workers=2, bn_statistics="eval")
    seen, full = warm(variables, xs, ys).message, plain(variables, xs, ys).message
    assert all(isinstance(m, compress.Dense) for m in jax.tree.leaves(seen, is_leaf=compress.is_message))
    for a, b in zip(jax.tree.leaves(seen), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_round_at_step_t_is_the_runs_own_step_t_message(mnist):
    """Step t from a real run: the round started from the run's state sends what the run itself sent at step t."""
    ds = data.load("mnist", source="sample")
    x, y = data.normalize(ds.x_train[:256], "mnist"), ds.y_train[:256]
    model = tiny_model()
    dp = victim.data_parallel_model(model, "local")
    c = compress.powersgd(rank=1)
    seen = []
    devices = jax.local_devices()[:4]
    train.fit(dp, c, x, y, steps=3, global_batch=32, progress=False, devices=devices, on_message=seen.append)
    before = train.fit(dp, c, x, y, steps=2, global_batch=32, progress=False, devices=devices).state
    step2 = seen[2]
    ids = step2.batch_ids  # [4 workers, 8]
    round_ = victim.make_round(model, c, workers=4, bn_statistics="train", batchnorm="local")
    got = round_({"params": before.params, "batch_stats": before.batch_stats}, x[ids], y[ids], before.comp_state)
    sent = compress.as_sent(compress.worker_message(step2.message["grads"], 0))
    for a, b in zip(jax.tree.leaves(got.message), jax.tree.leaves(sent), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("spec", ["none", "powersgd:1"])
def test_peer_observer_recovers_the_other_workers_sum(mnist, spec):
    """Worker N-1 knows its own contribution: N x update - its own message is the others'; with N = 2, worker 0's."""
    x, y = mnist
    model = tiny_model()
    variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    xs, ys = x[:2].reshape(2, 1, 28, 28, 1), y[:2].reshape(2, 1)
    c = compress.from_spec(spec, variables["params"])
    peer = victim.make_round(model, c, workers=2, observer="peer", bn_statistics="eval")(variables, xs, ys)
    worker0 = victim.make_round(model, c, workers=2, observer="worker", bn_statistics="eval")(variables, xs, ys)
    for a, b in zip(
        jax.tree.leaves(compress.decompress(peer.message)),
        jax.tree.leaves(compress.decompress(worker0.message)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(errors.AttackError, match="workers >= 2"):
        victim.make_round(model, c, workers=1, observer="peer")
