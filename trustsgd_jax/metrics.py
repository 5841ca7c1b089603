"""Attack success metrics: image reconstruction quality and membership-inference ROC.

Reconstruction metrics take de-normalised images in [0, 1] (NHWC). SSIM
follows Wang et al. 2004 with the window of the paper's SSIM: Gaussian, 11x11,
sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1 (dm-pix). PSNR is
10 log10(1 / MSE), capped at ``PSNR_CAP`` dB so that a perfect
reconstruction gives a finite, comparable number (not inf).

ROC metrics take per-example scores (higher = "member") and the true
membership, and predict member where score >= threshold. Tied scores form one
ROC point (a diagonal segment), so ties between members and non-members cost
resolution at low FPR.
"""

from __future__ import annotations

import dm_pix
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

PSNR_CAP = 100.0


def _check(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"metrics need two image batches of equal shape [N,H,W,C], got {a.shape} and {b.shape}.")
    return a, b


def ssim(a, b) -> np.ndarray:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) of images in [0, 1]."""
    a, b = _check(a, b)
    return np.asarray(dm_pix.ssim(a, b, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03))


def mse(a, b) -> np.ndarray:
    a, b = _check(a, b)
    return np.asarray(jnp.mean(jnp.square(a - b), axis=(1, 2, 3)))


def psnr(a, b) -> np.ndarray:
    """Per-image PSNR in dB for data range 1, capped at PSNR_CAP."""
    m = mse(a, b)
    with np.errstate(divide="ignore"):
        return np.minimum(10.0 * np.log10(1.0 / m), PSNR_CAP)


def match(originals, reconstructions) -> np.ndarray:
    """Order of `reconstructions` that best matches `originals` (Hungarian algorithm on MSE).

    A batch gradient is invariant to the order of its images, so a
    reconstructed batch is scored after this assignment.
    """
    o, r = np.asarray(originals, np.float32), np.asarray(reconstructions, np.float32)
    cost = ((o[:, None] - r[None]) ** 2).reshape(len(o), len(r), -1).mean(-1)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def affine_fit(originals, reconstructions) -> np.ndarray:
    """`reconstructions` after a per-image, per-channel least-squares affine fit a*r + b to `originals`, in [0, 1].

    A diagnostic, never a score in place of SSIM: SSIM after this fit tells
    "structure recovered, brightness or contrast lost" (high) from "nothing
    recovered" (low as well). The fit uses the original, which no attacker
    has. A constant channel gets b = the original's mean (a = 0).
    """
    o, r = np.asarray(originals, np.float64), np.asarray(reconstructions, np.float64)
    if o.shape != r.shape or o.ndim != 4:
        raise ValueError(f"affine_fit needs two image batches of equal shape [N,H,W,C], got {o.shape} and {r.shape}.")
    ro, rr = o.reshape(len(o), -1, o.shape[-1]), r.reshape(len(r), -1, r.shape[-1])
    rc = rr - rr.mean(1, keepdims=True)
    var = np.square(rc).sum(1, keepdims=True)
    cov = (rc * (ro - ro.mean(1, keepdims=True))).sum(1, keepdims=True)
    a = np.where(var > 1e-12, cov / np.maximum(var, 1e-12), 0.0)
    fitted = a * rc + ro.mean(1, keepdims=True)
    return np.clip(fitted, 0, 1).reshape(o.shape).astype(np.float32)


def affine_invariant_ssim(originals, reconstructions) -> np.ndarray:
    """Per-image SSIM after `affine_fit`: SSIM's structure term without the brightness and contrast a fit restores."""
    return ssim(originals, affine_fit(originals, reconstructions))


def image_scores(originals, reconstructions) -> dict[str, np.ndarray]:
    return {
        "ssim": ssim(originals, reconstructions),
        "psnr": psnr(originals, reconstructions),
        "mse": mse(originals, reconstructions),
    }


def summarize(values) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


# ---------------------------------------------------------------- ROC (membership inference)


def roc_curve(scores, is_member) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), predicting member where score >= threshold, from (0, 0) to (1, 1)."""
    s = np.asarray(scores, np.float64)
    m = np.asarray(is_member, bool)
    order = np.argsort(-s, kind="stable")
    s, m = s[order], m[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each tied group
    tp = np.cumsum(m)[distinct]
    fp = np.cumsum(~m)[distinct]
    tpr = np.r_[0.0, tp / max(m.sum(), 1)]
    fpr = np.r_[0.0, fp / max((~m).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def auc(scores, is_member) -> float:
    """Area under the ROC curve: the probability that a random member outscores a random non-member (ties 1/2)."""
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(scores, is_member, target_fpr: float) -> float:
    """TPR at `target_fpr`, linearly interpolated on the ROC curve.

    Below 1 / (number of non-members) this interpolates between (0, 0) and
    the first ROC point: report it with the number of non-members.
    """
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(np.interp(target_fpr, fpr, tpr))


def best_balanced_accuracy(scores, is_member) -> tuple[float, float]:
    """(max over thresholds of (TPR + TNR) / 2, that threshold): the oracle attack accuracy."""
    fpr, tpr, thr = roc_curve(scores, is_member)
    i = int(np.argmax((tpr + 1 - fpr) / 2))
    return float((tpr[i] + 1 - fpr[i]) / 2), float(thr[i])


def balanced_accuracy_at(scores, is_member, threshold: float) -> float:
    """(TPR + TNR) / 2 of the attack that predicts member where score >= `threshold`."""
    s, m = np.asarray(scores), np.asarray(is_member, bool)
    pred = s >= threshold
    return float((pred[m].mean() + (~pred[~m]).mean()) / 2)
