"""Membership inference: real overfit models leak, unseen ones do not, metrics and errors are right."""

import numpy as np
import pytest

from trustsgd_jax import compress, data, models, train
from trustsgd_jax.attacks import membership as mia


def _pool():
    ds = data.load("cifar10", source="sample")
    x = data.normalize(np.concatenate([ds.x_train, ds.x_test]), "cifar10")
    return x, np.concatenate([ds.y_train, ds.y_test])


def _model():
    return models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS, width=16)


@pytest.fixture(scope="module")
def overfit():
    x, y = _pool()
    setup = mia.train_target_and_shadows(x, y, model_fn=_model, compressor_spec="none", num_shadows=6,
                                         steps=200, global_batch=64, seed=0)
    report = mia.evaluate_membership(setup.target_predict, x, y, setup.is_member,
                                     shadow_predicts=setup.shadow_predicts, shadow_in=setup.shadow_in,
                                     augment="flip", bootstrap=50)
    return setup, report


def test_loss_attack_beats_chance_and_lira_beats_loss_at_low_fpr(overfit):
    setup, report = overfit
    t = report.table
    assert t["loss"]["auc"] > 0.6, t["loss"]
    assert t["lira_online"]["tpr@1%fpr"] > t["loss"]["tpr@1%fpr"], (t["lira_online"], t["loss"])
    for name in ("confidence", "loss", "entropy", "mentr"):
        assert "calibrated_acc" in t[name] and t[name]["oracle_acc"] >= t[name]["calibrated_acc"] - 1e-9
        lo, hi = t[name]["auc_ci"]
        assert lo <= t[name]["auc"] <= hi


def test_model_that_never_saw_the_members_is_at_chance():
    x, y = _pool()
    rng = np.random.default_rng(1)
    is_member = np.zeros(len(x), bool)
    is_member[rng.permutation(len(x))[: len(x) // 2]] = True
    # The target trains on other real images: MNIST would not fit, so use CIFAR-100's sample.
    other = data.load("cifar100", source="sample")
    xo = data.normalize(other.x_train, "cifar100")
    yo = other.y_train % 10
    model = _model()
    r = train.fit(model, compress.none(), xo, yo, steps=150, global_batch=64, progress=False)
    predict = lambda v: train.predict_logits(model, r.state.params, r.state.batch_stats, v)
    half = rng.permutation(len(x)) < len(x) // 2
    shadow_in = np.stack([half, ~half])  # every example IN once and OUT once
    report = mia.evaluate_membership(predict, x, y, is_member, shadow_predicts=[predict, predict],
                                     shadow_in=shadow_in, bootstrap=20)
    for name, m in report.table.items():
        assert abs(m["auc"] - 0.5) < 0.05, (name, m["auc"])


def test_roc_points_auc_and_tpr_by_hand():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    m = np.array([1, 1, 0, 1, 0, 0], bool)
    fpr, tpr, _ = mia.roc_curve(s, m)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert mia.auc(s, m) == pytest.approx(8 / 9)  # 8 of 9 member/non-member pairs ordered right
    assert mia.auc(m.astype(float), m) == 1.0
    assert mia.auc(-m.astype(float), m) == 0.0
    assert mia.auc(np.zeros(6), m) == 0.5  # all tied: the diagonal
    # The curve runs (0, 2/3) -> (1/3, 2/3) -> (1/3, 1): flat in between.
    assert mia.tpr_at_fpr(s, m, 1 / 6) == pytest.approx(2 / 3)
    # A member and a non-member tied at 0.5: a diagonal segment, interpolated linearly.
    tie_s, tie_m = np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)
    assert mia.tpr_at_fpr(tie_s, tie_m, 0.25) == pytest.approx(0.75)
    assert mia.tpr_at_fpr(s, m, 0.0) == pytest.approx(2 / 3)
    big = np.r_[np.ones(1000), np.zeros(1000)].astype(bool)
    assert mia.tpr_at_fpr(np.r_[np.ones(1000), np.linspace(0, 0.5, 1000)], big, 0.001) == 1.0
    acc, thr = mia.best_balanced_accuracy(s, m)
    assert acc == pytest.approx((1 + 2 / 3) / 2) and thr == 0.6


def test_logit_scaled_confidence_is_finite_at_saturation():
    logits = np.array([[200.0, -200.0, 0.0], [-200.0, 200.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    phi = mia.logit_scaled_confidence(logits, np.array([0, 0, 2]))
    assert np.isfinite(phi).all()
    assert phi[0] > 150 and phi[1] < -350  # p_y ~ 1 and p_y ~ 0 in float32
    np.testing.assert_allclose(phi[2], np.log((1 / 3) / (2 / 3)), rtol=1e-5)
    scores = mia.membership_scores(logits, np.array([0, 0, 2]))
    assert all(np.isfinite(v).all() for v in scores.values())


def test_lira_separates_in_from_out_by_hand():
    rng = np.random.default_rng(0)
    k, n = 8, 200
    shadow_in = rng.random((k, n)).argsort(0) < k // 2  # each example IN for half of the shadows
    shadow_phi = np.where(shadow_in, 3.0, 0.0) + 0.3 * rng.normal(size=(k, n))
    truth = rng.random(n) < 0.5
    target = np.where(truth, 3.0, 0.0) + 0.3 * rng.normal(size=n)
    for online in (True, False):
        s = mia.lira_scores(target, shadow_phi, shadow_in, online=online)
        assert mia.auc(s, truth) > 0.99


def test_bad_inputs_raise():
    with pytest.raises(mia.MembershipError, match="overlap in 2 examples"):
        mia.check_disjoint([1, 2, 3], [3, 2, 9])
    with pytest.raises(mia.MembershipError, match="non-empty"):
        mia.check_disjoint([], [1])
    with pytest.raises(mia.MembershipError, match="at least 2 shadow models"):
        mia.lira_scores(np.zeros(4), np.zeros((1, 4)), np.ones((1, 4), bool), online=True)
    with pytest.raises(mia.MembershipError, match=r"labels must lie in \[0, 3\)"):
        mia.membership_scores(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(mia.MembershipError, match="empty"):
        mia.evaluate_membership(lambda v: v, np.zeros((0, 2)), np.zeros(0, int), np.zeros(0, bool))
    with pytest.raises(mia.MembershipError, match="both members and non-members"):
        mia.attack_metrics(np.ones(3), np.ones(3, bool))
