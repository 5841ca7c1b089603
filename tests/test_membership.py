"""Membership inference: real overfit models leak, unseen ones do not, scores are exact, errors are clear."""

import decimal
import io
import itertools

import jax
import numpy as np
import pytest
from scipy import stats

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
    # The last 200 images (the sample's test split) are RMIA's population: no model trains on them.
    pool, population = slice(0, len(x) - 200), slice(len(x) - 200, len(x))
    setup = shadows.train_target_and_shadows(
        x[pool], y[pool], model_fn=_model, compressor_spec="none", num_shadows=4, steps=200, global_batch=64, seed=0
    )
    report = mia.evaluate_membership(
        setup.target_predict,
        x[pool],
        y[pool],
        setup.is_member,
        shadow_predicts=setup.shadow_predicts,
        shadow_in=setup.shadow_in,
        augment="flip",
        population_images=x[population],
        population_labels=y[population],
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


def test_rmia_from_the_same_references_beats_chance(overfit):
    _, report = overfit
    t = report.table
    for name in ("rmia_offline", "rmia_online"):
        assert t[name]["auc"] > 0.75, (name, t[name])
        assert t[name]["offline_a_tuned"] and t[name]["offline_a"] in mia.OFFLINE_A_GRID


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
    population = data.normalize(other.x_test, "cifar100")  # never trained on by any model
    report = mia.evaluate_membership(
        predict,
        x,
        y,
        is_member,
        shadow_predicts=[predict, predict],
        shadow_in=shadow_in,
        population_images=population,
        population_labels=other.y_test % 10,
        rmia_offline_a=0.3,  # two references, each example IN for one: a cannot be tuned on them
        bootstrap=20,
    )
    assert {"lira_online", "rmia_offline", "rmia_online"} <= set(report.table)
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


def _sd(var):
    return np.sqrt(var) + 1e-6  # lira_scores' scale: the standard deviation plus 1e-6


def test_offline_test_one_sided_or_two_sided():
    """OUT values -1, 0, 0, 1 (mean 0, variance 1/2): one-sided grows with the target's phi, two-sided flags
    a phi far below the OUT mean as much as one far above."""
    out = np.array([[-1.0], [0.0], [0.0], [1.0]]) * np.ones((4, 3))
    no_in = np.zeros((4, 3), bool)
    t = np.array([-2.0, 0.0, 2.0])
    one = mia.lira_scores(t, out, no_in, online=False)
    two = mia.lira_scores(t, out, no_in, online=False, offline_test="two_sided")
    np.testing.assert_allclose(one, -stats.norm.logsf(t, 0.0, _sd(0.5)), rtol=1e-12)
    np.testing.assert_allclose(two, -stats.norm.logpdf(t, 0.0, _sd(0.5)), rtol=1e-12)
    assert one[0] < one[1] < one[2]
    assert two[0] == pytest.approx(two[2]) and two[0] > two[1]


def test_center_mean_or_median():
    """OUT values 0, 0, 0, 4: mean 1, median 0; the scale is the spread about the mean (variance 3) for both."""
    out = np.array([[0.0], [0.0], [0.0], [4.0]]) * np.ones((4, 2))
    no_in = np.zeros((4, 2), bool)
    t = np.array([0.5, 2.0])
    mean = mia.lira_scores(t, out, no_in, online=False)
    median = mia.lira_scores(t, out, no_in, online=False, center="median")
    np.testing.assert_allclose(mean, -stats.norm.logsf(t, 1.0, _sd(3.0)), rtol=1e-12)
    np.testing.assert_allclose(median, -stats.norm.logsf(t, 0.0, _sd(3.0)), rtol=1e-12)
    # Online: IN values 5, 5, 5, 1 (mean 4, median 5, variance 3) against the OUT values above.
    phi = np.concatenate([out, np.array([[5.0], [5.0], [5.0], [1.0]]) * np.ones((4, 2))])
    inn = np.repeat([False, True], 4)[:, None] * np.ones((8, 2), bool)
    for center, mu_in, mu_out in (("mean", 4.0, 1.0), ("median", 5.0, 0.0)):
        want = stats.norm.logpdf(t, mu_in, _sd(3.0)) - stats.norm.logpdf(t, mu_out, _sd(3.0))
        np.testing.assert_allclose(mia.lira_scores(t, phi, inn, center=center), want, rtol=1e-12)


def test_global_variance_pooled_within_examples_or_over_all_values():
    """Two examples, OUT values -1, 1, -1, 1 and 9, 11, 9, 11: each varies by 1 across models (within: variance
    1), but all eight values spread about their grand mean 5 with variance 26 (the reference's all_values)."""
    out = np.array([[-1.0, 9.0], [1.0, 11.0], [-1.0, 9.0], [1.0, 11.0]])
    no_in = np.zeros((4, 2), bool)
    t = np.array([1.0, 12.0])
    per_example = mia.lira_scores(t, out, no_in, online=False, global_variance=False)
    within = mia.lira_scores(t, out, no_in, online=False, global_variance=True)
    all_values = mia.lira_scores(t, out, no_in, online=False, global_variance=True, variance_pooling="all_values")
    np.testing.assert_allclose(within, -stats.norm.logsf(t, [0.0, 10.0], _sd(1.0)), rtol=1e-12)
    np.testing.assert_allclose(per_example, within, rtol=1e-12)  # equal spreads: pooling them changes nothing
    np.testing.assert_allclose(all_values, -stats.norm.logsf(t, [0.0, 10.0], _sd(26.0)), rtol=1e-12)
    # Unequal spreads: the per-example variances (1 and 9) differ from their pooled mean (5).
    wide = np.array([[-1.0, -23.0], [1.0, -17.0], [-1.0, -23.0], [1.0, -17.0]])  # example 1: mean -20, variance 9
    t2 = np.array([1.0, -17.0])
    np.testing.assert_allclose(
        mia.lira_scores(t2, wide, no_in, online=False), -stats.norm.logsf(t2, [0.0, -20.0], [_sd(1.0), _sd(9.0)])
    )
    np.testing.assert_allclose(
        mia.lira_scores(t2, wide, no_in, online=False, global_variance=True),
        -stats.norm.logsf(t2, [0.0, -20.0], _sd(5.0)),
    )


def test_lira_scores_do_not_depend_on_the_order_of_shadow_models():
    rng = np.random.default_rng(3)
    k, n = 8, 300
    shadow_in = rng.random((k, n)).argsort(0) < k // 2
    phi = rng.normal(size=(n, 1)) + np.where(shadow_in, 2.0, 0.0)[..., None] + rng.normal(size=(k, n, 2))
    target = rng.normal(size=(n, 2))
    perm = rng.permutation(k)
    for online, test, gv, center, pooling in itertools.product(
        (True, False), mia.LIRA_OFFLINE_TESTS, (False, True), mia.LIRA_CENTERS, mia.LIRA_VARIANCE_POOLING
    ):
        kw = dict(online=online, offline_test=test, global_variance=gv, center=center, variance_pooling=pooling)
        a = mia.lira_scores(target, phi, shadow_in, **kw)
        b = mia.lira_scores(target, phi[perm], shadow_in[perm], **kw)
        np.testing.assert_array_equal(a, b, err_msg=str(kw))


def _lookup_models(rng, k, n):
    """Models as lookup tables over image ids (images are [id] rows): logits [margin, 0], label 0, and a
    margin that grows by 3 on the examples the model trained on."""
    base = rng.normal(0.0, 1.0, n)
    is_member = rng.random(n) < 0.5
    shadow_in = rng.random((k, n)).argsort(0) < k // 2

    def model(member):
        table = np.stack([base + 3.0 * member + 0.5 * rng.normal(size=n), np.zeros(n)], 1)
        return lambda images: table[np.asarray(images)[:, 0].astype(int)]

    images = np.arange(n, dtype=np.float32)[:, None]
    return images, np.zeros(n, int), is_member, shadow_in, model(is_member), [model(m) for m in shadow_in]


def test_global_variance_below_64_references_by_default():
    images, labels, is_member, shadow_in, target, refs = _lookup_models(np.random.default_rng(4), 16, 300)
    ev = (target, images, labels, is_member)
    kw = dict(shadow_predicts=refs, shadow_in=shadow_in, bootstrap=0)
    default = mia.evaluate_membership(*ev, lira_offline_tests=("one_sided", "two_sided"), **kw)
    assert mia.LIRA_GLOBAL_VARIANCE_BELOW == 64
    for name in ("lira_offline", "lira_offline_two_sided", "lira_online"):
        assert default.table[name]["variance"] == "global", name
    assert default.table["lira_offline"] != default.table["lira_offline_two_sided"]
    per_example = mia.evaluate_membership(*ev, global_variance_below=16, **kw)
    assert "lira_offline_two_sided" not in per_example.table
    for name in ("lira_offline", "lira_online"):
        assert per_example.table[name]["variance"] == "per_example", name
        assert not np.array_equal(default.roc[name][1], per_example.roc[name][1]), name
    forced = mia.evaluate_membership(*ev, global_variance_below=16, global_variance=True, **kw)
    assert forced.table["lira_online"] == default.table["lira_online"]


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

    def never(v):
        raise AssertionError("a model ran before the options were checked")

    with pytest.raises(mia.MembershipError, match="unknown membership option.* lira_centre; use one of .*lira_center"):
        mia.evaluate_membership(never, np.zeros((2, 2)), np.zeros(2, int), np.array([True, False]), lira_centre="mean")
    with pytest.raises(mia.MembershipError, match="unknown center 'mode'"):
        mia.evaluate_membership(never, np.zeros((2, 2)), np.zeros(2, int), np.array([True, False]), lira_center="mode")
    with pytest.raises(mia.MembershipError, match="both members and non-members"):
        mia.attack_metrics(np.ones(3), np.ones(3, bool))
    options = [
        (dict(offline_test="one-sided"), "unknown offline_test 'one-sided'; use one of one_sided, two_sided"),
        (dict(center="mode"), "unknown center 'mode'"),
        (dict(variance_pooling="pooled"), "unknown variance_pooling 'pooled'"),
    ]
    for kwargs, message in options:
        with pytest.raises(mia.MembershipError, match=message):
            mia.lira_scores(np.zeros(4), np.zeros((2, 4)), np.array([[True] * 4, [False] * 4]), **kwargs)
    with pytest.raises(mia.MembershipError, match="some examples have no OUT shadow model"):
        mia.lira_scores(np.zeros(4), np.zeros((2, 4)), np.ones((2, 4), bool), online=False)
    with pytest.raises(mia.MembershipError, match="shadow scores .* do not line up"):
        mia.lira_scores(np.zeros(4), np.zeros((2, 5)), np.ones((2, 4), bool))


def test_paired_splits_hold_an_in_and_an_out_model_in_every_even_prefix():
    masks = shadows.shadow_splits(101, 8, seed=3)
    assert masks.shape == (8, 101)
    np.testing.assert_array_equal(masks[0::2], ~masks[1::2])  # pairs of complementary halves
    for k in (2, 4, 6, 8):
        assert (masks[:k].sum(0) == k // 2).all()
    balanced = shadows.shadow_splits(101, 8, seed=3, design="balanced")
    assert (balanced.sum(0) == 4).all() and not all((balanced[:2].sum(0) == 1))
    with pytest.raises(mia.MembershipError, match="unknown shadow split"):
        shadows.shadow_splits(10, 2, 0, design="random")


def test_table_from_logits_equals_the_table_from_predict_functions():
    rng = np.random.default_rng(0)
    n, k, c = 60, 4, 5
    logits = rng.normal(size=(k + 1, n, c)) * 3
    labels = rng.integers(0, c, n)
    is_member = rng.random(n) < 0.5
    shadow_in = shadows.shadow_splits(n, k, seed=0)
    pop = rng.normal(size=(k + 1, 30, c))
    pop_labels = rng.integers(0, c, 30)
    images, pop_images = np.arange(n, dtype=np.float32)[:, None], 1000 + np.arange(30, dtype=np.float32)[:, None]

    def predict(j):  # model j's logits for the evaluation images or the population, found by value
        return lambda v: logits[j][v[:, 0].astype(int)] if v[0, 0] < 1000 else pop[j][v[:, 0].astype(int) - 1000]

    kw = dict(bootstrap=20, rmia_offline_a=0.4)
    via_predict = mia.evaluate_membership(
        predict(0),
        images,
        labels,
        is_member,
        shadow_predicts=[predict(j) for j in range(1, k + 1)],
        shadow_in=shadow_in,
        population_images=pop_images,
        population_labels=pop_labels,
        **kw,
    ).table
    via_logits = mia.membership_table(
        [logits[0]],
        labels,
        is_member,
        shadow_logits=[[logits[j]] for j in range(1, k + 1)],
        shadow_in=shadow_in,
        population_labels=pop_labels,
        population_target_logits=[pop[0]],
        population_shadow_logits=[[pop[j]] for j in range(1, k + 1)],
        **kw,
    ).table
    assert via_predict.keys() == via_logits.keys() and "rmia_online" in via_logits
    for name in via_logits:
        assert via_predict[name]["auc"] == via_logits[name]["auc"], name
    # Kept as per-example scores (two views: the second one's numbers must come back in their place too).
    two_views = dict(
        shadow_logits=[[logits[j], -logits[j]] for j in range(1, k + 1)],
        shadow_in=shadow_in,
        population_labels=pop_labels,
        population_target_logits=[pop[0], -pop[0]],
        population_shadow_logits=[[pop[j], -pop[j]] for j in range(1, k + 1)],
    )
    target = [logits[0], -logits[0]]
    scores = mia.logit_scores(target, labels, is_member, **two_views)
    loaded = mia.load_scores_npz(io.BytesIO(mia.scores_npz(scores)))
    assert loaded.keys() == scores.keys()  # load_scores_npz inverts scores_npz exactly
    for name, value in scores.items():
        flat = jax.tree.leaves(value), jax.tree.leaves(loaded[name])
        assert len(flat[0]) == len(flat[1]) and all(np.array_equal(a, b) for a, b in zip(*flat)), name
    kept = mia.scores_table(**loaded, **kw).table
    direct = mia.membership_table(target, labels, is_member, **two_views, **kw).table
    assert kept.keys() == direct.keys()
    for name in direct:
        assert kept[name]["auc"] == direct[name]["auc"] and kept[name]["tpr@1%fpr"] == direct[name]["tpr@1%fpr"]
    assert direct["lira_online"]["auc"] != via_logits["lira_online"]["auc"]  # the second view took part


def test_one_value_per_example_has_no_within_example_spread():
    rng = np.random.default_rng(0)
    shadow_in = shadows.shadow_splits(40, 2, seed=0)  # one IN and one OUT reference per example
    phi = rng.normal(size=(2, 40))
    with pytest.raises(mia.MembershipError, match="spread within an example is undefined"):
        mia.lira_scores(phi[0], phi, shadow_in, global_variance=True)
    logits = [rng.normal(size=(40, 3)) for _ in range(3)]
    labels, is_member = rng.integers(0, 3, 40), rng.random(40) < 0.5
    kw = dict(shadow_logits=[[z] for z in logits[1:]], shadow_in=shadow_in, bootstrap=5)
    t = mia.membership_table([logits[0]], labels, is_member, **kw).table
    assert t["lira_online"]["variance_pooling"] == "all_values"  # "auto": the spread of all values
    four = shadows.shadow_splits(40, 4, seed=0)
    kw4 = dict(shadow_logits=[[rng.normal(size=(40, 3))] for _ in range(4)], shadow_in=four, bootstrap=5)
    assert mia.membership_table([logits[0]], labels, is_member, **kw4).table["lira_online"]["variance_pooling"] == (
        "within"
    )


def test_resnet18_membership_setup_runs_at_tiny_size():
    """The paper preset's MIA model (ResNet-18, compressed, snapshots, RMIA) end to end at width 4 on 16x16 images."""
    x, y = _pool()
    x, y = x[:96, ::2, ::2], y[:96]
    setup = shadows.train_target_and_shadows(
        x[:64],
        y[:64],
        model_fn=lambda: models.make_model("resnet18", 10, norm="batch", axis_name=train.AXIS, width=4),
        compressor_spec="powersgd:1",
        num_shadows=2,
        steps=2,
        global_batch=16,
        snapshot_steps=[1],
    )
    assert [s.step for s in setup.snapshots] == [1, 2] and len(setup.snapshots[0].shadow_predicts) == 2
    assert setup.wire["grad_words"] < setup.wire["uncompressed_words"]
    report = mia.evaluate_membership(
        setup.target_predict,
        x[:64],
        y[:64],
        setup.is_member,
        shadow_predicts=setup.shadow_predicts,
        shadow_in=setup.shadow_in,
        population_images=x[64:],
        population_labels=y[64:],
        rmia_offline_a=0.5,  # two references cannot tune it
        bootstrap=5,
    )
    assert {"lira_online", "lira_offline", "rmia_online", "rmia_offline"} <= set(report.table)
    assert all(np.isfinite(m["auc"]) for m in report.table.values())
