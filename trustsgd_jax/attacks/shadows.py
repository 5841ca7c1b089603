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
class Snapshot:
    """The target and the K shadows after `step` training steps, with their utility."""

    step: int
    target_predict: Callable
    shadow_predicts: list
    target_train_accuracy: float  # on the target's members
    target_test_accuracy: float  # on the pool's non-members
    shadow_test_accuracy: float  # mean over the shadows, each on the pool images it did not train on


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
    snapshots: list[Snapshot] = dataclasses.field(default_factory=list)  # ascending steps; the last is the final model


SPLITS = ("paired", "balanced")


def shadow_splits(n: int, num_shadows: int, seed: int, design: str = "paired") -> np.ndarray:
    """[K, n] IN masks of the shadow (reference) models, seeded.

    * ``paired`` (default): shadows 2j and 2j + 1 train on complementary
      random halves of the pool. Every example is IN for exactly half of any
      first 2m shadows, so budget curves over the first k = 2, 4, 8, ...
      references keep an IN and an OUT model for every example (online LiRA
      and RMIA need both). ml_privacy_meter pairs its reference models the
      same way. An odd K's last shadow takes a random half.
    * ``balanced``: LiRA's reference code (and this project before issue
      14's budget curves): a random K/2 of the K shadows per example, so each
      example is IN for exactly half of all K, but a prefix of the shadows
      need not hold both.
    """
    if design not in SPLITS:
        raise MembershipError(f"unknown shadow split {design!r}; use one of {SPLITS}.")
    if design == "balanced":
        order = np.random.default_rng([seed, 1]).random((num_shadows, n)).argsort(0)
        return order < num_shadows // 2
    rows = []
    for j in range((num_shadows + 1) // 2):
        mask = np.zeros(n, bool)
        mask[np.random.default_rng([seed, 2, j]).permutation(n)[: n // 2]] = True
        rows += [mask, ~mask]
    return np.array(rows[:num_shadows], bool).reshape(num_shadows, n)


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
    split: str = "paired",
    snapshot_steps=(),
) -> MembershipSetup:
    """Trains the target on a seeded random half of the pool and K shadows on other random halves.

    Every model uses the same recipe: `model_fn()` (a fresh model with the
    data-parallel axis), the compressor `compressor_spec`, all devices. Up to
    `parallel_models` of them train at once (`train.fit_many`, one program
    vmapped over models). The default is 1 because with simulated CPU devices
    on few cores a heavy vmapped step can starve one device past XLA's
    collective rendezvous timeout; use more on real devices. The split
    (target members, shadow IN masks) is saved to `split_path` (.npz) so every
    number can be recomputed. The shadows' IN masks follow `shadow_splits`'
    ``split`` design. ``snapshot_steps`` (each in [1, steps]) add the models
    after those steps to ``setup.snapshots``, with their accuracies; the
    final models are always its last entry.
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
    shadow_in = shadow_splits(n, num_shadows, seed, split)
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
    snap_steps = sorted({int(t) for t in snapshot_steps} - {steps})
    at: dict[int, list] = {t: [] for t in snap_steps}  # step -> the models' (params, batch_stats), in model order

    def keep(t, sts):
        at[t] += [(st.params, st.batch_stats) for st in (sts if isinstance(sts, list) else [sts])]  # host copies

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
                    snapshot_steps=snap_steps,
                    on_snapshot=keep,
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
                snapshot_steps=snap_steps,
                on_snapshot=keep,
            )
    at[steps] = [(st.params, st.batch_stats) for st in states]

    def predictor(variables):
        params, batch_stats = variables
        return lambda x: train.predict_logits(model, params, batch_stats, np.asarray(x, np.float32))

    def accuracy(predict, mask) -> float:
        return float(np.mean(predict(images[mask]).argmax(-1) == labels[mask]))

    snapshots = []
    for t in sorted(at):
        target, shadow_predicts = predictor(at[t][0]), [predictor(v) for v in at[t][1:]]
        snapshots.append(
            Snapshot(
                t,
                target,
                shadow_predicts,
                accuracy(target, is_member),
                accuracy(target, ~is_member),
                float(np.mean([accuracy(p, ~m) for p, m in zip(shadow_predicts, shadow_in, strict=True)]))
                if num_shadows
                else float("nan"),
            )
        )
    final = snapshots[-1]
    wire = train.step_wire_cost(model, c, states[0])
    return MembershipSetup(
        images,
        labels,
        is_member,
        shadow_in,
        final.target_predict,
        final.shadow_predicts,
        final.target_test_accuracy,
        wire,
        snapshots,
    )
