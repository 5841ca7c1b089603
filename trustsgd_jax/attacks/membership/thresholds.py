"""The reference-free attacks: a threshold on one per-example score of the target model.

* ``confidence``: the maximum softmax probability (Shokri et al. 2017, black
  box), reported as its logarithm, log max_i p_i;
* ``loss``: minus the cross-entropy, log p_y (Yeom et al. 2018);
* ``entropy``: minus the prediction entropy, sum_i p_i log p_i;
* ``mentr``: minus the modified entropy of Song & Mittal (2021),
  Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i).

The scores themselves, in their float64 forms that keep confident
predictions apart, are `scores.membership_scores`. An attack predicts member
where score >= threshold. The threshold is chosen on a calibration set whose
membership the attacker knows (the shadow models' IN/OUT examples), never on
the evaluation set; the oracle best-threshold accuracy on the evaluation set
is reported beside it (`tables.attack_metrics`), because that is what the
paper's Table 2 reports.
"""

from __future__ import annotations

import numpy as np

from trustsgd_jax import metrics
from trustsgd_jax.attacks.membership.scores import THRESHOLD_ATTACKS


def calibrated_threshold(shadow_values: list[np.ndarray], shadow_in) -> float:
    """The threshold of best balanced accuracy on the shadow models' own examples.

    `shadow_values` holds one [N] score array per shadow model, `shadow_in`
    the [K, N] mask of the examples each trained on: every (model, example)
    pair is one calibration sample, a member where the model trained on it.
    """
    return metrics.best_balanced_accuracy(np.concatenate(shadow_values), np.asarray(shadow_in, bool).reshape(-1))[1]


def threshold_attacks(
    target_scores: list[dict], shadow_scores: list | None = None, shadow_in=None
) -> dict[str, tuple[np.ndarray, float | None]]:
    """{attack: (the target's scores, calibrated threshold)} for every threshold attack, in THRESHOLD_ATTACKS order.

    ``target_scores`` and each of the K ``shadow_scores`` hold one
    `membership_scores` dict per query view; these attacks use the first
    view (the images as they are). Without shadow models the threshold is
    None: only the threshold-free metrics (AUC, TPR at FPR, oracle accuracy)
    can be reported.
    """
    out: dict[str, tuple[np.ndarray, float | None]] = {}
    for name in THRESHOLD_ATTACKS:
        threshold = None
        if shadow_scores:
            threshold = calibrated_threshold([sh[0][name] for sh in shadow_scores], shadow_in)
        out[name] = (target_scores[0][name], threshold)
    return out
