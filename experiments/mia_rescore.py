r"""Score finished MIA units again, from their kept per-example scores: other options, no retraining.

    python -m experiments.mia_rescore --workdir=experiments/mia_refs16
    python -m experiments.mia_rescore --workdir=experiments/mia_refs16 --rmia_gammas=1,2,4 --rmia_offline_a=1

`experiments.reproduce` keeps, beside each MIA unit's record, the final
models' scores on the evaluation set and the population
(``roc/<key>_scores.npz``, `membership.scores_npz`). This program reads them
back into `membership.scores_table` and prints, per unit, the table's LiRA,
RMIA and loss rows for each RMIA gamma asked for (``--rmia_gammas``; the
first row set uses the record's own options, and ``--check`` asserts it
reproduces the record).

``--decompose`` adds why RMIA and the loss attack differ. With one view,
RMIA's score is a non-decreasing function of r(x) = Pr(x | theta) / Pr(x)
(`membership.rmia_scores`), so its order of the examples is that of r(x);
the population and gamma only coarsen it. The rows rank the examples by

* ``log p_y, views mean``: the target's probability of the true label,
  averaged over the views (the loss attack, which the table scores on the
  first view only);
* ``r(x), online``: divided by Pr(x) = (Pr_IN(x) + Pr_OUT(x)) / 2;
* ``r(x), OUT only``: divided by Pr_OUT(x) (RMIA offline at a = 1);

with probabilities averaged over the query views as RMIA's ``views="mean"``
does. Where r(x) ranks below log p_y, the division by Pr(x) is what costs,
not the population's resolution. ``pairs`` then counts the (member,
non-member) pairs that log p_y orders right and r(x) online orders wrong,
and how many of those have the member easier for the references (higher
Pr_OUT) than the non-member: the difficulty calibration moves easy members
below hard non-members.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import app, flags
from scipy import special

from trustsgd_jax import results
from trustsgd_jax.attacks import membership
from trustsgd_jax.attacks.membership import _log_mean_exp  # RMIA's own reduction, so the orders agree exactly

FLAGS = flags.FLAGS

ROWS = ("lira_online", "lira_offline", "rmia_online", "rmia_offline", "loss")


def _fmt(row: dict) -> str:
    ci = row["tpr@1%fpr_ci"]
    return f"{row['auc']:.3f} / {row['tpr@1%fpr']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _view_mean_log_p(logp: np.ndarray) -> np.ndarray:
    """log of the mean over the last axis (the query views) of p = exp(logp)."""
    return special.logsumexp(logp, axis=-1) - np.log(logp.shape[-1])


def decomposition(loaded: dict) -> tuple[dict, dict, np.ndarray]:
    """({ranking: attack_metrics}, pair counts, log r(x) online per example): see the module docstring."""
    m = np.asarray(loaded["is_member"], bool)
    t = _view_mean_log_p(np.stack([v["loss"] for v in loaded["target_scores"]], -1))
    s = np.stack([_view_mean_log_p(np.stack([v["loss"] for v in sh], -1)) for sh in loaded["shadow_scores"]])
    ins = np.asarray(loaded["shadow_in"], bool)

    log_in, log_out = _log_mean_exp(s, ins), _log_mean_exp(s, ~ins)
    online = t - (np.logaddexp(log_in, log_out) - np.log(2.0))
    rankings = {"log p_y, views mean": t, "r(x), online": online, "r(x), OUT only": t - log_out}
    table = {name: membership.attack_metrics(v, m, bootstrap=200, seed=0) for name, v in rankings.items()}
    mem, non = np.flatnonzero(m), np.flatnonzero(~m)
    moved = member_easier = 0
    for chunk in np.array_split(mem, max(1, len(mem) // 256)):  # [256, non-members] at a time
        wrong = (t[chunk][:, None] > t[non][None, :]) & (online[chunk][:, None] < online[non][None, :])
        moved += int(wrong.sum())
        member_easier += int((wrong & (log_out[chunk][:, None] > log_out[non][None, :])).sum())
    pairs = dict(total=len(mem) * len(non), moved=moved, member_easier=member_easier)
    return table, pairs, online


def main(argv):
    del argv
    workdir = pathlib.Path(FLAGS.workdir)
    recs = [r for r in results.read_records(workdir / "results.jsonl").records if r.get("kind") == "mia"]
    recs = [r for r in recs if r.get("scores") and (not FLAGS.keys or r["key"] in FLAGS.keys)]
    if not recs:
        raise app.UsageError(f"no MIA unit in {workdir} kept its scores (reproduce writes them since issue 14).")
    gammas = [float(g) for g in FLAGS.rmia_gammas]
    print("| dataset | algorithm | references | options | " + " | ".join(ROWS) + " |")
    print("|---|---|---|---|" + "---|" * len(ROWS))
    decomposed = []
    for r in recs:
        loaded = membership.load_scores_npz(workdir / r["scores"])
        own = {k: v for k, v in r["attacks"].get("rmia_online", {}).items() if k in ("gamma", "views")}
        base = dict(rmia_gamma=own.get("gamma", membership.RMIA_GAMMA), rmia_views=own.get("views", "mean"))
        variants = [("record's", base)]
        for g in gammas:
            options = dict(base, rmia_gamma=g, rmia_offline_a=FLAGS.rmia_offline_a)
            if options != dict(base, rmia_offline_a=None):  # the record's own options again
                a = FLAGS.rmia_offline_a if FLAGS.rmia_offline_a is not None else "tuned"
                variants.append((f"gamma {g:g}, a {a}", options))
        for label, options in variants:
            table = membership.scores_table(**loaded, bootstrap=200, seed=r["seed"], **options).table
            if label == "record's" and FLAGS.check:
                for name in r["attacks"]:
                    for metric in ("auc", "tpr@1%fpr", "tpr@0.1%fpr"):
                        have, want = table[name][metric], r["attacks"][name][metric]
                        if abs(have - want) > 1e-9:
                            raise SystemExit(f"{r['key']}: {name} {metric} {have} != the record's {want}")
            cells = [_fmt(table[n]) if n in table else "–" for n in ROWS]
            refs = len(loaded["shadow_scores"] or [])
            print(f"| {r['dataset']} | {r['compressor']} | {refs} | {label} | " + " | ".join(cells) + " |")
        if FLAGS.decompose and loaded["shadow_scores"] and base["rmia_views"] != "mean":
            print(f"({r['key']}: no decomposition; it assumes RMIA's views='mean', the record used 'vote')")
        elif FLAGS.decompose and loaded["shadow_scores"]:
            decomposed.append((r, decomposition(loaded)))
    print("\nCells: AUC / TPR at 1% FPR [95% bootstrap interval].")
    for r, (table, pairs, _) in decomposed:
        print(f"\n{r['dataset']} {r['compressor']}: ranking by | AUC | TPR@1%FPR")
        print("|---|---|---|")
        for name, row in table.items():
            auc, tpr = row["auc_ci"], row["tpr@1%fpr_ci"]
            print(
                f"| {name} | {row['auc']:.3f} [{auc[0]:.3f}, {auc[1]:.3f}] | "
                f"{row['tpr@1%fpr']:.3f} [{tpr[0]:.3f}, {tpr[1]:.3f}] |"
            )
        print(
            f"pairs: {pairs['moved']} of {pairs['total']} (member, non-member) pairs ordered right by log p_y and "
            f"wrong by r(x) online; in {pairs['member_easier']} of them the member is the easier one (higher Pr_OUT)."
        )


if __name__ == "__main__":
    # Flags are defined here, as in experiments.report, so that tests can import the module beside reproduce.
    flags.DEFINE_string("workdir", None, "a reproduce workdir with MIA units", required=True)
    flags.DEFINE_list("keys", [], "only these unit keys (default: every MIA unit that kept its scores)")
    flags.DEFINE_list("rmia_gammas", ["2"], "RMIA gammas to score (the first row set is the record's own options)")
    flags.DEFINE_float("rmia_offline_a", None, "RMIA's a for the extra gammas (default: tuned on the references)")
    flags.DEFINE_bool("check", False, "fail unless the record's own options reproduce its stored table")
    flags.DEFINE_bool("decompose", True, "print the ranking decomposition of RMIA against the loss attack")
    app.run(main)
