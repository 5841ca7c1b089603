"""Where leakage is possible at all: the matching loss around the true input.

A gradient-inversion attack is a local optimiser started from noise; it can
only succeed where the matching loss has a basin around the truth that is
wide enough to be found. `loss_profile` measures the loss at the true images
plus Gaussian noise of standard deviation s (in normalised pixel units) and
at unrelated images, so that a setting (model, BatchNorm mode, batch size,
training step, compressor) can be judged before any attack runs: a profile
that is already near its random-image value at small s leaves a needle, not
a basin.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trustsgd_jax import train as train_lib
from trustsgd_jax.attacks import objectives


class LossProfile(NamedTuple):
    sigmas: tuple[float, ...]
    loss: np.ndarray  # [len(sigmas)] mean matching loss at truth + N(0, s^2) noise
    loss_std: np.ndarray  # [len(sigmas)] its spread over the noise draws
    at_truth: float  # the loss at the true images (0 for a consistent objective and a deterministic message)
    random_images: float  # mean loss at unrelated images, the plateau a search from noise starts on


def loss_profile(
    model: nn.Module,
    variables: dict,
    message,
    images,
    labels,
    *,
    others,
    objective: str = "observed",
    train: bool = False,
    sigmas=(0.001, 0.01, 0.1, 1.0),
    draws: int = 4,
    seed: int = 0,
    loss_fn: train_lib.LossFn = train_lib.cross_entropy,
) -> LossProfile:
    """The `objectives.matching_loss` of `objective` around the true `images` [B, H, W, C] (normalised).

    ``others`` [R, B, H, W, C] are unrelated real images (normalised) for
    the plateau. Equal tensor weights; ``train`` as the attacked round's
    BatchNorm mode, ``loss_fn`` its loss.
    """
    weights = [1.0] * len(jax.tree.leaves(variables["params"]))
    loss = jax.jit(objectives.matching_loss(model, variables, objective, weights, train, loss_fn=loss_fn))
    x, y = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
    keys = jax.random.split(jax.random.key(seed), len(sigmas) * draws).reshape(len(sigmas), draws)
    values = np.array(
        [[float(loss(x + s * jax.random.normal(k, x.shape), message, y)) for k in row] for s, row in zip(sigmas, keys)]
    )
    plateau = np.mean([float(loss(jnp.asarray(o, jnp.float32), message, y)) for o in others])
    return LossProfile(
        tuple(float(s) for s in sigmas), values.mean(1), values.std(1), float(loss(x, message, y)), float(plateau)
    )
