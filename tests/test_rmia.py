"""RMIA: known answers on synthetic scores, the paper's definition by brute force, order-free references, errors."""

import itertools

import numpy as np
import pytest

from trustsgd_jax import metrics
from trustsgd_jax.attacks import membership as mia


def _log_sigmoid(v):
    return -np.logaddexp(0.0, -v)


def _synthetic(rng, k=8, n=2000, z=500, views=1, member_shift=4.0, target_shift=4.0):
    """log p_y of K references, a target and a population, from logits = difficulty + shift * IN + noise.

    Each example is IN for exactly half of the references (as shadows.train_target_and_shadows
    arranges); the population is IN for no model. `target_shift` = 0 makes the target ignore
    membership: members and non-members then have identical score distributions.
    """
    inn = rng.random((k, n)).argsort(0) < k // 2
    truth = rng.random(n) < 0.5
    base, zbase = rng.normal(-1.0, 1.0, (n, 1)), rng.normal(-1.0, 1.0, (z, 1))
    ref = _log_sigmoid(base + member_shift * inn[..., None] + 0.3 * rng.normal(size=(k, n, views)))
    tgt = _log_sigmoid(base + target_shift * truth[:, None] + 0.3 * rng.normal(size=(n, views)))
    zref = _log_sigmoid(zbase + 0.3 * rng.normal(size=(k, z, views)))
    ztgt = _log_sigmoid(zbase + 0.3 * rng.normal(size=(z, views)))
    return tgt, ref, inn, ztgt, zref, truth


@pytest.mark.parametrize("views", [1, 3])
def test_separable_members_give_auc_near_one(views):
    tgt, ref, inn, ztgt, zref, truth = _synthetic(np.random.default_rng(0), views=views)
    for online, kind in itertools.product((True, False), mia.RMIA_VIEWS):
        s = mia.rmia_scores(tgt, ref, inn, ztgt, zref, online=online, offline_a=0.3, views=kind)
        assert metrics.auc(s, truth) > 0.99, (online, kind, metrics.auc(s, truth))


def test_identical_member_and_nonmember_scores_give_chance():
    """The target ignores membership. AUC under the null has sd sqrt((n1 + n2 + 1) / (12 n1 n2)) ~ 0.009 at
    n1 = n2 = 2000; the tolerance 0.04 is over 4 sd."""
    tgt, ref, inn, ztgt, zref, truth = _synthetic(np.random.default_rng(1), n=4000, views=2, target_shift=0.0)
    for online, kind in itertools.product((True, False), mia.RMIA_VIEWS):
        s = mia.rmia_scores(tgt, ref, inn, ztgt, zref, online=online, offline_a=0.3, views=kind)
        assert abs(metrics.auc(s, truth) - 0.5) < 0.04, (online, kind, metrics.auc(s, truth))


def _rmia_by_definition(tgt, ref, inn, ztgt, zref, online, a, gamma, views):
    """The paper's score, written out in probability space with loops: for each x, the fraction of z with
    (p(x|t) / Pr(x)) / (p(z|t) / Pr(z)) >= gamma, per view and by strict majority over views (or on the
    view-averaged probabilities)."""
    p, pr, pz, pzr = np.exp(tgt), np.exp(ref), np.exp(ztgt), np.exp(zref)
    if views == "mean":
        p, pr, pz, pzr = (v.mean(-1, keepdims=True) for v in (p, pr, pz, pzr))
    k, n, n_views = pr.shape
    out = np.zeros(n)
    for i in range(n):
        ins = [pr[j, i] for j in range(k) if inn[j, i]]
        outs = [pr[j, i] for j in range(k) if not inn[j, i]]
        if online:
            prior_x = (np.mean(ins, 0) + np.mean(outs, 0)) / 2
        else:
            prior_x = (1 + a) / 2 * np.mean(outs, 0) + (1 - a) / 2
        hits = 0
        for m in range(len(pz)):
            prior_z = (1 + a) / 2 * pzr[:, m].mean(0) + (1 - a) / 2  # no model trained on z: OUT in both modes
            votes = sum((p[i, v] / prior_x[v]) / (pz[m, v] / prior_z[v]) >= gamma for v in range(n_views))
            hits += votes > n_views / 2
        out[i] = hits / len(pz)
    return out


@pytest.mark.parametrize(
    "online, a, gamma, views, n_views",
    [
        (True, 0.3, 2.0, "vote", 3),
        (False, 0.3, 1.0, "vote", 2),
        (False, 1.0, 2.0, "mean", 3),
        (True, 0.6, 1.5, "vote", 1),
        (True, 1.0, 1.0, "mean", 2),
    ],
)
def test_matches_the_papers_definition(online, a, gamma, views, n_views):
    rng = np.random.default_rng(2)
    # k = 5: each example is IN for 2 references, so (Pr_IN + Pr_OUT) / 2 differs from the mean over all 5.
    tgt, ref, inn, ztgt, zref, _ = _synthetic(rng, k=5, n=40, z=30, views=n_views, member_shift=1.0, target_shift=1.0)
    want = _rmia_by_definition(tgt, ref, inn, ztgt, zref, online, a, gamma, views)
    got = mia.rmia_scores(tgt, ref, inn, ztgt, zref, online=online, offline_a=a, gamma=gamma, views=views)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 10  # the case is not degenerate: the scores spread over many values
    if n_views == 1:  # [N] and [K, N] inputs give the same as [N, 1] and [K, N, 1]
        flat = mia.rmia_scores(tgt[:, 0], ref[..., 0], inn, ztgt[:, 0], zref[..., 0], online=online, offline_a=a)
        np.testing.assert_array_equal(flat, mia.rmia_scores(tgt, ref, inn, ztgt, zref, online=online, offline_a=a))


@pytest.mark.parametrize("n_views", [1, 3])
def test_a_ratio_equal_to_gamma_counts(n_views):
    """LR(x, z) >= gamma, as the paper defines it: a z whose ratio equals x's counts at gamma = 1, and the
    population sample just below it too; the one above does not."""
    half, quarter = np.log(0.5), np.log(0.25)
    tgt = np.full((1, n_views), half)
    ref = np.full((1, 1, n_views), quarter)
    ztgt = np.log([[0.5], [0.49], [0.51]]) * np.ones(n_views)
    zref = np.full((1, 3, n_views), quarter)
    s = mia.rmia_scores(tgt, ref, np.zeros((1, 1), bool), ztgt, zref, online=False, offline_a=1.0, gamma=1.0)
    np.testing.assert_array_equal(s, [2 / 3])


def test_scores_do_not_depend_on_the_order_of_reference_models():
    tgt, ref, inn, ztgt, zref, _ = _synthetic(np.random.default_rng(3), k=6, n=300, z=200, views=2)
    perm = np.random.default_rng(4).permutation(6)
    assert (perm != np.arange(6)).any()
    for online in (True, False):
        for views in mia.RMIA_VIEWS:
            a = mia.rmia_scores(tgt, ref, inn, ztgt, zref, online=online, offline_a=0.4, views=views)
            b = mia.rmia_scores(tgt, ref[perm], inn[perm], ztgt, zref[perm], online=online, offline_a=0.4, views=views)
            np.testing.assert_array_equal(a, b)
    assert mia.tune_offline_a(ref, inn, zref) == mia.tune_offline_a(ref[perm], inn[perm], zref[perm])


def test_tune_offline_a_picks_the_best_auc_on_the_references():
    tgt, ref, inn, ztgt, zref, _ = _synthetic(np.random.default_rng(5), k=6, n=400, z=200)
    a, aucs = mia.tune_offline_a(ref, inn, zref)
    assert set(aucs) == set(mia.OFFLINE_A_GRID)
    assert aucs[a] == max(aucs.values()) and all(0.5 < v <= 1 for v in aucs.values())
    assert len(set(aucs.values())) > 1  # a matters here, so the choice is not a tie-break


def test_bad_inputs_raise_one_line_errors():
    tgt, ref, inn, ztgt, zref, _ = _synthetic(np.random.default_rng(6), k=4, n=50, z=20)
    cases = [
        (dict(ref=ref[:1], inn=inn[:1], zref=zref[:1]), {"online": True}, "at least 2 reference models"),
        (dict(inn=np.ones_like(inn)), {"online": True}, "an IN and an OUT reference per example; 50 lack one"),
        (dict(inn=np.ones_like(inn)), {"online": False, "offline_a": 0.3}, "an OUT reference for every example"),
        ({}, {"online": False, "offline_a": None}, r"needs offline_a in \[0, 1\] for Pr\(z\)"),
        ({}, {"online": True, "offline_a": None}, r"needs offline_a in \[0, 1\] for Pr\(z\)"),
        ({}, {"online": False, "offline_a": 1.5}, r"offline_a in \[0, 1\]"),
        (dict(ztgt=ztgt[:0], zref=zref[:, :0]), {}, "population of at least one sample"),
        (dict(zref=zref[:3]), {}, "population scores .* do not line up"),
        (dict(ref=ref[:, :40]), {}, "reference scores .* do not line up"),
        (dict(ztgt=ztgt[:, :0]), {}, "population scores .* do not line up"),
        (dict(tgt=-tgt), {}, "must be log-probabilities"),  # e.g. a loss or phi passed by mistake
        (dict(ref=np.where(inn[..., None], np.nan, ref)), {}, "NaN or infinite"),
        ({}, {"gamma": 0.0}, "gamma must be a positive number"),
        ({}, {"views": "max"}, "unknown views 'max'"),
    ]
    for change, kwargs, message in cases:
        args = dict(tgt=tgt, ref=ref, inn=inn, ztgt=ztgt, zref=zref) | change
        with pytest.raises(mia.MembershipError, match=message) as e:
            mia.rmia_scores(
                args["tgt"], args["ref"], args["inn"], args["ztgt"], args["zref"], **({"offline_a": 0.3} | kwargs)
            )
        assert "\n" not in str(e.value), message
    balanced_pair = np.stack([inn[0], ~inn[0]])  # two references, every example IN for exactly one
    with pytest.raises(mia.MembershipError, match="cannot tune offline_a from 2 references"):
        mia.tune_offline_a(ref[:2], balanced_pair, zref[:2])


# ---------------------------------------------------------------- evaluate_membership with a population


def _lookup_models(rng, k, n, z):
    """Models as lookup tables over image ids (images are [id] rows): logits [margin, 0] with label 0 and a
    margin that grows by 3 for the examples the model trained on; ids n..n+z-1 are the population."""
    base = rng.normal(0.0, 1.0, n + z)
    is_member = rng.random(n) < 0.5
    shadow_in = rng.random((k, n)).argsort(0) < k // 2

    def model(member):
        margin = base + 3.0 * np.r_[member, np.zeros(z, bool)] + 0.3 * rng.normal(size=n + z)
        table = np.stack([margin, np.zeros(n + z)], 1)
        return lambda images: table[np.asarray(images)[:, 0].astype(int)]

    images = np.arange(n + z, dtype=np.float32)[:, None]
    labels = np.zeros(n + z, int)
    return images, labels, is_member, shadow_in, model(is_member), [model(m) for m in shadow_in]


def test_evaluate_membership_adds_rmia_rows_from_the_same_references():
    images, labels, is_member, shadow_in, target, refs = _lookup_models(np.random.default_rng(7), 6, 400, 200)
    n = len(is_member)
    kwargs = dict(shadow_predicts=refs, shadow_in=shadow_in, bootstrap=10)
    without = mia.evaluate_membership(target, images[:n], labels[:n], is_member, **kwargs)
    report = mia.evaluate_membership(
        target, images[:n], labels[:n], is_member, population_images=images[n:], population_labels=labels[n:], **kwargs
    )
    assert set(report.table) == set(without.table) | {"rmia_offline", "rmia_online"}
    for name, row in without.table.items():  # the existing rows do not change
        assert report.table[name] == row, name
    for name in ("rmia_offline", "rmia_online"):
        assert report.table[name]["auc"] > 0.95, (name, report.table[name])
        assert report.table[name]["gamma"] == mia.RMIA_GAMMA
    assert report.table["rmia_offline"]["offline_a_tuned"] is True
    assert report.table["rmia_offline"]["offline_a"] in mia.OFFLINE_A_GRID
    fixed = mia.evaluate_membership(
        target,
        images[:n],
        labels[:n],
        is_member,
        population_images=images[n:],
        population_labels=labels[n:],
        rmia_offline_a=0.25,
        **kwargs,
    )
    assert fixed.table["rmia_offline"]["offline_a"] == 0.25 and fixed.table["rmia_offline"]["offline_a_tuned"] is False


def test_evaluate_membership_refuses_a_population_it_cannot_use():
    images, labels, is_member, shadow_in, target, refs = _lookup_models(np.random.default_rng(8), 4, 100, 50)
    n = len(is_member)
    ev = (target, images[:n], labels[:n], is_member)
    refs_kw = dict(shadow_predicts=refs, shadow_in=shadow_in, bootstrap=0)
    overlapping = np.concatenate([images[n:], images[[3, 7]]])
    cases = [
        (
            dict(population_images=overlapping, population_labels=np.zeros(len(overlapping), int), **refs_kw),
            "overlaps the evaluation set in 2 images",
        ),
        (dict(population_images=images[n:], population_labels=labels[n:]), "needs reference models"),
        (dict(population_images=images[n:], **refs_kw), "need population_labels"),
        (dict(population_images=images[n:], population_labels=labels[n:-1], **refs_kw), "need population_labels"),
        (dict(population_images=images[n:n], population_labels=labels[n:n], **refs_kw), "population is empty"),
        (
            dict(population_images=images[n:], population_labels=labels[n:], rmia_views="all", **refs_kw),
            "unknown views 'all'",
        ),
        (dict(shadow_predicts=refs, shadow_in=shadow_in[:, :-1]), r"shadow_in is \(4, 99\), expected \(4, 100\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(mia.MembershipError, match=message) as e:
            mia.evaluate_membership(*ev, **kwargs)
        assert "\n" not in str(e.value), message
    # Two references, each example IN for exactly one: offline a cannot be tuned, and the error says to pass it.
    pair = np.stack([shadow_in[0], ~shadow_in[0]])
    pop = dict(population_images=images[n:], population_labels=labels[n:], bootstrap=0)
    with pytest.raises(mia.MembershipError, match="pass offline_a"):
        mia.evaluate_membership(*ev, shadow_predicts=refs[:2], shadow_in=pair, **pop)
    report = mia.evaluate_membership(*ev, shadow_predicts=refs[:2], shadow_in=pair, rmia_offline_a=0.5, **pop)
    assert {"rmia_offline", "rmia_online"} <= set(report.table)
