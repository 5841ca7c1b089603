"""Membership inference against models trained with (compressed) data-parallel SGD.

Scores (higher = "member"), all from the model in **eval mode** (BatchNorm on
running averages; the LiRA reference code once scored in training mode by
mistake):

* ``confidence``: max softmax probability (Shokri et al. 2017, black box);
* ``loss``: minus the cross-entropy (Yeom et al. 2018);
* ``entropy``: minus the prediction entropy;
* ``mentr``: minus the modified entropy of Song & Mittal (2021),
  Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i);
* ``lira``: LiRA (Carlini et al. 2022) on the logit-scaled confidence
  phi = log(p_y / (1 - p_y)) = z_y - logsumexp_{i != y} z_i (stable from the
  logits), online (Gaussian IN and OUT fits) or offline (OUT only).

Threshold attacks choose their threshold on a calibration set whose
membership the attacker knows (the shadow models' IN/OUT examples), never on
the evaluation set; the oracle best-threshold accuracy on the evaluation set
is reported beside it, because that is what the paper's Table 2 reports.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

THRESHOLD_ATTACKS = ("confidence", "loss", "entropy", "mentr")


class MembershipError(ValueError):
    pass


# ---------------------------------------------------------------- scores


def _log_softmax(logits):
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def logit_scaled_confidence(logits, labels) -> np.ndarray:
    """phi = log p_y - log(1 - p_y), computed as z_y - logsumexp_{i != y} z_i (finite for p_y in {0, 1})."""
    z = jnp.asarray(logits, jnp.float32)
    y = jnp.asarray(labels)
    zy = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=bool), -jnp.inf, z)
    return np.asarray(zy - jax.scipy.special.logsumexp(others, axis=-1))


def membership_scores(logits, labels) -> dict[str, np.ndarray]:
    """Per-example scores of every threshold attack plus LiRA's statistic; higher means member."""
    logits = np.asarray(logits, np.float32)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise MembershipError(f"logits must be [N, classes] for N labels, got {logits.shape} and {labels.shape}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise MembershipError(f"labels must lie in [0, {logits.shape[1]}), got [{labels.min()}, {labels.max()}].")
    logp = np.asarray(_log_softmax(logits), np.float64)
    p = np.exp(logp)
    idx = np.arange(len(labels))
    p_y, logp_y = p[idx, labels], logp[idx, labels]
    log1m = np.log1p(-np.minimum(p, 1 - 1e-12))  # log(1 - p_i), finite
    mask = np.ones_like(p, bool)
    mask[idx, labels] = False
    mentr = -(1 - p_y) * logp_y - np.where(mask, p * log1m, 0.0).sum(1)
    return {
        "confidence": p.max(1),
        "loss": logp_y,  # = -cross-entropy
        "entropy": (p * logp).sum(1),  # = -entropy
        "mentr": -mentr,
        "phi": logit_scaled_confidence(logits, labels),
    }


# ---------------------------------------------------------------- metrics


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
    s, m = np.asarray(scores), np.asarray(is_member, bool)
    pred = s >= threshold
    return float((pred[m].mean() + (~pred[~m]).mean()) / 2)


def attack_metrics(scores, is_member, threshold: float | None = None, bootstrap: int = 200, seed: int = 0) -> dict:
    """AUC, TPR at 1% / 0.1% FPR, oracle (and, with `threshold`, calibrated) balanced accuracy, 95% bootstrap CIs."""
    s, m = np.asarray(scores, np.float64), np.asarray(is_member, bool)
    if m.all() or not m.any():
        raise MembershipError("metrics need both members and non-members in the evaluation set.")

    def point(s, m):
        out = {"auc": auc(s, m), "tpr@1%fpr": tpr_at_fpr(s, m, 0.01), "tpr@0.1%fpr": tpr_at_fpr(s, m, 0.001),
               "oracle_acc": best_balanced_accuracy(s, m)[0]}
        if threshold is not None:
            out["calibrated_acc"] = balanced_accuracy_at(s, m, threshold)
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


def check_disjoint(member_ids, nonmember_ids) -> None:
    a, b = np.asarray(member_ids), np.asarray(nonmember_ids)
    if len(a) == 0 or len(b) == 0:
        raise MembershipError("member and non-member sets must both be non-empty.")
    overlap = np.intersect1d(a, b)
    if len(overlap):
        raise MembershipError(f"member and non-member sets overlap in {len(overlap)} examples (e.g. id "
                              f"{overlap[0]}); a non-member must never have been trained on.")


def evaluate_membership(predict: Callable[[np.ndarray], np.ndarray], images, labels, is_member, *,
                        shadow_predicts: list | None = None, shadow_in=None, augment: str = "none",
                        global_variance: bool | None = None, bootstrap: int = 200, seed: int = 0) -> MembershipReport:
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
            threshold = best_balanced_accuracy(calib_s, shadow_in.reshape(-1))[1]
        table[name] = attack_metrics(s, is_member, threshold, bootstrap, seed)
        roc[name] = roc_curve(s, is_member)[:2]
    if shadows is not None:
        t_phi = np.stack([t["phi"] for t in target], -1)
        s_phi = np.stack([np.stack([v["phi"] for v in sh], -1) for sh in shadows])
        k = len(shadows)
        gv = (k < 16) if global_variance is None else global_variance
        modes = [("lira_offline", False)] + ([("lira_online", True)] if k >= 2 else [])
        for name, online in modes:
            s = lira_scores(t_phi, s_phi, shadow_in, online=online, global_variance=gv)
            table[name] = attack_metrics(s, is_member, 0.0 if online else None, bootstrap, seed)
            roc[name] = roc_curve(s, is_member)[:2]
    return MembershipReport(table, roc)


def plot_roc(curves: dict, path, title: str = "") -> None:
    """ROC curves on log-log axes (the low-FPR regime matters), one per attack/configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    floor = 1e-4
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=name, lw=1.2)
    ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    from trustsgd_jax import results

    results.save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------- target and shadow training


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


def train_target_and_shadows(images, labels, *, model_fn: Callable, compressor_spec: str, num_shadows: int,
                             steps: int, global_batch: int, seed: int = 0, learning_rate: float = 0.05,
                             split_path=None, progress: bool = False, parallel_models: int = 1) -> MembershipSetup:
    """Trains the target on a seeded random half of the pool and K shadows on other random halves.

    Every model uses the same recipe: `model_fn()` (a fresh model with the
    data-parallel axis), the compressor `compressor_spec`, all devices; up to
    `parallel_models` of them train at once (`train.fit_many`; about 2x the
    throughput for 4 ConvNets here, but with 8 *simulated* CPU devices on 2
    cores a heavy vmapped step can starve one device past XLA's 40 s
    collective rendezvous timeout, so the default is 1; use it on real
    devices). The
    split (target members, shadow IN masks) is saved to `split_path` (.npz)
    so every number can be recomputed.
    """
    import optax

    from trustsgd_jax import compress, models, train

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
        import io

        from trustsgd_jax import results

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
            states.append(train.fit(model, c, images[masks[start]], labels[masks[start]], steps=steps,
                                    global_batch=batch, seed=seeds[start], optimizer=opt, progress=progress).state)
        else:  # several models at once: one compiled program, vmapped over models
            states += train.fit_many(model, c, images, labels, masks[start:start + group], seeds[start:start + group],
                                     steps=steps, global_batch=batch, optimizer=opt, progress=progress)

    def predictor(st):
        return lambda x: train.predict_logits(model, st.params, st.batch_stats, np.asarray(x, np.float32))

    target_predict, shadow_predicts = predictor(states[0]), [predictor(s) for s in states[1:]]
    wire = train.step_wire_cost(model, c, states[0])
    acc = float(np.mean(target_predict(images[~is_member]).argmax(-1) == labels[~is_member]))
    return MembershipSetup(images, labels, is_member, shadow_in, target_predict, shadow_predicts, acc, wire)
