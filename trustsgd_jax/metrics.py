"""Image reconstruction metrics on de-normalised images in [0, 1] (NHWC).

SSIM follows Wang et al. 2004 with the window of the paper's SSIM: Gaussian,
11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1 (dm-pix). PSNR is
10 log10(1 / MSE), capped at ``PSNR_CAP`` dB so that a perfect
reconstruction gives a finite, comparable number (not inf).
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


def image_scores(originals, reconstructions) -> dict[str, np.ndarray]:
    return {"ssim": ssim(originals, reconstructions), "psnr": psnr(originals, reconstructions),
            "mse": mse(originals, reconstructions)}


def summarize(values) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}
