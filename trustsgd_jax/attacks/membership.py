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
  IN and OUT fits) or offline (OUT only).

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
from collections.abc import Callable

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


def lira_scores(target_phi, shadow_phi, shadow_in, online: bool = True, global_variance: bool = False) -> np.ndarray:
    """LiRA membership score per example (higher = member).

    Args:
      target_phi: [N] or [N, A] logit-scaled confidences of the target model
        (A query augmentations).
      shadow_phi: [K, N] or [K, N, A] the same for K shadow models.
      shadow_in: [K, N] bool, whether shadow k trained on example n.
      online: fit IN and OUT Gaussians (likelihood ratio); offline: OUT only
        (one-sided test, how far above the OUT distribution the target is).
      global_variance: one variance per (IN/OUT, augmentation) shared by all
        examples, for small K.
    """
    t = np.asarray(target_phi, np.float64)
    sp = np.asarray(shadow_phi, np.float64)
    inn = np.asarray(shadow_in, bool)
    if t.ndim == 1:
        t, sp = t[:, None], sp[..., None]
    if sp.shape[:2] != inn.shape or sp.shape[1:] != t.shape:
        raise MembershipError(f"shadow scores {sp.shape}, IN mask {inn.shape} and target {t.shape} do not line up.")
    k = inn.shape[0]
    if online and k < 2:
        raise MembershipError(f"online LiRA needs at least 2 shadow models (IN and OUT fits), got {k}.")
    if k < 1:
        raise MembershipError("LiRA needs at least one shadow model.")
    w_in, w_out = inn[..., None].astype(np.float64), (~inn)[..., None].astype(np.float64)

    def fit(w):
        count = w.sum(0)
        mean = (sp * w).sum(0) / np.maximum(count, 1)
        var = ((sp - mean) ** 2 * w).sum(0) / np.maximum(count, 1)
        if global_variance:
            var = np.broadcast_to((var * count).sum(0) / np.maximum(count.sum(0), 1), var.shape)
        return mean, np.sqrt(var) + 1e-6, count

    mu_out, sd_out, n_out = fit(w_out)
    if online:
        mu_in, sd_in, n_in = fit(w_in)
        if (n_in == 0).any() or (n_out == 0).any():
            raise MembershipError("some examples have no IN or no OUT shadow model: train more shadows (K >= 4).")
        llr = stats.norm.logpdf(t, mu_in, sd_in) - stats.norm.logpdf(t, mu_out, sd_out)
        return llr.mean(-1)
    if (n_out == 0).any():
        raise MembershipError("some examples have no OUT shadow model: train more shadows.")
    return (-stats.norm.logsf(t, mu_out, sd_out)).mean(-1)


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


def evaluate_membership(
    predict: Callable[[np.ndarray], np.ndarray],
    images,
    labels,
    is_member,
    *,
    shadow_predicts: list | None = None,
    shadow_in=None,
    augment: str = "none",
    global_variance: bool | None = None,
    bootstrap: int = 200,
    seed: int = 0,
) -> MembershipReport:
    """Every attack's metrics in one table for a trained target model.

    Args:
      predict: images -> eval-mode logits of the target model.
      images, labels, is_member: the evaluation set (members and non-members).
      shadow_predicts, shadow_in: K shadow models' eval-mode predict functions
        and [K, N] masks of which evaluation examples each trained on. They
        calibrate the thresholds and feed LiRA; without them only the oracle
        accuracies, AUC and TPR are reported.
    """
    labels = np.asarray(labels)
    is_member = np.asarray(is_member, bool)
    if len(images) == 0:
        raise MembershipError("the evaluation set is empty.")
    if is_member.all() or not is_member.any():
        raise MembershipError("the evaluation set needs both members and non-members.")
    views = augmentations(np.asarray(images), augment)
    target = [membership_scores(predict(v), labels) for v in views]
    table, roc = {}, {}
    shadows = None
    if shadow_predicts:
        shadow_in = np.asarray(shadow_in, bool)
        shadows = [[membership_scores(p(v), labels) for v in views] for p in shadow_predicts]
    for name in THRESHOLD_ATTACKS:
        s = target[0][name]
        threshold = None
        if shadows is not None:
            calib_s = np.concatenate([sh[0][name] for sh in shadows])
            threshold = metrics.best_balanced_accuracy(calib_s, shadow_in.reshape(-1))[1]
        table[name] = attack_metrics(s, is_member, threshold, bootstrap, seed)
        roc[name] = metrics.roc_curve(s, is_member)[:2]
    if shadows is not None:
        t_phi = np.stack([t["phi"] for t in target], -1)
        s_phi = np.stack([np.stack([v["phi"] for v in sh], -1) for sh in shadows])
        k = len(shadows)
        gv = (k < 16) if global_variance is None else global_variance
        modes = [("lira_offline", False)] + ([("lira_online", True)] if k >= 2 else [])
        for name, online in modes:
            s = lira_scores(t_phi, s_phi, shadow_in, online=online, global_variance=gv)
            table[name] = attack_metrics(s, is_member, 0.0 if online else None, bootstrap, seed)
            roc[name] = metrics.roc_curve(s, is_member)[:2]
    return MembershipReport(table, roc)
