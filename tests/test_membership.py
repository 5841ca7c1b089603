"""Membership inference: real overfit models leak, unseen ones do not, scores are exact, errors are clear."""

import decimal

import numpy as np
import pytest

from trustsgd_jax import compress, data, metrics, models, train
from trustsgd_jax.attacks import membership as mia
from trustsgd_jax.attacks import shadows


def _pool():
    ds = data.load("cifar10", source="sample")
    x = data.normalize(np.concatenate([ds.x_train, ds.x_test]), "cifar10")
    return x, np.concatenate([ds.y_train, ds.y_test])


def _model():
    return models.make_model("convnet", 10, norm="batch", axis_name=train.AXIS, width=16)


@pytest.fixture(scope="module")
def overfit():
    x, y = _pool()
    setup = shadows.train_target_and_shadows(
        x, y, model_fn=_model, compressor_spec="none", num_shadows=6, steps=200, global_batch=64, seed=0
    )
    report = mia.evaluate_membership(
        setup.target_predict,
        x,
        y,
        setup.is_member,
        shadow_predicts=setup.shadow_predicts,
        shadow_in=setup.shadow_in,
        augment="flip",
        bootstrap=50,
    )
    return setup, report


def test_loss_attack_beats_chance_and_lira_beats_loss_at_low_fpr(overfit):
    _, report = overfit
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
    report = mia.evaluate_membership(
        predict, x, y, is_member, shadow_predicts=[predict, predict], shadow_in=shadow_in, bootstrap=20
    )
    for name, m in report.table.items():
        assert abs(m["auc"] - 0.5) < 0.05, (name, m["auc"])


def test_logit_scaled_confidence_is_finite_at_saturation():
    logits = np.array([[200.0, -200.0, 0.0], [-200.0, 200.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    phi = mia.logit_scaled_confidence(logits, np.array([0, 0, 2]))
    assert np.isfinite(phi).all()
    assert phi[0] > 150 and phi[1] < -350  # p_y ~ 1 and p_y ~ 0 in float32
    np.testing.assert_allclose(phi[2], np.log((1 / 3) / (2 / 3)), rtol=1e-5)
    scores = mia.membership_scores(logits, np.array([0, 0, 2]))
    assert all(np.isfinite(v).all() for v in scores.values())


def _reference_scores(row, label):
    """Every score of one example from the definitions, in 80-digit decimal arithmetic."""
    with decimal.localcontext(decimal.Context(prec=80)):
        z = [decimal.Decimal(float(v)) for v in row]  # the float32 logits, exactly
        lse = sum(v.exp() for v in z).ln()
        logp = [v - lse for v in z]
        p = [v.exp() for v in logp]
        mentr = -(1 - p[label]) * logp[label] - sum(p[i] * (1 - p[i]).ln() for i in range(len(z)) if i != label)
        phi = z[label] - sum(z[i].exp() for i in range(len(z)) if i != label).ln()
        return {
            "confidence": max(logp),
            "loss": logp[label],
            "entropy": sum(a * b for a, b in zip(p, logp)),
            "mentr": -mentr,
            "phi": phi,
        }


def test_scores_of_confident_predictions_keep_their_order():
    """Margins 20..60 in float32 logits: direct float32 (or float64) softmax rounds p_y to 1 and ties the scores.

    A confident member is told from a confident non-member only by how
    confident each is, so every score must stay strictly ordered with the
    margin and match the exact value, not collapse onto log p_y = 0, p_max = 1.
    """
    others = np.linspace(-3.0, 3.0, 9)
    margins = np.linspace(20.0, 60.0, 21)
    right = np.array([np.r_[others.max() + d, others] for d in margins], np.float32)  # label 0 is the top class
    wrong = right[::4]  # the same logits labelled 1, the least probable class: confidently misclassified
    logits = np.concatenate([right, wrong])
    labels = np.r_[np.zeros(len(right), int), np.ones(len(wrong), int)]
    scores = mia.membership_scores(logits, labels)
    reference = [_reference_scores(row, y) for row, y in zip(logits, labels)]
    for name, got in scores.items():
        assert got.dtype == np.float64
        want = np.array([float(r[name]) for r in reference])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=0, err_msg=name)
        assert (np.diff(want[: len(right)]) > 0).all(), name  # the exact scores grow with the margin...
        assert (np.diff(got[: len(right)]) > 0).all(), (name, got[: len(right)])  # ...and so must ours: no ties
    np.testing.assert_allclose(mia.logit_scaled_confidence(logits, labels), scores["phi"], rtol=0, atol=0)


def test_lira_separates_in_from_out_by_hand():
    rng = np.random.default_rng(0)
    k, n = 8, 200
    shadow_in = rng.random((k, n)).argsort(0) < k // 2  # each example IN for half of the shadows
    shadow_phi = np.where(shadow_in, 3.0, 0.0) + 0.3 * rng.normal(size=(k, n))
    truth = rng.random(n) < 0.5
    target = np.where(truth, 3.0, 0.0) + 0.3 * rng.normal(size=n)
    for online in (True, False):
        s = mia.lira_scores(target, shadow_phi, shadow_in, online=online)
        assert metrics.auc(s, truth) > 0.99


def test_bad_inputs_raise():
    with pytest.raises(mia.MembershipError, match="overlap in 2 examples"):
        shadows.check_disjoint([1, 2, 3], [3, 2, 9])
    with pytest.raises(mia.MembershipError, match="non-empty"):
        shadows.check_disjoint([], [1])
    with pytest.raises(mia.MembershipError, match="at least 2 shadow models"):
        mia.lira_scores(np.zeros(4), np.zeros((1, 4)), np.ones((1, 4), bool), online=True)
    with pytest.raises(mia.MembershipError, match=r"labels must lie in \[0, 3\)"):
        mia.membership_scores(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(mia.MembershipError, match="1 NaN or infinite"):
        mia.membership_scores(np.array([[0.0, np.nan], [1.0, 2.0]]), np.array([0, 1]))
    with pytest.raises(mia.MembershipError, match="empty"):
        mia.evaluate_membership(lambda v: v, np.zeros((0, 2)), np.zeros(0, int), np.zeros(0, bool))
    with pytest.raises(mia.MembershipError, match="both members and non-members"):
        mia.attack_metrics(np.ones(3), np.ones(3, bool))
