"""RMIA: Zarifzadeh, Liu & Shokri, ICML 2024, "Low-Cost High-Power Membership Inference Attacks".

With Pr(x | theta) = p_y(x), the target model theta's softmax probability
of the true label (the ``loss`` score of `scores.membership_scores`, log p_y,
in eval mode), and Pr(x) its average over reference models theta':

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

All arithmetic is in float64 log space (log Pr = logsumexp - log count,
`log_mean_exp`); the references are reduced in sorted order, so the scores
are bit-identical under any permutation of the reference models.

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
"""

from __future__ import annotations

import numpy as np
from scipy import special

from trustsgd_jax import metrics
from trustsgd_jax.attacks.membership.errors import MembershipError, check_choice

RMIA_VIEWS = ("mean", "vote")
RMIA_GAMMA = 2.0
OFFLINE_A_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def log_mean_exp(lp: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log of the mean over axis 0 of exp(lp) where `mask` (every column needs one), in the order-free sorted form.

    log (1 / |S|) sum_{k in S} exp(lp[k]), S the rows k where ``mask[k]``:
    RMIA's log Pr(x), the log of the mean probability over a set of reference
    models, from their log-probabilities ``lp`` [K, ...] (``mask`` broadcasts
    against it). The rows are sorted (masked-out ones as -inf) before the
    logsumexp, so the result is bit-identical under any permutation of the
    models; `experiments.mia_rescore` uses it so that its ratios agree with
    `rmia_scores` exactly.
    """
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


def _checked_inputs(target_logp, reference_logp, reference_in, population_target_logp, population_reference_logp):
    """(t [N, A], r [K, N, A], IN mask [K, N], zt [Z, A], zr [K, Z, A]): `rmia_scores`' inputs with a view axis.

    Refused: arrays that are not finite log-probabilities, shapes that do not
    line up, and an empty population.
    """
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
    return t, r, inn, zt, zr


def _log_pr_x(r: np.ndarray, inn: np.ndarray, online: bool, offline_a: float) -> np.ndarray:
    """log Pr(x) [N, A] from the references' log p_y [K, N, A]: online the IN/OUT mixture, offline the ``a`` form."""
    k = inn.shape[0]
    w_in, w_out = inn[..., None], (~inn)[..., None]
    if online:
        if k < 2:
            raise MembershipError(f"online RMIA needs at least 2 reference models (IN and OUT), got {k}.")
        lacking = int((~(w_in.any(0) & w_out.any(0))).sum())
        if lacking:
            raise MembershipError(f"online RMIA needs an IN and an OUT reference per example; {lacking} lack one.")
        return np.logaddexp(log_mean_exp(r, w_in), log_mean_exp(r, w_out)) - np.log(2.0)
    if k < 1:
        raise MembershipError("offline RMIA needs at least one reference model.")
    lacking = int((~w_out.any(0)).sum())
    if lacking:
        raise MembershipError(f"offline RMIA needs an OUT reference for every example; {lacking} have none.")
    return _offline_log_prior(log_mean_exp(r, w_out), offline_a)


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

      LR(x, z) = (Pr(x | theta) / Pr(x)) / (Pr(z | theta) / Pr(z)),
      score(x) = |{z in Z : LR(x, z) >= gamma}| / |Z|,

    with Pr(x | theta) = p_y(x) under the target theta and Pr(x) its average
    over the reference models, online from IN and OUT references, offline
    ((1 + a) / 2) Pr_OUT(x) + (1 - a) / 2; Pr(z) is the offline form in both
    modes. The module docstring gives the reasons, what the views do, and
    where this departs from ml_privacy_meter.

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
      views: ``"mean"`` (default) or ``"vote"``, see the module docstring.
    """
    check_choice(views, RMIA_VIEWS, "views")
    if not (np.isfinite(gamma) and gamma > 0):
        raise MembershipError(f"gamma must be a positive number, got {gamma}.")
    t, r, inn, zt, zr = _checked_inputs(
        target_logp, reference_logp, reference_in, population_target_logp, population_reference_logp
    )
    if views == "mean":  # each model's probability averaged over the views, then one comparison
        t, zt, r, zr = (special.logsumexp(v, -1, keepdims=True) - np.log(v.shape[-1]) for v in (t, zt, r, zr))
    if offline_a is None or not 0.0 <= offline_a <= 1.0:
        raise MembershipError(f"RMIA needs offline_a in [0, 1] for Pr(z) (see tune_offline_a), got {offline_a}.")
    log_px = _log_pr_x(r, inn, online, offline_a)
    log_pz = _offline_log_prior(log_mean_exp(zr, np.ones((inn.shape[0], 1, 1), bool)), offline_a)
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
