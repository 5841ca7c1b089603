"""LiRA, the likelihood-ratio attack of Carlini et al. 2022, "Membership Inference Attacks From First Principles".

LiRA scores the logit-scaled confidence phi = log(p_y / (1 - p_y)) =
z_y - logsumexp_{i != y} z_i (`scores.logit_scaled_confidence`) of the
target against Gaussians fitted to K reference (shadow) models' phi: online
(IN and OUT fits) or offline (OUT only; the paper's one-sided test or the
reference code's two-sided density), with the paper's choices of location,
variance and global-variance switch as defaults and the reference code's as
named options (`lira_scores`).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from trustsgd_jax.attacks.membership.errors import MembershipError, check_choice

LIRA_OFFLINE_TESTS = ("one_sided", "two_sided")
LIRA_CENTERS = ("mean", "median")
LIRA_VARIANCE_POOLING = ("within", "all_values")
# Carlini et al. 2022 estimate one global variance when they have fewer than 64 shadow models.
LIRA_GLOBAL_VARIANCE_BELOW = 64


def _sum_over_references(v: np.ndarray) -> np.ndarray:
    """Sum over axis 0 (the reference models), sorted first so that the result is bit-identical for any model order."""
    return np.sort(v, axis=0).sum(0)


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


def _checked_inputs(target_phi, shadow_phi, shadow_in, online: bool, global_variance: bool, variance_pooling: str):
    """(t [N, A], sp [K, N, A], IN mask, OUT mask [K, N, 1]) in float64, once every fit `lira_scores` needs exists.

    Refused: shapes that do not line up, too few models, an example without
    the IN or OUT model its fit needs, and a variance from fewer than 2 values.
    """
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
    return t, sp, w_in, w_out


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
    check_choice(offline_test, LIRA_OFFLINE_TESTS, "offline_test")
    check_choice(center, LIRA_CENTERS, "center")
    check_choice(variance_pooling, LIRA_VARIANCE_POOLING, "variance_pooling")
    t, sp, w_in, w_out = _checked_inputs(target_phi, shadow_phi, shadow_in, online, global_variance, variance_pooling)
    mu_out, sd_out, _ = _lira_fit(sp, w_out, global_variance, center, variance_pooling)
    if online:
        mu_in, sd_in, _ = _lira_fit(sp, w_in, global_variance, center, variance_pooling)
        llr = stats.norm.logpdf(t, mu_in, sd_in) - stats.norm.logpdf(t, mu_out, sd_out)
        return llr.mean(-1)
    if offline_test == "two_sided":
        return (-stats.norm.logpdf(t, mu_out, sd_out)).mean(-1)
    return (-stats.norm.logsf(t, mu_out, sd_out)).mean(-1)
