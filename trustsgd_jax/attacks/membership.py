"""Membership inference scores and attacks on a trained model's logits.

Scores (higher = "member"), all from the model in **eval mode** (BatchNorm on
running averages; the LiRA reference code once scored in training mode by
mistake):

* ``confidence``: the maximum softmax probability (Shokri et al. 2017, black
  box), reported as its logarithm, log max_i p_i (see below);
* ``loss``: minus the cross-entropy, log p_y (Yeom et al. 2018);
* ``entropy``: minus the prediction entropy, sum_i p_i log p_i;
* ``mentr``: minus the modified entropy of Song & Mittal (2021),
  Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i);
* ``lira``: LiRA (Carlini et al. 2022) on the logit-scaled confidence
  phi = log(p_y / (1 - p_y)) = z_y - logsumexp_{i != y} z_i, online (Gaussian
  IN and OUT fits) or offline (OUT only; the paper's one-sided test or the
  reference code's two-sided density), with the paper's choices of location,
  variance and global-variance switch as defaults and the reference code's as
  named options (`lira_scores`);
* ``rmia``: RMIA (Zarifzadeh, Liu & Shokri 2024) on p_y, online or offline
  (the approximation parameter ``a``): the fraction of a population Z of
  never-trained-on samples z whose pairwise likelihood ratio
  (p_y(x|theta) / Pr(x)) / (p_y(z|theta) / Pr(z)) is at least gamma
  (`rmia_scores`, `tune_offline_a`).

LiRA and RMIA take the same inputs, the target's and K reference models'
scores on the evaluation set and the [K, N] IN mask, RMIA the population's
scores besides, so both come from one training (`evaluate_membership`).

Every score is computed in float64 from the logits, in a form that keeps the
tail of confident predictions. With the margin d = z_c - logsumexp_{i != c} z_i
of class c, p_c = sigmoid(d) and 1 - p_c = sigmoid(-d) < e^-d. Once e^-d is
below the machine epsilon (d above -log eps: about 17 in float32, 37 in
float64), p_max, log p_y and 1 - p_y computed the direct way round to exactly
1, 0 and 0 for every confident example. Those ties flatten the ROC curve at
low FPR, where the members an attack finds with confidence live. Instead:

* log p_c = -log(1 + e^-d) (``np.logaddexp(0, -d)``, which uses log1p) and
  log(1 - p_c) = -log(1 + e^d) for the most probable class, whose p is the
  only one that can approach 1; every other class has p <= 1/2, where
  ``scipy.special.log_softmax`` and ``log1p(-p)`` are accurate;
* 1 - p_y = exp(log(1 - p_y)), never 1 minus a rounded p_y.

``confidence`` is log max_i p_i rather than max_i p_i because the latter
rounds to 1.0 for confident predictions even in float64; the logarithm is
monotone, so it orders examples exactly as max p does and every ROC metric
(AUC, TPR at FPR, the best threshold's accuracy) is that of the confidence
attack. The forms stay distinct until e^-d underflows float64 (d above about
745) for ``confidence``, ``loss`` and ``entropy``, or e^-2d does (d above
about 372) for ``mentr``; phi never saturates.

Threshold attacks choose their threshold on a calibration set whose
membership the attacker knows (the shadow models' IN/OUT examples), never on
the evaluation set; the oracle best-threshold accuracy on the evaluation set
is reported beside it, because that is what the paper's Table 2 reports. The
ROC metrics live in `trustsgd_jax.metrics`, the target and shadow training in
`trustsgd_jax.attacks.shadows`.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import special, stats

from trustsgd_jax import metrics

THRESHOLD_ATTACKS = ("confidence", "loss", "entropy", "mentr")


class MembershipError(ValueError):
    """Inputs that no membership attack can score; the message says what is wrong."""


# ---------------------------------------------------------------- scores


def _as_float64_logits(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    z, y = np.asarray(logits, np.float64), np.asarray(labels)
    if z.ndim != 2 or len(z) != len(y):
        raise MembershipError(f"logits must be [N, classes] for N labels, got {z.shape} and {y.shape}.")
    if len(y) and (y.min() < 0 or y.max() >= z.shape[1]):
        raise MembershipError(f"labels must lie in [0, {z.shape[1]}), got [{y.min()}, {y.max()}].")
    if not np.isfinite(z).all():
        raise MembershipError(
            f"logits hold {int((~np.isfinite(z)).sum())} NaN or infinite values; "
            "the model diverged or the predict function is wrong."
        )
    return z, y


def _margin(z: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """z_c - logsumexp_{i != c} z_i for class `cls[n]` of row n: log(p_c / (1 - p_c)) without forming p_c."""
    rows = np.arange(len(z))
    others = z.copy()
    others[rows, cls] = -np.inf
    return z[rows, cls] - special.logsumexp(others, axis=1)


def logit_scaled_confidence(logits, labels) -> np.ndarray:
    """phi = log p_y - log(1 - p_y) = z_y - logsumexp_{i != y} z_i, in float64 (finite for p_y in {0, 1})."""
    z, y = _as_float64_logits(logits, labels)
    return _margin(z, y)


def membership_scores(logits, labels) -> dict[str, np.ndarray]:
    """Per-example scores of every threshold attack plus LiRA's statistic ``phi``; higher means member.

    float64, with the stable forms of the module docstring: ``confidence`` is
    log max_i p_i, ``loss`` log p_y, ``entropy`` sum_i p_i log p_i, ``mentr``
    minus Song & Mittal's modified entropy.
    """
    z, y = _as_float64_logits(logits, labels)
    rows = np.arange(len(y))
    top = z.argmax(1) if z.size else np.zeros(len(y), int)
    d_top = _margin(z, top)
    is_top = np.zeros(z.shape, bool)
    is_top[rows, top] = True
    logp = special.log_softmax(z, axis=1)
    logp[rows, top] = -np.logaddexp(0.0, -d_top)  # log sigmoid(d): keeps log p_max < 0 where p_max rounds to 1
    p = np.exp(logp)
    log1m = np.log1p(-np.where(is_top, 0.0, p))  # log(1 - p_i), accurate where p_i <= 1/2
    log1m[rows, top] = -np.logaddexp(0.0, d_top)  # log(1 - p_max) = log sigmoid(-d)
    logp_y, log1m_y = logp[rows, y], log1m[rows, y]
    not_y = np.ones(z.shape, bool)
    not_y[rows, y] = False
    mentr = -np.exp(log1m_y) * logp_y - np.where(not_y, p * log1m, 0.0).sum(1)
    return {
        "confidence": logp[rows, top],  # log max p: the order of max p, without its rounding to 1
        "loss": logp_y,  # = -cross-entropy
        "entropy": (p * logp).sum(1),  # = -entropy
        "mentr": -mentr,
        "phi": _margin(z, y),
    }


# ---------------------------------------------------------------- attack metrics


def attack_metrics(scores, is_member, threshold: float | None = None, bootstrap: int = 200, seed: int = 0) -> dict:
    """AUC, TPR at 1% / 0.1% FPR, oracle (and, with `threshold`, calibrated) balanced accuracy, 95% bootstrap CIs."""
    s, m = np.asarray(scores, np.float64), np.asarray(is_member, bool)
    if m.all() or not m.any():
        raise MembershipError("metrics need both members and non-members in the evaluation set.")

    def point(s, m):
        out = {
            "auc": metrics.auc(s, m),
            "tpr@1%fpr": metrics.tpr_at_fpr(s, m, 0.01),
            "tpr@0.1%fpr": metrics.tpr_at_fpr(s, m, 0.001),
            "oracle_acc": metrics.best_balanced_accuracy(s, m)[0],
        }
        if threshold is not None:
            out["calibrated_acc"] = metrics.balanced_accuracy_at(s, m, threshold)
        return out

    result = point(s, m)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(bootstrap):
        i = rng.integers(0, len(s), len(s))
        if m[i].all() or not m[i].any():
            continue
        boots.append(point(s[i], m[i]))
    for k in list(result):
        vals = np.array([b[k] for b in boots])
        result[f"{k}_ci"] = [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if len(vals) else None
    result.update(n_members=int(m.sum()), n_nonmembers=int((~m).sum()))
    return result


# ---------------------------------------------------------------- LiRA

LIRA_OFFLINE_TESTS = ("one_sided", "two_sided")
LIRA_CENTERS = ("mean", "median")
LIRA_VARIANCE_POOLING = ("within", "all_values")
# Carlini et al. 2022 estimate one global variance when they have fewer than 64 shadow models.
LIRA_GLOBAL_VARIANCE_BELOW = 64


def _sum_over_references(v: np.ndarray) -> np.ndarray:
    """Sum over axis 0 (the reference models), sorted first so that the result is bit-identical for any model order."""
    return np.sort(v, axis=0).sum(0)


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise MembershipError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}.")
    return value


def _lira_fit(sp, w, global_variance: bool, center: str, pooling: str):
    """Location and scale of the Gaussian fitted, per example and view, to the values `sp` [K, N, A] where `w`."""
    count = w.sum(0)  # [N, 1]
    n = np.maximum(count, 1)
    mean = _sum_over_references(np.where(w, sp, 0.0)) / n
    var = _sum_over_references(np.where(w, (sp - mean) ** 2, 0.0)) / n
    if center == "median":
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an example with no value here is refused by the caller
            loc = np.nanmedian(np.where(w, sp, np.nan), axis=0)
    else:
        loc = mean
    if global_variance and pooling == "within":  # per view: the per-example variances, weighted by their counts
        var = np.broadcast_to((var * count).sum(0) / max(int(count.sum()), 1), var.shape)
    elif global_variance:  # all_values: every selected value about their grand mean, over examples and views
        total = max(int(count.sum()) * sp.shape[-1], 1)
        grand = _sum_over_references(np.where(w, sp, 0.0)).sum() / total
        var = np.full(var.shape, _sum_over_references(np.where(w, (sp - grand) ** 2, 0.0)).sum() / total)
    return loc, np.sqrt(var) + 1e-6, count


def lira_scores(
    target_phi,
    shadow_phi,
    shadow_in,
    online: bool = True,
    global_variance: bool = False,
    *,
    offline_test: str = "one_sided",
    center: str = "mean",
    variance_pooling: str = "within",
) -> np.ndarray:
    """LiRA membership score per example (higher = member), Carlini et al. 2022, "Membership Inference Attacks From
    First Principles".

    For example x with view a, the K reference (shadow) models give phi values;
    those of the models that trained on x (IN) and of those that did not (OUT)
    are each fitted with a Gaussian N(mu, sigma^2). With t the target's phi:

    * online: the log likelihood ratio
      log N(t; mu_in, sigma_in^2) - log N(t; mu_out, sigma_out^2);
    * offline, ``offline_test="one_sided"`` (default; the paper, Sec. IV-C):
      -log Pr[T > t] for T ~ N(mu_out, sigma_out^2), how improbably high the
      target's confidence is for a model that did not train on x;
    * offline, ``offline_test="two_sided"``: -log N(t; mu_out, sigma_out^2),
      the OUT density that tensorflow/privacy's
      ``research/mi_lira_2021/plot.py`` (``generate_ours_offline``) scores. It
      also flags a confidence unusually *low* for x, which a member rarely has.

    The score is the mean over the A views.

    Args:
      target_phi: [N] or [N, A] logit-scaled confidences of the target model
        (A query augmentations).
      shadow_phi: [K, N] or [K, N, A] the same for K shadow models.
      shadow_in: [K, N] bool, whether shadow k trained on example n.
      online: fit IN and OUT Gaussians (needs an IN and an OUT model for every
        example); offline: OUT only.
      global_variance: one variance per (IN/OUT, view) shared by all
        examples instead of one per example. The paper uses it below 64
        shadow models (`scores_table`'s ``global_variance_below``).
      center: ``"mean"`` (default) or ``"median"`` of the K values, the
        Gaussian's location. The mean is the paper's Algorithm 1 (the Gaussian
        maximum-likelihood fit the test assumes); the reference code's
        ``plot.py`` takes the median, robust to one outlying model. The scale
        is the standard deviation about the mean either way, as in both.
      variance_pooling: with ``global_variance`` only. ``"within"`` (default)
        pools each example's spread about its own mean (weighted by its number
        of models), per view; ``"all_values"`` is ``plot.py``'s
        ``fix_variance``: the spread of all IN (or OUT) values of all examples
        and views about their grand mean. The default measures what the test
        needs, how phi of one example varies across models; ``"all_values"``
        adds the spread between examples' means (easy against hard examples),
        which widens both Gaussians. (``plot.py``'s online branch also takes
        the OUT scale from the IN values; each side uses its own values here.)

    Every reduction over the K models is done in sorted order, so the scores
    are bit-identical under any permutation of the models. Unlike ``plot.py``,
    which keeps the first min-count models of every example, all models are
    used.
    """
    _choice(offline_test, LIRA_OFFLINE_TESTS, "offline_test")
    _choice(center, LIRA_CENTERS, "center")
    _choice(variance_pooling, LIRA_VARIANCE_POOLING, "variance_pooling")
    t = np.asarray(target_phi, np.float64)
    sp = np.asarray(shadow_phi, np.float64)
    inn = np.asarray(shadow_in, bool)
    if t.ndim == 1:
        t, sp = t[:, None], sp[..., None]
    if inn.ndim != 2 or sp.shape[:2] != inn.shape or sp.shape[1:] != t.shape:
        raise MembershipError(f"shadow scores {sp.shape}, IN mask {inn.shape} and target {t.shape} do not line up.")
    k = inn.shape[0]
    if online and k < 2:
        raise MembershipError(f"online LiRA needs at least 2 shadow models (IN and OUT fits), got {k}.")
    if k < 1:
        raise MembershipError("LiRA needs at least one shadow model.")
    w_in, w_out = inn[..., None], (~inn)[..., None]
    if online and (not w_in.any(0).all() or not w_out.any(0).all()):
        raise MembershipError("some examples have no IN or no OUT shadow model: train more shadows (K >= 4).")
    if not w_out.any(0).all():
        raise MembershipError("some examples have no OUT shadow model: train more shadows.")
    for side, w in (("OUT", w_out), ("IN", w_in) if online else ("OUT", w_out)):
        if not global_variance and w.sum(0).min() < 2:
            raise MembershipError(
                f"some example has fewer than 2 {side} shadow models, so its own variance is undefined: train more "
                "shadows or use global_variance=True."
            )
        if global_variance and variance_pooling == "within" and w.sum(0).max() < 2:
            raise MembershipError(
                f"no example has 2 {side} shadow models, so the spread within an example is undefined: train more "
                "shadows or use variance_pooling='all_values' (the spread of all values, LiRA's reference code)."
            )
    mu_out, sd_out, _ = _lira_fit(sp, w_out, global_variance, center, variance_pooling)
    if online:
        mu_in, sd_in, _ = _lira_fit(sp, w_in, global_variance, center, variance_pooling)
        llr = stats.norm.logpdf(t, mu_in, sd_in) - stats.norm.logpdf(t, mu_out, sd_out)
        return llr.mean(-1)
    if offline_test == "two_sided":
        return (-stats.norm.logpdf(t, mu_out, sd_out)).mean(-1)
    return (-stats.norm.logsf(t, mu_out, sd_out)).mean(-1)


# ---------------------------------------------------------------- RMIA

RMIA_VIEWS = ("mean", "vote")
RMIA_GAMMA = 2.0
OFFLINE_A_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def _log_mean_exp(lp: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log of the mean over axis 0 of exp(lp) where `mask` (every column needs one), in the order-free sorted form."""
    v = np.sort(np.where(mask, lp, -np.inf), axis=0)
    return special.logsumexp(v, axis=0) - np.log(np.maximum(mask.sum(0), 1))


def _offline_log_prior(log_p_out: np.ndarray, a: float) -> np.ndarray:
    """log Pr = log(((1 + a) / 2) Pr_OUT + (1 - a) / 2), the offline approximation of RMIA."""
    with np.errstate(divide="ignore"):  # a = 1: log 0 = -inf, and logaddexp(x, -inf) = x
        return np.logaddexp(np.log1p(a) - np.log(2.0) + log_p_out, np.log1p(-a) - np.log(2.0))


def _fraction_dominated(threshold: np.ndarray, log_rz: np.ndarray) -> np.ndarray:
    """Per row n, the fraction of population rows z whose views vote log_rz[z] <= threshold[n] in a strict majority."""
    z, views = log_rz.shape
    if views == 1:
        return np.searchsorted(np.sort(log_rz[:, 0]), threshold[:, 0], side="right") / z
    need = views // 2 + 1
    out = np.empty(len(threshold))
    block = max(1, (1 << 24) // max(z * views, 1))  # bounds the [block, Z, A] comparison in memory
    for s in range(0, len(threshold), block):
        votes = (log_rz[None] <= threshold[s : s + block, None]).sum(-1)
        out[s : s + block] = (votes >= need).mean(1)
    return out


def _log_probs(x, name: str, ndim: int) -> np.ndarray:
    v = np.asarray(x, np.float64)
    if v.ndim != ndim:
        raise MembershipError(f"{name} needs {ndim} or {ndim - 1} axes ([models,] samples[, views]), got {v.shape}.")
    if not np.isfinite(v).all():
        raise MembershipError(f"{name} holds {int((~np.isfinite(v)).sum())} NaN or infinite log-probabilities.")
    if (v > 0).any():
        raise MembershipError(f"{name} must be log-probabilities log p_y <= 0 (not phi or p), got max {v.max():.3g}.")
    return v


def rmia_scores(
    target_logp,
    reference_logp,
    reference_in,
    population_target_logp,
    population_reference_logp,
    *,
    online: bool = True,
    offline_a: float | None = None,
    gamma: float = RMIA_GAMMA,
    views: str = "mean",
) -> np.ndarray:
    """RMIA membership score per example (higher = member): Zarifzadeh, Liu & Shokri, ICML 2024, "Low-Cost
    High-Power Membership Inference Attacks".

    With Pr(x | theta) = p_y(x), the target model theta's softmax probability
    of the true label (the ``loss`` score of `membership_scores`, log p_y, in
    eval mode), and Pr(x) its average over reference models theta':

      LR(x, z) = (Pr(x | theta) / Pr(x)) / (Pr(z | theta) / Pr(z)),
      score(x) = |{z in Z : LR(x, z) >= gamma}| / |Z|,

    for a population Z of samples that no model (target or reference) trained
    on. Pr(x) and Pr(z) both stand for the mixture (Pr_IN + Pr_OUT) / 2 of
    the models that did and did not train on the sample:

    * online, Pr(x) = (Pr_IN(x) + Pr_OUT(x)) / 2, the means over the
      references that trained on x and those that did not (needs one of each
      for every x); this is the mean over all references when x is IN for
      half of them, as `shadows.train_target_and_shadows` arranges;
    * offline, from OUT references only, Pr_IN is approximated by
      a Pr_OUT + (1 - a), so Pr(x) = ((1 + a) / 2) Pr_OUT(x) + (1 - a) / 2
      (a = 1 takes Pr(x) = Pr_OUT(x)).

    No reference trained on a population sample, so Pr(z) is the offline
    formula over all references in both modes: as ml_privacy_meter computes
    it for its population (which no model trained on either), and as its
    2024_rmia README puts it, "p(x) and p(z) from p_OUT(x) and p_OUT(z)". In
    the paper's own experiments z comes from the pool the references train
    on, so Pr(z) averages IN and OUT models like Pr(x); the plain OUT mean
    here would put a never-seen z's ratio near 1 while a non-member x's is
    below 1, so z would no longer stand for a non-member, and gamma (2 in
    the paper's configs) would tie many examples at score 0 (a = 1 gives
    exactly that OUT mean). Online, ``offline_a`` is therefore still needed,
    for Pr(z) only.

    Since score(x) = F(log r(x) - log gamma), with r(x) = Pr(x | theta) / Pr(x)
    and F the empirical CDF of log r(z) over Z (with one view), the score is a
    non-decreasing function of r(x): gamma, ``a`` in Pr(z) and the population
    change the score's resolution (steps of 1 / |Z|, and ties at 0 or 1 where
    r(x) / gamma falls outside the population's range) and its meaning as a
    fraction, not the order of the examples; ties at 1 cost TPR at low FPR.

    Views (query augmentations): ``views="mean"`` (default) averages each
    model's probabilities over the views, Pr(x | theta) = mean_a p_y(x_a),
    then applies the definition once; ``views="vote"`` is the paper's code
    (``research/2024_rmia/main.py``): LR_a(x, z) >= gamma on each view a
    from view a's probabilities, z counted when a strict majority of the
    views agree. The vote was made for 18 views; with the 2 views of
    ``augment="flip"`` a strict majority means both, so the score moves in
    coarser steps and loses the ordering of examples whose views disagree,
    hence the mean as default. With one view the two coincide.

    All arithmetic is in float64 log space (log Pr = logsumexp - log count);
    the references are reduced in sorted order, so the scores are
    bit-identical under any permutation of the reference models.

    Semantics matched against privacytrustlab/ml_privacy_meter:
    ``modules/mia/attacks/rmia.py`` (``run_rmia``, ``get_out_ref_signals``,
    ``tune_offline_a``), ``get_signals.py`` (``get_softmax``: the true label's
    softmax in eval mode) and, for the paper's experiments,
    ``research/2024_rmia/main.py`` and its attack configs at commit
    d32734161a3395211fe5f3cd461932290b1fafbe. Deliberate differences:

    * LR >= gamma as the paper defines it (their code tests LR > gamma);
    * the plain mean of Pr(x | theta') and temperature 1 (the paper's text
      and the library's defaults; the research configs use a 20% trimmed
      mean and, for CIFAR-10, temperature 2);
    * online Pr(x) weighs IN and OUT halves equally over all references
      (the research code keeps the first m IN and m OUT models);
    * offline needs an OUT reference for every x (the library inverts the
      ``a`` formula when its only reference trained on x);
    * the default gamma = 2 is that of the research configs (the library
      uses 1).

    Args:
      target_logp: [N] or [N, A] log Pr(x | theta) of the target model.
      reference_logp: [K, N] or [K, N, A] the same for K reference models.
      reference_in: [K, N] bool, whether reference k trained on example n.
      population_target_logp: [Z] or [Z, A] log Pr(z | theta) on the
        population; Z >= 1. That no model trained on these samples cannot be
        seen in scores: `evaluate_membership` checks the images
        (`check_population_disjoint`).
      population_reference_logp: [K, Z] or [K, Z, A] the same for the
        references.
      online: use IN and OUT references (K >= 2); offline uses OUT only
        (K >= 1) with ``offline_a``.
      offline_a: a in [0, 1], required (offline for Pr(x) and Pr(z), online
        for Pr(z)); the paper's configs use 0.3 on CIFAR-10 and 0.6 on
        CIFAR-100, and `tune_offline_a` picks it from the references.
      gamma: the threshold on LR(x, z), > 0 (the paper uses gamma >= 1).
      views: ``"mean"`` (default) or ``"vote"``, see above.
    """
    _choice(views, RMIA_VIEWS, "views")
    if not (np.isfinite(gamma) and gamma > 0):
        raise MembershipError(f"gamma must be a positive number, got {gamma}.")
    t = np.asarray(target_logp, np.float64)
    zt = np.asarray(population_target_logp, np.float64)
    vec_t, vec_z = t.ndim == 1, zt.ndim == 1
    t = _log_probs(t[:, None] if vec_t else t, "target_logp", 2)
    r = _log_probs(np.asarray(reference_logp)[..., None] if vec_t else reference_logp, "reference_logp", 3)
    zt = _log_probs(zt[:, None] if vec_z else zt, "population_target_logp", 2)
    zr = _log_probs(
        np.asarray(population_reference_logp)[..., None] if vec_z else population_reference_logp,
        "population_reference_logp",
        3,
    )
    inn = np.asarray(reference_in, bool)
    if inn.ndim != 2 or r.shape[:2] != inn.shape or r.shape[1:] != t.shape:
        raise MembershipError(f"reference scores {r.shape}, IN mask {inn.shape} and target {t.shape} do not line up.")
    if zr.shape[1:] != zt.shape or zr.shape[0] != r.shape[0] or zt.shape[1] != t.shape[1]:
        raise MembershipError(
            f"population scores {zr.shape} (references) and {zt.shape} (target) do not line up with "
            f"{r.shape[0]} references and {t.shape[1]} views."
        )
    if len(zt) == 0:
        raise MembershipError("RMIA needs a population of at least one sample that no model trained on.")
    k = inn.shape[0]
    if views == "mean":  # each model's probability averaged over the views, then one comparison
        t, zt, r, zr = (special.logsumexp(v, -1, keepdims=True) - np.log(v.shape[-1]) for v in (t, zt, r, zr))
    w_in, w_out = inn[..., None], (~inn)[..., None]
    if offline_a is None or not 0.0 <= offline_a <= 1.0:
        raise MembershipError(f"RMIA needs offline_a in [0, 1] for Pr(z) (see tune_offline_a), got {offline_a}.")
    if online:
        if k < 2:
            raise MembershipError(f"online RMIA needs at least 2 reference models (IN and OUT), got {k}.")
        lacking = int((~(w_in.any(0) & w_out.any(0))).sum())
        if lacking:
            raise MembershipError(f"online RMIA needs an IN and an OUT reference per example; {lacking} lack one.")
        log_px = np.logaddexp(_log_mean_exp(r, w_in), _log_mean_exp(r, w_out)) - np.log(2.0)
    else:
        if k < 1:
            raise MembershipError("offline RMIA needs at least one reference model.")
        lacking = int((~w_out.any(0)).sum())
        if lacking:
            raise MembershipError(f"offline RMIA needs an OUT reference for every example; {lacking} have none.")
        log_px = _offline_log_prior(_log_mean_exp(r, w_out), offline_a)
    log_pz = _offline_log_prior(_log_mean_exp(zr, np.ones((k, 1, 1), bool)), offline_a)
    return _fraction_dominated(t - log_px - np.log(gamma), zt - log_pz)


def tune_offline_a(
    reference_logp,
    reference_in,
    population_reference_logp,
    *,
    gamma: float = RMIA_GAMMA,
    views: str = "mean",
    grid=OFFLINE_A_GRID,
) -> tuple[float, dict[float, float]]:
    """The offline ``a`` of RMIA that best attacks the reference models themselves: (a, {a: mean AUC}).

    Each reference j in turn plays the target, attacked by offline RMIA with
    the other references, on the examples that have an OUT model among those
    others, and scored by AUC against j's known IN/OUT split. The a on `grid`
    with the highest AUC averaged over the j that have both members and
    non-members there wins (the smallest such a on a tie). ml_privacy_meter
    (``tune_offline_a``) does this with one paired model and the grid 0, 0.1,
    ..., 1; every reference takes the role here, which makes the choice
    independent of the models' order. Needs K >= 3 when each example is IN
    for half of the references. Uses only what the attacker knows: the
    references and their splits, never the target. The a found also serves
    online RMIA, for Pr(z).
    """
    r = np.asarray(reference_logp, np.float64)
    zr = np.asarray(population_reference_logp, np.float64)
    inn = np.asarray(reference_in, bool)
    if r.ndim == 2:
        r = r[..., None]
    if zr.ndim == 2:
        zr = zr[..., None]
    if inn.ndim != 2 or r.shape[:2] != inn.shape or zr.shape[0] != inn.shape[0]:
        raise MembershipError(f"reference scores {r.shape}, IN mask {inn.shape}, population {zr.shape} do not line up.")
    k = inn.shape[0]
    aucs: dict[float, list[float]] = {float(a): [] for a in grid}
    for j in range(k):
        others = np.arange(k) != j
        usable = (~inn[others]).any(0)
        member = inn[j, usable]
        if member.all() or not member.any():
            continue
        for a in aucs:
            s = rmia_scores(
                r[j, usable],
                r[others][:, usable],
                inn[others][:, usable],
                zr[j],
                zr[others],
                online=False,
                offline_a=a,
                gamma=gamma,
                views=views,
            )
            aucs[a].append(metrics.auc(s, member))
    if not any(aucs.values()):
        raise MembershipError(
            f"cannot tune offline_a from {k} references: none has members and non-members with an OUT model among "
            "the others (needs K >= 3); pass offline_a."
        )
    mean = {a: float(np.sort(v).mean()) for a, v in aucs.items()}
    best = max(mean, key=lambda a: (mean[a], -a))
    return best, mean


def augmentations(images: np.ndarray, kind: str) -> list[np.ndarray]:
    """Query views for LiRA: ``none``, ``flip`` (identity, horizontal flip) or ``flip_shift`` (+/-2 px shifts)."""
    views = [images]
    if kind in ("flip", "flip_shift"):
        views.append(images[:, :, ::-1])
    if kind == "flip_shift":
        for dx in (-2, 2):
            views.append(np.roll(images, dx, axis=2))
    if kind not in ("none", "flip", "flip_shift"):
        raise MembershipError(f"unknown augmentation {kind!r}; use none, flip or flip_shift.")
    return views


# ---------------------------------------------------------------- one table


@dataclasses.dataclass
class MembershipReport:
    table: dict  # attack -> metrics
    roc: dict  # attack -> (fpr, tpr)


def check_population_disjoint(images, population_images) -> None:
    """Raises MembershipError if any population image is byte-identical to an evaluation image.

    Images are compared as float32 arrays, by a hash of their bytes and then
    exactly. RMIA's population must hold samples that no model trained on;
    every model here trains on part of the evaluation pool, so a population
    disjoint from the pool satisfies that. Near-duplicates (an image saved
    twice with different rounding) are not detected.
    """
    a = np.ascontiguousarray(np.asarray(images, np.float32)).reshape(len(images), -1)
    b = np.ascontiguousarray(np.asarray(population_images, np.float32)).reshape(len(population_images), -1)
    if a.shape[1] != b.shape[1]:
        raise MembershipError(f"population images {b.shape[1]} values each, evaluation images {a.shape[1]}.")
    seen: dict[int, list[int]] = {}
    for i, row in enumerate(a):
        seen.setdefault(hash(row.tobytes()), []).append(i)
    shared = [j for j, row in enumerate(b) if any(np.array_equal(a[i], row) for i in seen.get(hash(row.tobytes()), ()))]
    if shared:
        raise MembershipError(
            f"the population overlaps the evaluation set in {len(shared)} images (e.g. population index "
            f"{shared[0]}); RMIA's population must be samples that no model trained on."
        )


def _check_table_inputs(is_member, lira_offline_tests, lira_center, lira_variance_pooling, rmia_views) -> np.ndarray:
    """The membership mask as bool, after checking it holds both kinds and every table option is known."""
    is_member = np.asarray(is_member, bool)
    if is_member.all() or not is_member.any():
        raise MembershipError("the evaluation set needs both members and non-members.")
    for name in lira_offline_tests:
        _choice(name, LIRA_OFFLINE_TESTS, "LiRA offline test")
    _choice(lira_center, LIRA_CENTERS, "center")
    _choice(lira_variance_pooling, (*LIRA_VARIANCE_POOLING, "auto"), "variance_pooling")
    _choice(rmia_views, RMIA_VIEWS, "views")
    return is_member


def _table_options(options: dict) -> dict:
    """`scores_table`'s options with its defaults filled in; an unknown name is a one-line error."""
    params = inspect.signature(scores_table).parameters
    valid = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _TABLE_DATA]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise MembershipError(f"unknown membership option(s) {', '.join(unknown)}; use one of {', '.join(valid)}.")
    return {n: options.get(n, params[n].default) for n in valid}


def evaluate_membership(
    predict: Callable[[np.ndarray], np.ndarray],
    images,
    labels,
    is_member,
    *,
    shadow_predicts: list | None = None,
    shadow_in=None,
    augment: str = "none",
    population_images=None,
    population_labels=None,
    **table_options,
) -> MembershipReport:
    """Every attack's metrics in one table for a trained target model.

    Rows: the threshold attacks (``confidence``, ``loss``, ``entropy``,
    ``mentr``); with shadow models, ``lira_offline`` (one-sided),
    ``lira_offline_two_sided`` (if asked for) and ``lira_online`` (K >= 2);
    with a population too, ``rmia_offline`` and ``rmia_online`` (K >= 2). LiRA
    and RMIA are scored from the same K reference (shadow) models and views.
    This runs the models once per query view and hands the logits to
    `membership_table`, which scores them.

    Args:
      predict: images -> eval-mode logits of the target model.
      images, labels, is_member: the evaluation set (members and non-members).
      shadow_predicts, shadow_in: K shadow models' eval-mode predict functions
        and [K, N] masks of which evaluation examples each trained on. They
        calibrate the thresholds and feed LiRA and RMIA; without them only the
        oracle accuracies, AUC and TPR are reported.
      augment: the query views (`augmentations`), for LiRA, RMIA and the
        population alike.
      population_images, population_labels: RMIA's population Z, samples
        that no model trained on (checked: none may equal an evaluation
        image, `check_population_disjoint`). Their scores come from the same
        predict functions and views.
      **table_options: the attacks' options (LiRA's variance, centre and
        offline test; RMIA's gamma, a and views; the bootstrap), documented
        once in `scores_table`. They are checked before any model runs.
    """
    if len(images) == 0:
        raise MembershipError("the evaluation set is empty.")
    options = _table_options(table_options)
    # Before any model runs: scores_table checks the same again on the scores.
    _check_table_inputs(
        is_member,
        options["lira_offline_tests"],
        options["lira_center"],
        options["lira_variance_pooling"],
        options["rmia_views"],
    )
    if population_images is not None:
        if not shadow_predicts:
            raise MembershipError("RMIA (a population was given) needs reference models: pass shadow_predicts.")
        if population_labels is None or len(population_labels) != len(population_images):
            raise MembershipError("population_images need population_labels, one per image.")
        if len(population_images) == 0:
            raise MembershipError("the population is empty; RMIA needs at least one sample.")
        check_population_disjoint(images, population_images)
    views = augmentations(np.asarray(images), augment)
    pop_views = augmentations(np.asarray(population_images), augment) if population_images is not None else []
    refs = list(shadow_predicts or [])
    return membership_table(
        [predict(v) for v in views],
        labels,
        is_member,
        shadow_logits=[[p(v) for v in views] for p in refs] if refs else None,
        shadow_in=shadow_in,
        population_labels=population_labels,
        population_target_logits=[predict(v) for v in pop_views] if pop_views else None,
        population_shadow_logits=[[p(v) for v in pop_views] for p in refs] if pop_views else None,
        **options,
    )


# scores_table's keyword arguments that are data, not options.
_TABLE_DATA = (
    "shadow_scores",
    "shadow_in",
    "population_target_scores",
    "population_shadow_scores",
)
SCORE_NAMES = (*THRESHOLD_ATTACKS, "phi")


def logit_scores(
    target_logits,
    labels,
    is_member,
    *,
    shadow_logits=None,
    shadow_in=None,
    population_labels=None,
    population_target_logits=None,
    population_shadow_logits=None,
) -> dict:
    """`scores_table`'s data arguments from logits: each logit row becomes its `membership_scores`.

    ``target_logits`` is [A] arrays [N, C] (the target on each view of the
    evaluation set), ``shadow_logits`` [K][A] the same per reference model,
    ``population_*_logits`` the same on the population's views. The result
    is what `load_scores_npz` returns, so ``scores_table(**logit_scores(...),
    **options)`` scores it and `scores_npz` keeps it.
    """
    if population_target_logits is not None and not shadow_logits:
        raise MembershipError("RMIA (population logits were given) needs reference models: pass shadow_logits.")
    if population_target_logits is not None and (population_shadow_logits is None or population_labels is None):
        raise MembershipError(
            "RMIA needs the population's labels and every reference's logits on it: pass population_labels and "
            "population_shadow_logits with population_target_logits."
        )
    labels = np.asarray(labels)

    def scored(per_view, y):
        return [membership_scores(z, y) for z in per_view]

    population = population_target_logits is not None
    return dict(
        target_scores=scored(target_logits, labels),
        is_member=np.asarray(is_member, bool),
        shadow_scores=[scored(v, labels) for v in shadow_logits] if shadow_logits else None,
        shadow_in=np.asarray(shadow_in, bool) if shadow_logits else None,
        population_target_scores=scored(population_target_logits, population_labels) if population else None,
        population_shadow_scores=[scored(v, population_labels) for v in population_shadow_logits]
        if population
        else None,
    )


def membership_table(target_logits, labels, is_member, **inputs_and_options) -> MembershipReport:
    """`evaluate_membership`'s table from logits already computed: `logit_scores`, then `scores_table`.

    Keyword arguments are `logit_scores`' (the references' and population's
    logits) and `scores_table`'s options, which that function documents.
    Computing the logits once lets a caller score many reference subsets or
    snapshots without running a model again.
    """
    params = inspect.signature(logit_scores).parameters.values()
    data_names = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    inputs = {n: inputs_and_options.pop(n) for n in data_names if n in inputs_and_options}
    options = _table_options(inputs_and_options)  # before scoring: an unknown option is a one-line error
    return scores_table(**logit_scores(target_logits, labels, is_member, **inputs), **options)


def stack_scores(per_view: list[dict]) -> dict[str, np.ndarray]:
    """One model's `membership_scores` per query view as {score: [N, A]} (for storing; `unstack_scores` inverts)."""
    return {k: np.stack([v[k] for v in per_view], -1) for k in SCORE_NAMES}


def unstack_scores(arrays: dict) -> list[dict]:
    """{score: [N, A]} back to a list of A `membership_scores` dicts, the input of `scores_table`."""
    views = arrays[SCORE_NAMES[0]].shape[-1]
    return [{k: np.asarray(arrays[k])[:, a] for k in SCORE_NAMES} for a in range(views)]


def scores_npz(scores: dict) -> bytes:
    """`logit_scores`' result as a compressed npz: rescoring needs no model (`load_scores_npz` inverts it).

    Keys ``{model}/{score}`` [N, A] for ``target``, ``shadow{k}``,
    ``population_target`` and ``population_shadow{k}`` (`stack_scores`), plus
    ``is_member`` [N] and ``shadow_in`` [K, N]. Five numbers per logit row
    instead of the logits (CIFAR-100's 100 classes would make the file 20
    times larger).
    """
    out: dict[str, Any] = {"is_member": np.asarray(scores["is_member"], bool)}

    def put(model: str, per_view):
        out.update({f"{model}/{k}": v for k, v in stack_scores(per_view).items()})

    put("target", scores["target_scores"])
    for k, views in enumerate(scores.get("shadow_scores") or []):
        put(f"shadow{k}", views)
    if scores.get("shadow_scores"):
        out["shadow_in"] = np.asarray(scores["shadow_in"], bool)
    if scores.get("population_target_scores") is not None:
        put("population_target", scores["population_target_scores"])
        for k, views in enumerate(scores["population_shadow_scores"]):
            put(f"population_shadow{k}", views)
    buf = io.BytesIO()
    np.savez_compressed(buf, **out)
    return buf.getvalue()


def load_scores_npz(path) -> dict:
    """A `scores_npz` file (a path or a file object) as `logit_scores` returned it: ``scores_table(**loaded, ...)``."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}

    def model(name: str) -> list[dict]:
        return unstack_scores({k: arrays[f"{name}/{k}"] for k in SCORE_NAMES})

    def count(prefix: str) -> int:
        return sum(1 for n in arrays if n.startswith(prefix) and n.endswith(f"/{SCORE_NAMES[0]}"))

    k = count("shadow")
    population = f"population_target/{SCORE_NAMES[0]}" in arrays
    if population and count("population_shadow") != k:
        raise MembershipError(f"{path}: {k} references on the evaluation set but others on the population.")
    return dict(
        target_scores=model("target"),
        is_member=arrays["is_member"],
        shadow_scores=[model(f"shadow{j}") for j in range(k)] or None,
        shadow_in=arrays.get("shadow_in"),
        population_target_scores=model("population_target") if population else None,
        population_shadow_scores=[model(f"population_shadow{j}") for j in range(k)] if population else None,
    )


def scores_table(
    target_scores: list[dict],
    is_member,
    *,
    shadow_scores: list | None = None,
    shadow_in=None,
    population_target_scores: list[dict] | None = None,
    population_shadow_scores: list | None = None,
    global_variance: bool | None = None,
    global_variance_below: int = LIRA_GLOBAL_VARIANCE_BELOW,
    lira_offline_tests: tuple[str, ...] = ("one_sided",),
    lira_center: str = "mean",
    lira_variance_pooling: str = "auto",
    rmia_gamma: float = RMIA_GAMMA,
    rmia_offline_a: float | None = None,
    rmia_views: str = "mean",
    bootstrap: int = 200,
    seed: int = 0,
) -> MembershipReport:
    """Every attack's metrics from per-example scores: `membership_table` after the logits.

    ``target_scores`` holds one `membership_scores` dict per query view,
    ``shadow_scores`` [K] such lists, the ``population_*`` the same on the
    population. Kept scores (`stack_scores`; `experiments.reproduce` stores
    the final models') can be scored again with other options, without
    running or even keeping a model.

    Options:
      global_variance: LiRA's global variance on or off; None (default)
        switches it on when K < ``global_variance_below``.
      global_variance_below: 64 by default, the LiRA paper's advice for fewer
        than 64 shadow models; the tables use this default. (It was 16 before
        issue 14.) The row's ``variance`` field says which was used.
      lira_offline_tests: which offline LiRA rows: ``"one_sided"`` (row
        ``lira_offline``, the paper's test, the one the tables show) and/or
        ``"two_sided"`` (row ``lira_offline_two_sided``, the reference code's
        plotting density). See `lira_scores`.
      lira_center, lira_variance_pooling: `lira_scores`' ``center`` and
        ``variance_pooling``; `lira_scores` gives the reasons for the
        defaults (mean, within). ``"auto"`` (default) pools within examples
        where every example has at least 2 IN and 2 OUT references, and
        takes the spread of all values below that, where the spread within
        an example is undefined (one value); the rows record which.
      rmia_gamma, rmia_views: `rmia_scores`' ``gamma`` and ``views``.
      rmia_offline_a: RMIA's a (Pr(x) offline, Pr(z) in both modes); None
        (default) tunes it on the references (`tune_offline_a`, needs K >= 3).
        The RMIA rows record the a used and whether it was tuned.
      bootstrap, seed: resamples and seed of the metrics' intervals.
    """
    is_member = _check_table_inputs(is_member, lira_offline_tests, lira_center, lira_variance_pooling, rmia_views)
    if population_target_scores is not None and (not shadow_scores or population_shadow_scores is None):
        raise MembershipError("RMIA (population scores were given) needs every reference's scores on it too.")
    target = target_scores
    table, roc = {}, {}
    shadows = None
    if shadow_scores:
        shadow_in = np.asarray(shadow_in, bool)
        if shadow_in.shape != (len(shadow_scores), len(is_member)):
            raise MembershipError(
                f"shadow_in is {shadow_in.shape}, expected ({len(shadow_scores)}, {len(is_member)}): one row per "
                "shadow model, one column per evaluation example."
            )
        shadows = shadow_scores

    def add(name, s, threshold=None, **info):
        table[name] = {**attack_metrics(s, is_member, threshold, bootstrap, seed), **info}
        roc[name] = metrics.roc_curve(s, is_member)[:2]

    for name in THRESHOLD_ATTACKS:
        s = target[0][name]
        threshold = None
        if shadows is not None:
            calib_s = np.concatenate([sh[0][name] for sh in shadows])
            threshold = metrics.best_balanced_accuracy(calib_s, shadow_in.reshape(-1))[1]
        add(name, s, threshold)
    if shadows is None:
        return MembershipReport(table, roc)

    def stacked(per_view, key):  # [N, A] for one model, [K, N, A] for the shadows
        return np.stack([v[key] for v in per_view], -1)

    t_phi, s_phi = stacked(target, "phi"), np.stack([stacked(sh, "phi") for sh in shadows])
    k = len(shadows)
    gv = (k < global_variance_below) if global_variance is None else global_variance
    variance = "global" if gv else "per_example"

    pooling = lira_variance_pooling
    if pooling == "auto":
        enough = min(shadow_in.sum(0).min(), (~shadow_in).sum(0).min()) >= 2
        pooling = "within" if enough else "all_values"

    def lira(online: bool, test: str = "one_sided") -> np.ndarray:
        return lira_scores(
            t_phi,
            s_phi,
            shadow_in,
            online=online,
            global_variance=gv,
            offline_test=test,
            center=lira_center,
            variance_pooling=pooling,
        )

    for test in lira_offline_tests:
        add(
            "lira_offline" if test == "one_sided" else f"lira_offline_{test}",
            lira(False, test),
            variance=variance,
            variance_pooling=pooling,
        )
    if k >= 2:
        add("lira_online", lira(True), 0.0, variance=variance, variance_pooling=pooling)

    if population_target_scores is not None and population_shadow_scores is not None:
        t_lp, s_lp = stacked(target, "loss"), np.stack([stacked(sh, "loss") for sh in shadows])
        zt_lp = stacked(population_target_scores, "loss")
        zs_lp = np.stack([stacked(sh, "loss") for sh in population_shadow_scores])
        tuned = rmia_offline_a is None
        a = tune_offline_a(s_lp, shadow_in, zs_lp, gamma=rmia_gamma, views=rmia_views)[0] if tuned else rmia_offline_a

        def rmia(online: bool) -> np.ndarray:
            return rmia_scores(
                t_lp, s_lp, shadow_in, zt_lp, zs_lp, online=online, offline_a=a, gamma=rmia_gamma, views=rmia_views
            )

        info = dict(offline_a=a, offline_a_tuned=tuned, gamma=rmia_gamma, views=rmia_views)
        add("rmia_offline", rmia(False), **info)
        if k >= 2:
            add("rmia_online", rmia(True), **info)
    return MembershipReport(table, roc)
