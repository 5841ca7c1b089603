"""Target and shadow (reference) models for membership inference, with seeded IN/OUT splits.

The target trains on a seeded random half of a pool of images; K shadow
models train on other random halves, each example IN for exactly half of
them, so that every example has IN and OUT fits for LiRA. Every model uses the
same recipe as the target (model, compressor, optimiser, devices), which is
what the attacker is assumed to know. The splits are saved so every number
can be recomputed. Scoring and the attacks are in
`trustsgd_jax.attacks.membership`, which does not depend on training.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable

import jax
import numpy as np
import optax

from trustsgd_jax import compress, models, results, train
from trustsgd_jax.attacks.membership import MembershipError


@dataclasses.dataclass
class MembershipSetup:
    images: np.ndarray  # the pool, normalised
    labels: np.ndarray
    is_member: np.ndarray  # [N] target membership
    shadow_in: np.ndarray  # [K, N]
    target_predict: Callable
    shadow_predicts: list
    target_test_accuracy: float  # on the pool's non-members
    wire: dict


def check_disjoint(member_ids, nonmember_ids) -> None:
    """Raises MembershipError unless both id sets are non-empty and share no id."""
    a, b = np.asarray(member_ids), np.asarray(nonmember_ids)
    if len(a) == 0 or len(b) == 0:
        raise MembershipError("member and non-member sets must both be non-empty.")
    overlap = np.intersect1d(a, b)
    if len(overlap):
        raise MembershipError(
            f"member and non-member sets overlap in {len(overlap)} examples (e.g. id "
            f"{overlap[0]}); a non-member must never have been trained on."
        )


def train_target_and_shadows(
    images,
    labels,
    *,
    model_fn: Callable,
    compressor_spec: str,
    num_shadows: int,
    steps: int,
    global_batch: int,
    seed: int = 0,
    learning_rate: float = 0.05,
    split_path=None,
    progress: bool = False,
    parallel_models: int = 1,
) -> MembershipSetup:
    """Trains the target on a seeded random half of the pool and K shadows on other random halves.

    Every model uses the same recipe: `model_fn()` (a fresh model with the
    data-parallel axis), the compressor `compressor_spec`, all devices. Up to
    `parallel_models` of them train at once (`train.fit_many`, one program
    vmapped over models). The default is 1 because with simulated CPU devices
    on few cores a heavy vmapped step can starve one device past XLA's
    collective rendezvous timeout; use more on real devices. The split
    (target members, shadow IN masks) is saved to `split_path` (.npz) so every
    number can be recomputed.
    """
    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    n = len(images)
    if n < 4:
        raise MembershipError(f"the pool needs at least 4 images, got {n}.")
    rng = np.random.default_rng(seed)

    def half(r):
        mask = np.zeros(n, bool)
        mask[r.permutation(n)[: n // 2]] = True
        return mask

    is_member = half(rng)
    # As LiRA's reference code: each example is IN for exactly half of the
    # shadow models (so every example has IN and OUT fits), each shadow
    # training on about half of the pool.
    order = np.random.default_rng([seed, 1]).random((num_shadows, n)).argsort(0)
    shadow_in = order < num_shadows // 2
    if split_path is not None:
        buf = io.BytesIO()
        np.savez(buf, is_member=is_member, shadow_in=shadow_in, seed=seed)
        results.write_atomic(split_path, buf.getvalue())

    model = model_fn()
    params = models.init_variables(model, jax.random.key(seed), images.shape[1:])["params"]
    c = compress.from_spec(compressor_spec, params, seed=seed)
    masks = np.concatenate([is_member[None], shadow_in])
    seeds = [seed] + [seed * 1000 + k + 1 for k in range(num_shadows)]
    batch = min(global_batch, (int(masks.sum(1).min()) // jax.device_count()) * jax.device_count())
    group = max(1, parallel_models)
    opt = optax.sgd(learning_rate, momentum=0.9)
    states = []
    for start in range(0, len(masks), group):
        if group == 1:
            states.append(
                train.fit(
                    model,
                    c,
                    images[masks[start]],
                    labels[masks[start]],
                    steps=steps,
                    global_batch=batch,
                    seed=seeds[start],
                    optimizer=opt,
                    progress=progress,
                ).state
            )
        else:  # several models at once: one compiled program, vmapped over models
            states += train.fit_many(
                model,
                c,
                images,
                labels,
                masks[start : start + group],
                seeds[start : start + group],
                steps=steps,
                global_batch=batch,
                optimizer=opt,
                progress=progress,
            )

    def predictor(st):
        return lambda x: train.predict_logits(model, st.params, st.batch_stats, np.asarray(x, np.float32))

    target_predict, shadow_predicts = predictor(states[0]), [predictor(s) for s in states[1:]]
    wire = train.step_wire_cost(model, c, states[0])
    acc = float(np.mean(target_predict(images[~is_member]).argmax(-1) == labels[~is_member]))
    return MembershipSetup(images, labels, is_member, shadow_in, target_predict, shadow_predicts, acc, wire)
