"""Every attack's metrics in one table: from predict functions, from logits, or from kept per-example scores.

Rows: the threshold attacks (`thresholds`); with reference (shadow) models,
LiRA (`lira`); with a population too, RMIA (`rmia`). LiRA and RMIA take the
same inputs, the target's and K reference models' scores on the evaluation
set and the [K, N] IN mask, RMIA the population's scores besides, so both
come from one training (`evaluate_membership`). Each row holds AUC, TPR at
1% and 0.1% FPR and the balanced accuracies with bootstrap intervals
(`attack_metrics`). The ROC metrics live in `trustsgd_jax.metrics`, the
target and shadow training in `trustsgd_jax.attacks.shadows`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import numpy as np

from trustsgd_jax import metrics
from trustsgd_jax.attacks.membership.errors import MembershipError, check_choice
from trustsgd_jax.attacks.membership.lira import (
    LIRA_CENTERS,
    LIRA_GLOBAL_VARIANCE_BELOW,
    LIRA_OFFLINE_TESTS,
    LIRA_VARIANCE_POOLING,
    lira_scores,
)
from trustsgd_jax.attacks.membership.rmia import RMIA_GAMMA, RMIA_VIEWS, rmia_scores, tune_offline_a
from trustsgd_jax.attacks.membership.scores import augmentations, check_population_disjoint, logit_scores
from trustsgd_jax.attacks.membership.thresholds import threshold_attacks

# One table row before its metrics: the attack's scores, its calibrated threshold (or None) and what it used.
_Row = tuple[np.ndarray, float | None, dict]


@dataclasses.dataclass
class MembershipReport:
    table: dict  # attack -> metrics
    roc: dict  # attack -> (fpr, tpr)


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


def _check_table_inputs(is_member, lira_offline_tests, lira_center, lira_variance_pooling, rmia_views) -> np.ndarray:
    """The membership mask as bool, after checking it holds both kinds and every table option is known."""
    is_member = np.asarray(is_member, bool)
    if is_member.all() or not is_member.any():
        raise MembershipError("the evaluation set needs both members and non-members.")
    for name in lira_offline_tests:
        check_choice(name, LIRA_OFFLINE_TESTS, "LiRA offline test")
    check_choice(lira_center, LIRA_CENTERS, "center")
    check_choice(lira_variance_pooling, (*LIRA_VARIANCE_POOLING, "auto"), "variance_pooling")
    check_choice(rmia_views, RMIA_VIEWS, "views")
    return is_member


def _table_options(options: dict) -> dict:
    """`scores_table`'s options with its defaults filled in; an unknown name is a one-line error."""
    params = inspect.signature(scores_table).parameters
    valid = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _TABLE_DATA]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise MembershipError(f"unknown membership option(s) {', '.join(unknown)}; use one of {', '.join(valid)}.")
    return {n: options.get(n, params[n].default) for n in valid}


def evaluate_membership(
    predict: Callable[[np.ndarray], np.ndarray],
    images,
    labels,
    is_member,
    *,
    shadow_predicts: list | None = None,
    shadow_in=None,
    augment: str = "none",
    population_images=None,
    population_labels=None,
    **table_options,
) -> MembershipReport:
    """Every attack's metrics in one table for a trained target model.

    Rows: the threshold attacks (``confidence``, ``loss``, ``entropy``,
    ``mentr``); with shadow models, ``lira_offline`` (one-sided),
    ``lira_offline_two_sided`` (if asked for) and ``lira_online`` (K >= 2);
    with a population too, ``rmia_offline`` and ``rmia_online`` (K >= 2). LiRA
    and RMIA are scored from the same K reference (shadow) models and views.
    This runs the models once per query view and hands the logits to
    `membership_table`, which scores them.

    Args:
      predict: images -> eval-mode logits of the target model.
      images, labels, is_member: the evaluation set (members and non-members).
      shadow_predicts, shadow_in: K shadow models' eval-mode predict functions
        and [K, N] masks of which evaluation examples each trained on. They
        calibrate the thresholds and feed LiRA and RMIA; without them only the
        oracle accuracies, AUC and TPR are reported.
      augment: the query views (`augmentations`), for LiRA, RMIA and the
        population alike.
      population_images, population_labels: RMIA's population Z, samples
        that no model trained on (checked: none may equal an evaluation
        image, `check_population_disjoint`). Their scores come from the same
        predict functions and views.
      **table_options: the attacks' options (LiRA's variance, centre and
        offline test; RMIA's gamma, a and views; the bootstrap), documented
        once in `scores_table`. They are checked before any model runs.
    """
    if len(images) == 0:
        raise MembershipError("the evaluation set is empty.")
    options = _table_options(table_options)
    # Before any model runs: scores_table checks the same again on the scores.
    _check_table_inputs(
        is_member,
        options["lira_offline_tests"],
        options["lira_center"],
        options["lira_variance_pooling"],
        options["rmia_views"],
    )
    if population_images is not None:
        if not shadow_predicts:
            raise MembershipError("RMIA (a population was given) needs reference models: pass shadow_predicts.")
        if population_labels is None or len(population_labels) != len(population_images):
            raise MembershipError("population_images need population_labels, one per image.")
        if len(population_images) == 0:
            raise MembershipError("the population is empty; RMIA needs at least one sample.")
        check_population_disjoint(images, population_images)
    views = augmentations(np.asarray(images), augment)
    pop_views = augmentations(np.asarray(population_images), augment) if population_images is not None else []
    refs = list(shadow_predicts or [])
    return membership_table(
        [predict(v) for v in views],
        labels,
        is_member,
        shadow_logits=[[p(v) for v in views] for p in refs] if refs else None,
        shadow_in=shadow_in,
        population_labels=population_labels,
        population_target_logits=[predict(v) for v in pop_views] if pop_views else None,
        population_shadow_logits=[[p(v) for v in pop_views] for p in refs] if pop_views else None,
        **options,
    )


def membership_table(target_logits, labels, is_member, **inputs_and_options) -> MembershipReport:
    """`evaluate_membership`'s table from logits already computed: `logit_scores`, then `scores_table`.

    Keyword arguments are `logit_scores`' (the references' and population's
    logits) and `scores_table`'s options, which that function documents.
    Computing the logits once lets a caller score many reference subsets or
    snapshots without running a model again.
    """
    params = inspect.signature(logit_scores).parameters.values()
    data_names = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    inputs = {n: inputs_and_options.pop(n) for n in data_names if n in inputs_and_options}
    options = _table_options(inputs_and_options)  # before scoring: an unknown option is a one-line error
    return scores_table(**logit_scores(target_logits, labels, is_member, **inputs), **options)


# scores_table's keyword arguments that are data, not options.
_TABLE_DATA = (
    "shadow_scores",
    "shadow_in",
    "population_target_scores",
    "population_shadow_scores",
)


def _checked_shadow_in(shadow_in, k: int, n: int) -> np.ndarray:
    """The [K, N] IN mask of the K shadow models over the N evaluation examples, as bool."""
    shadow_in = np.asarray(shadow_in, bool)
    if shadow_in.shape != (k, n):
        raise MembershipError(
            f"shadow_in is {shadow_in.shape}, expected ({k}, {n}): one row per shadow model, one column per "
            "evaluation example."
        )
    return shadow_in


def _measured(rows: dict[str, _Row], is_member: np.ndarray, bootstrap: int, seed: int) -> MembershipReport:
    """Each row's `attack_metrics` followed by what the row used, and its ROC curve."""
    table, roc = {}, {}
    for name, (s, threshold, info) in rows.items():
        table[name] = {**attack_metrics(s, is_member, threshold, bootstrap, seed), **info}
        roc[name] = metrics.roc_curve(s, is_member)[:2]
    return MembershipReport(table, roc)


def _stacked(per_view: list[dict], key: str) -> np.ndarray:
    """Score `key` of one model over its query views, [N, A]."""
    return np.stack([v[key] for v in per_view], -1)


def _lira_rows(
    target: list[dict],
    shadows: list,
    shadow_in: np.ndarray,
    *,
    global_variance: bool | None,
    global_variance_below: int,
    offline_tests: tuple[str, ...],
    center: str,
    pooling: str,
) -> dict[str, _Row]:
    """LiRA's rows, named by `scores_table`: each offline test asked for, and online where K >= 2."""
    t_phi, s_phi = _stacked(target, "phi"), np.stack([_stacked(sh, "phi") for sh in shadows])
    k = len(shadows)
    gv = (k < global_variance_below) if global_variance is None else global_variance
    if pooling == "auto":  # the spread within an example needs 2 values on each side; all values below that
        enough = min(shadow_in.sum(0).min(), (~shadow_in).sum(0).min()) >= 2
        pooling = "within" if enough else "all_values"
    info = dict(variance="global" if gv else "per_example", variance_pooling=pooling)

    def lira(online: bool, test: str = "one_sided") -> np.ndarray:
        return lira_scores(
            t_phi,
            s_phi,
            shadow_in,
            online=online,
            global_variance=gv,
            offline_test=test,
            center=center,
            variance_pooling=pooling,
        )

    rows: dict[str, _Row] = {}
    for test in offline_tests:
        rows["lira_offline" if test == "one_sided" else f"lira_offline_{test}"] = (lira(False, test), None, info)
    if k >= 2:
        rows["lira_online"] = (lira(True), 0.0, info)  # a log likelihood ratio: member where IN is the likelier
    return rows


def _rmia_rows(
    target: list[dict],
    shadows: list,
    shadow_in: np.ndarray,
    *,
    population_target: list[dict],
    population_shadows: list,
    gamma: float,
    offline_a: float | None,
    views: str,
) -> dict[str, _Row]:
    """RMIA's rows, offline and (K >= 2) online, with ``a`` tuned on the references where not given."""
    t_lp, s_lp = _stacked(target, "loss"), np.stack([_stacked(sh, "loss") for sh in shadows])
    zt_lp = _stacked(population_target, "loss")
    zs_lp = np.stack([_stacked(sh, "loss") for sh in population_shadows])
    tuned = offline_a is None
    a = tune_offline_a(s_lp, shadow_in, zs_lp, gamma=gamma, views=views)[0] if tuned else offline_a
    info = dict(offline_a=a, offline_a_tuned=tuned, gamma=gamma, views=views)

    def rmia(online: bool) -> np.ndarray:
        return rmia_scores(t_lp, s_lp, shadow_in, zt_lp, zs_lp, online=online, offline_a=a, gamma=gamma, views=views)

    rows: dict[str, _Row] = {"rmia_offline": (rmia(False), None, info)}
    if len(shadows) >= 2:
        rows["rmia_online"] = (rmia(True), None, info)
    return rows


def scores_table(
    target_scores: list[dict],
    is_member,
    *,
    shadow_scores: list | None = None,
    shadow_in=None,
    population_target_scores: list[dict] | None = None,
    population_shadow_scores: list | None = None,
    global_variance: bool | None = None,
    global_variance_below: int = LIRA_GLOBAL_VARIANCE_BELOW,
    lira_offline_tests: tuple[str, ...] = ("one_sided",),
    lira_center: str = "mean",
    lira_variance_pooling: str = "auto",
    rmia_gamma: float = RMIA_GAMMA,
    rmia_offline_a: float | None = None,
    rmia_views: str = "mean",
    bootstrap: int = 200,
    seed: int = 0,
) -> MembershipReport:
    """Every attack's metrics from per-example scores: `membership_table` after the logits.

    ``target_scores`` holds one `membership_scores` dict per query view,
    ``shadow_scores`` [K] such lists, the ``population_*`` the same on the
    population. Kept scores (`stack_scores`; `experiments.reproduce` stores
    the final models') can be scored again with other options, without
    running or even keeping a model.

    Options:
      global_variance: LiRA's global variance on or off; None (default)
        switches it on when K < ``global_variance_below``.
      global_variance_below: 64 by default, the LiRA paper's advice for fewer
        than 64 shadow models; the tables use this default. (It was 16 before
        issue 14.) The row's ``variance`` field says which was used.
      lira_offline_tests: which offline LiRA rows: ``"one_sided"`` (row
        ``lira_offline``, the paper's test, the one the tables show) and/or
        ``"two_sided"`` (row ``lira_offline_two_sided``, the reference code's
        plotting density). See `lira_scores`.
      lira_center, lira_variance_pooling: `lira_scores`' ``center`` and
        ``variance_pooling``; `lira_scores` gives the reasons for the
        defaults (mean, within). ``"auto"`` (default) pools within examples
        where every example has at least 2 IN and 2 OUT references, and
        takes the spread of all values below that, where the spread within
        an example is undefined (one value); the rows record which.
      rmia_gamma, rmia_views: `rmia_scores`' ``gamma`` and ``views``.
      rmia_offline_a: RMIA's a (Pr(x) offline, Pr(z) in both modes); None
        (default) tunes it on the references (`tune_offline_a`, needs K >= 3).
        The RMIA rows record the a used and whether it was tuned.
      bootstrap, seed: resamples and seed of the metrics' intervals.
    """
    is_member = _check_table_inputs(is_member, lira_offline_tests, lira_center, lira_variance_pooling, rmia_views)
    if population_target_scores is not None and (not shadow_scores or population_shadow_scores is None):
        raise MembershipError("RMIA (population scores were given) needs every reference's scores on it too.")
    shadows = shadow_scores or None
    if shadows is not None:
        shadow_in = _checked_shadow_in(shadow_in, len(shadows), len(is_member))
    rows: dict[str, _Row] = {
        name: (s, threshold, {})
        for name, (s, threshold) in threshold_attacks(target_scores, shadows, shadow_in).items()
    }
    if shadows is not None:
        rows.update(
            _lira_rows(
                target_scores,
                shadows,
                shadow_in,
                global_variance=global_variance,
                global_variance_below=global_variance_below,
                offline_tests=lira_offline_tests,
                center=lira_center,
                pooling=lira_variance_pooling,
            )
        )
        if population_target_scores is not None and population_shadow_scores is not None:
            rows.update(
                _rmia_rows(
                    target_scores,
                    shadows,
                    shadow_in,
                    population_target=population_target_scores,
                    population_shadows=population_shadow_scores,
                    gamma=rmia_gamma,
                    offline_a=rmia_offline_a,
                    views=rmia_views,
                )
            )
    return _measured(rows, is_member, bootstrap, seed)
