"""The wire MIA: members of worker 0's batches against never-trained-on samples, from its messages alone.

Bounds. Under the null (scores independent of membership) the AUC of n1
members against n0 non-members has mean 1/2 and standard deviation
sigma0 = sqrt((n1 + n0 + 1) / (12 n1 n0)) (Mann-Whitney). "Above chance" is
AUC > 1/2 + 4 sigma0 (a one-sided p below 1e-4 under the null); "chance" is
|AUC - 1/2| < 4 sigma0.
"""

import dataclasses

import jax
import numpy as np
import pytest

from trustsgd_jax import compress, data, metrics, models, train
from trustsgd_jax.attacks import membership as mia
from trustsgd_jax.attacks import objectives
from trustsgd_jax.attacks import wire_membership as wire

WORKERS, BATCH, STEPS, NONMEMBERS = 4, 32, 8, 256  # 8 images per worker and step: 64 members


def null_sd(n1: int, n0: int) -> float:
    return float(np.sqrt((n1 + n0 + 1) / (12 * n1 * n0)))


def tiny_model():
    return models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS, width=8)


@pytest.fixture(scope="module")
def split():
    """Training images, held-out non-members (never given to fit) and a disjoint set for an unrelated run."""
    ds = data.load("mnist", source="sample")
    x, y = data.normalize(ds.x_train, "mnist"), ds.y_train
    perm = np.random.default_rng(0).permutation(len(x))
    train_ids, held_out, unrelated = perm[:1000], perm[1000 : 1000 + NONMEMBERS], perm[2000:3000]
    return {
        "train": (x[train_ids], y[train_ids]),
        "nonmembers": (x[held_out], y[held_out]),
        "unrelated": (x[unrelated], y[unrelated]),
    }


@pytest.fixture(scope="module")
def sgd_run(split):
    x, y = split["train"]
    return wire.record_run(tiny_model(), compress.none(), x, y, steps=STEPS, global_batch=BATCH, workers=WORKERS)


def candidates(split, recording):
    x, y = split["train"]
    xn, yn = split["nonmembers"]
    ids = recording.member_ids
    is_member = np.r_[np.ones(len(ids), bool), np.zeros(len(xn), bool)]
    return np.concatenate([x[ids], xn]), np.concatenate([y[ids], yn]), is_member


def test_recording_keeps_worker_zeros_side(sgd_run, split):
    assert len(sgd_run.steps) == STEPS and sgd_run.workers == WORKERS and sgd_run.compressor == "none"
    for s in sgd_run.steps:
        assert s.member_ids.shape == (BATCH // WORKERS,)
        # One worker's dense gradient: parameter-shaped, no worker axis.
        sent = jax.tree.leaves(compress.decompress(s.message))
        assert [np.shape(g) for g in sent] == [np.shape(p) for p in jax.tree.leaves(s.variables["params"])]
        assert s.bn_stats is not None
    assert len(sgd_run.member_ids) == STEPS * BATCH // WORKERS  # less than one epoch: no repeats


def test_step_statistics_reproduce_the_train_mode_forward(split):
    """Eval mode with `train.sync_bn_statistics` is the function the step applied to its global batch in train mode."""
    x, y = split["train"]
    seen = []
    train.fit(
        tiny_model(),
        compress.none(),
        x,
        y,
        steps=2,
        global_batch=BATCH,
        devices=jax.local_devices()[:WORKERS],
        on_message=seen.append,
        progress=False,
    )
    local = tiny_model().clone(axis_name=None)
    for sm in seen:
        traffic = jax.device_get(compress.worker_message(sm.message["bn"], 0))
        stats = train.sync_bn_statistics(sm.variables["batch_stats"], traffic)
        batch = x[sm.batch_ids.reshape(-1)]
        trained, _ = local.apply(sm.variables, batch, train=True, mutable=["batch_stats"])
        replayed = local.apply({**sm.variables, "batch_stats": stats}, batch, train=False)
        np.testing.assert_allclose(replayed, trained, rtol=1e-4, atol=1e-4)


def test_sgd_separates_members_from_nonmembers(sgd_run, split):
    cx, cy, is_member = candidates(split, sgd_run)
    bound = 0.5 + 4 * null_sd(int(is_member.sum()), int((~is_member).sum()))
    for how in wire.AGGREGATES:
        scores = wire.wire_scores(tiny_model(), sgd_run, cx, cy, view="observed", how=how)
        result = mia.attack_metrics(scores, is_member, bootstrap=100)
        assert result["auc"] > bound, (how, result["auc"], bound)
        assert result["auc_ci"][0] > 0.5, (how, result["auc_ci"])


def test_views_coincide_on_dense_messages(sgd_run, split):
    cx, cy, _ = candidates(split, sgd_run)
    sims = wire.wire_similarities(tiny_model(), sgd_run, cx[:40], cy[:40], chunk=16)
    assert sims["observed"].shape == (STEPS, 40)
    np.testing.assert_allclose(sims["observed"], sims["compressor"], atol=1e-6)
    assert np.all(np.abs(sims["observed"]) <= 1 + 1e-5)


def test_chunking_does_not_change_similarities(sgd_run, split):
    cx, cy, _ = candidates(split, sgd_run)
    a = wire.wire_similarities(tiny_model(), sgd_run, cx[:37], cy[:37], views=("observed",), chunk=37)
    b = wire.wire_similarities(tiny_model(), sgd_run, cx[:37], cy[:37], views=("observed",), chunk=8)
    np.testing.assert_allclose(a["observed"], b["observed"], atol=1e-5)


def test_messages_that_carry_nothing_give_exactly_chance(sgd_run, split):
    """A test-only compressor that sends zeros: every similarity is 0, every score ties, AUC is 1/2."""
    silent = dataclasses.replace(
        sgd_run,
        steps=tuple(dataclasses.replace(s, message=jax.tree.map(np.zeros_like, s.message)) for s in sgd_run.steps),
    )
    cx, cy, is_member = candidates(split, silent)
    for view in wire.VIEWS:
        for how in wire.AGGREGATES:
            scores = wire.wire_scores(tiny_model(), silent, cx, cy, view=view, how=how)
            assert np.ptp(scores) == 0.0
            assert metrics.auc(scores, is_member) == 0.5


def test_a_run_that_never_saw_the_candidates_gives_chance(sgd_run, split):
    """Worker 0's members relabelled onto the messages (and models) of a run on disjoint data.

    Nothing in the recording depends on any candidate, so members and non-members are exchangeable.
    """
    xu, yu = split["unrelated"]
    other = wire.record_run(tiny_model(), compress.none(), xu, yu, steps=STEPS, global_batch=BATCH, workers=WORKERS)
    blind = dataclasses.replace(
        other,
        steps=tuple(dataclasses.replace(o, member_ids=s.member_ids) for o, s in zip(other.steps, sgd_run.steps)),
    )
    cx, cy, is_member = candidates(split, blind)
    tolerance = 4 * null_sd(int(is_member.sum()), int((~is_member).sum()))
    for how in wire.AGGREGATES:
        auc = metrics.auc(wire.wire_scores(tiny_model(), blind, cx, cy, how=how), is_member)
        assert abs(auc - 0.5) < tolerance, (how, auc, tolerance)


def test_compressed_messages_use_the_compressor_view(split):
    """PowerSGD after a dense warm-up step: Dense then LowRank messages; the views differ once compressed."""
    x, y = split["train"]
    c = compress.powersgd(rank=1, start_iter=1)
    rec = wire.record_run(tiny_model(), c, x, y, steps=2, global_batch=BATCH, workers=WORKERS)
    kinds = [{type(m).__name__ for m in objectives.message_leaves(s.message)} for s in rec.steps]
    assert kinds[0] == {"Dense"} and "LowRank" in kinds[1]
    cx, cy, _ = candidates(split, rec)
    sims = wire.wire_similarities(tiny_model(), rec, cx[:24], cy[:24])
    np.testing.assert_allclose(sims["observed"][0], sims["compressor"][0], atol=1e-6)
    assert not np.allclose(sims["observed"][1], sims["compressor"][1], atol=1e-3)
    assert np.all(np.isfinite(sims["compressor"]))


def test_aggregates():
    c = np.array([[0.1, 0.5, 0.2], [0.3, 0.0, 0.2]])
    np.testing.assert_allclose(wire.aggregate(c, "mean"), [0.2, 0.25, 0.2])
    # Percentiles per step: [1/3, 1, 2/3] and [1, 1/3, 2/3]; max 1, 1, 2/3; the mean breaks the first tie.
    s = wire.aggregate(c, "max")
    assert s[0] == s[1] and s[1] > s[2]
    # [1/3, 1, 2/3] and [2/3, 1/3, 1]: maxima 2/3, 1, 1, means 1/2, 2/3, 5/6: the third wins the tie.
    s = wire.aggregate(np.array([[0.1, 0.5, 0.2], [0.3, 0.0, 0.4]]), "max")
    assert s[2] > s[1] > s[0]


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_input_gets_a_one_line_error(sgd_run, split):
    cx, cy, _ = candidates(split, sgd_run)
    model = tiny_model()
    with pytest.raises(mia.MembershipError) as e:
        wire.wire_scores(model, sgd_run, cx[:, :14], cy)
    assert "shape" in _one_line(e)
    with pytest.raises(mia.MembershipError) as e:
        wire.wire_scores(model, sgd_run, cx, cy[:-1])
    assert "labels" in _one_line(e)
    with pytest.raises(mia.MembershipError) as e:
        wire.wire_scores(model, dataclasses.replace(sgd_run, steps=()), cx, cy)
    assert "no steps" in _one_line(e)
    with pytest.raises(mia.MembershipError) as e:
        wire.wire_scores(model, sgd_run, cx, cy, view="gradient")
    assert "view" in _one_line(e)
    with pytest.raises(mia.MembershipError) as e:
        wire.wire_scores(model, sgd_run, cx, cy, bn="batch")
    assert "bn" in _one_line(e)
    with pytest.raises(mia.MembershipError) as e:
        wire.wire_scores(model, sgd_run, cx, cy, how="median")
    assert "aggregate" in _one_line(e)
    with pytest.raises(mia.MembershipError) as e:
        wire.aggregate(np.zeros((0, 3)))
    _one_line(e)
    x, y = split["train"]
    with pytest.raises(mia.MembershipError) as e:
        wire.record_run(model, compress.none(), x, y, steps=0, global_batch=BATCH, workers=WORKERS)
    assert "steps" in _one_line(e)
    with pytest.raises(mia.MembershipError) as e:
        wire.record_run(model, compress.none(), x, y[:-1], steps=1, global_batch=BATCH, workers=WORKERS)
    _one_line(e)
    no_stats = dataclasses.replace(sgd_run, steps=(dataclasses.replace(sgd_run.steps[0], bn_stats=None),))
    with pytest.raises(mia.MembershipError) as e:
        wire.wire_scores(model, no_stats, cx, cy, bn="step")
    assert "bn='running'" in _one_line(e)
