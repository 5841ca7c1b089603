"""Per-example membership scores from a model's logits, and the inputs they are computed on.

Scores (higher = "member"), all from the model in **eval mode** (BatchNorm on
running averages; the LiRA reference code once scored in training mode by
mistake): the threshold attacks' ``confidence``, ``loss``, ``entropy`` and
``mentr`` (`trustsgd_jax.attacks.membership.thresholds`) and LiRA's
logit-scaled confidence ``phi`` (`membership_scores`); RMIA scores ``loss``,
log p_y. `logit_scores` turns the logits of a target, its reference models
and a population into `scores_table`'s inputs; `augmentations` makes the
query views and `check_population_disjoint` checks RMIA's population.

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
"""

from __future__ import annotations

import numpy as np
from scipy import special

from trustsgd_jax.attacks.membership.errors import MembershipError

THRESHOLD_ATTACKS = ("confidence", "loss", "entropy", "mentr")
SCORE_NAMES = (*THRESHOLD_ATTACKS, "phi")  # the keys of `membership_scores`


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
