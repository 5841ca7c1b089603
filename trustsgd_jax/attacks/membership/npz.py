"""Kept per-example scores: `logit_scores`' result as an npz file, so that a table can be made again without a model.

`experiments.reproduce` stores the final models' scores this way
(``roc/<key>_scores.npz``); ``scores_table(**load_scores_npz(path), ...)``
scores them again with any options.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from trustsgd_jax.attacks.membership.errors import MembershipError
from trustsgd_jax.attacks.membership.scores import SCORE_NAMES


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
