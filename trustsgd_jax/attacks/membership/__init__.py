"""Membership inference scores and attacks on a trained model's logits, one idea per file.

* `scores`: per-example scores from logits in float64 forms that keep
  confident predictions apart (`membership_scores`,
  `logit_scaled_confidence`), `logit_scores` for a target, its references
  and a population, the query views (`augmentations`) and the population's
  check (`check_population_disjoint`); ``THRESHOLD_ATTACKS``, ``SCORE_NAMES``.
* `thresholds`: the reference-free attacks, a threshold calibrated on the
  shadow models: ``confidence`` (Shokri et al. 2017), ``loss`` (Yeom et al.
  2018), ``entropy``, ``mentr`` (Song & Mittal 2021).
* `lira`: LiRA (Carlini et al. 2022) on phi = log(p_y / (1 - p_y)), online
  or offline (`lira_scores`, ``LIRA_*``).
* `rmia`: RMIA (Zarifzadeh, Liu & Shokri 2024) on p_y against a population
  (`rmia_scores`, `tune_offline_a`, `log_mean_exp`, ``RMIA_*``,
  ``OFFLINE_A_GRID``).
* `tables`: every attack's metrics with bootstrap intervals in one table
  (`attack_metrics`, `scores_table`, `membership_table`,
  `evaluate_membership`, `MembershipReport`).
* `npz`: kept scores, to make a table again without a model (`scores_npz`,
  `load_scores_npz`, `stack_scores`, `unstack_scores`).
* `errors`: `MembershipError`.

Imports run one way: errors → scores → thresholds, npz; errors → lira, rmia;
all of them → tables. The target and shadow training is
`trustsgd_jax.attacks.shadows`, the ROC metrics `trustsgd_jax.metrics`.
"""

from trustsgd_jax.attacks.membership.errors import MembershipError
from trustsgd_jax.attacks.membership.lira import (
    LIRA_CENTERS,
    LIRA_GLOBAL_VARIANCE_BELOW,
    LIRA_OFFLINE_TESTS,
    LIRA_VARIANCE_POOLING,
    lira_scores,
)
from trustsgd_jax.attacks.membership.npz import load_scores_npz, scores_npz, stack_scores, unstack_scores
from trustsgd_jax.attacks.membership.rmia import (
    OFFLINE_A_GRID,
    RMIA_GAMMA,
    RMIA_VIEWS,
    log_mean_exp,
    rmia_scores,
    tune_offline_a,
)
from trustsgd_jax.attacks.membership.scores import (
    SCORE_NAMES,
    THRESHOLD_ATTACKS,
    augmentations,
    check_population_disjoint,
    logit_scaled_confidence,
    logit_scores,
    membership_scores,
)
from trustsgd_jax.attacks.membership.tables import (
    MembershipReport,
    attack_metrics,
    evaluate_membership,
    membership_table,
    scores_table,
)

__all__ = [
    "LIRA_CENTERS",
    "LIRA_GLOBAL_VARIANCE_BELOW",
    "LIRA_OFFLINE_TESTS",
    "LIRA_VARIANCE_POOLING",
    "MembershipError",
    "MembershipReport",
    "OFFLINE_A_GRID",
    "RMIA_GAMMA",
    "RMIA_VIEWS",
    "SCORE_NAMES",
    "THRESHOLD_ATTACKS",
    "attack_metrics",
    "augmentations",
    "check_population_disjoint",
    "evaluate_membership",
    "lira_scores",
    "load_scores_npz",
    "log_mean_exp",
    "logit_scaled_confidence",
    "logit_scores",
    "membership_scores",
    "membership_table",
    "rmia_scores",
    "scores_npz",
    "scores_table",
    "stack_scores",
    "tune_offline_a",
    "unstack_scores",
]
