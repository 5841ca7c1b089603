r"""Score finished MIA units again, from their kept per-example scores: other options, no retraining.

    python -m experiments.mia_rescore --workdir=results/mia_refs16
    python -m experiments.mia_rescore --workdir=results/mia_refs16 --rmia_gammas=1,2,4 --rmia_offline_a=1

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
the population and gamma only coarsen it (ties). With several views
(``views="mean"``) Pr(x | theta) is the mean of p_y over the views. The
rows rank the examples by

* ``log p_y``: the target's probability of the true label, on the first
  view (the loss attack of the table) or averaged over the views;
* ``r(x) online``: that divided by Pr(x) = (Pr_IN(x) + Pr_OUT(x)) / 2, on
  the first view or over the views (RMIA's own order);
* ``r(x) OUT only``: divided by Pr_OUT(x) (RMIA offline at a = 1).

So the gaps between rows say which step costs: averaging over the views,
the division by Pr(x), or the population's resolution (RMIA's row in the
main table against ``r(x) online, views mean``). ``pairs`` counts the
(member, non-member) pairs that log p_y orders right and r(x) online orders
wrong (both over the views), and how many of those have the member easier
for the references (higher Pr_OUT) than the non-member. The first-view-only
rows of the main table score LiRA and RMIA on the first view alone, and
the ``RMIA views`` rows with the other way of combining the views.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import app, flags
from scipy import special

from trustsgd_jax import results
from trustsgd_jax.attacks import membership
from trustsgd_jax.attacks.membership.rmia import log_mean_exp  # RMIA's own reduction, so the orders agree exactly

FLAGS = flags.FLAGS

ROWS = ("lira_online", "lira_offline", "rmia_online", "rmia_offline", "loss")


def _fmt(row: dict) -> str:
    ci = row["tpr@1%fpr_ci"]
    return f"{row['auc']:.3f} / {row['tpr@1%fpr']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _view_mean_log_p(logp: np.ndarray) -> np.ndarray:
    """log of the mean over the last axis (the query views) of p = exp(logp)."""
    return special.logsumexp(logp, axis=-1) - np.log(logp.shape[-1])


def _ratio_terms(loaded: dict, views: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log Pr(x | theta), log r(x) online, log Pr_OUT(x)) per example, over the query views `views`."""
    t = _view_mean_log_p(np.stack([v["loss"] for v in loaded["target_scores"][views]], -1))
    s = np.stack([_view_mean_log_p(np.stack([v["loss"] for v in sh[views]], -1)) for sh in loaded["shadow_scores"]])
    ins = np.asarray(loaded["shadow_in"], bool)
    log_in, log_out = log_mean_exp(s, ins), log_mean_exp(s, ~ins)
    return t, t - (np.logaddexp(log_in, log_out) - np.log(2.0)), log_out


def first_view_only(loaded: dict) -> dict:
    """`load_scores_npz`'s arguments with every model's scores on the first query view only."""
    out = dict(loaded)
    for k in ("target_scores", "population_target_scores"):
        out[k] = loaded[k][:1] if loaded[k] is not None else None
    for k in ("shadow_scores", "population_shadow_scores"):
        out[k] = [v[:1] for v in loaded[k]] if loaded[k] is not None else None
    return out


def decomposition(loaded: dict) -> tuple[dict, dict, np.ndarray]:
    """({ranking: attack_metrics}, pair counts, log r(x) online per example): see the module docstring."""
    m = np.asarray(loaded["is_member"], bool)
    t, online, log_out = _ratio_terms(loaded, slice(None))
    t1, online1, _ = _ratio_terms(loaded, slice(0, 1))
    rankings = {
        "log p_y, first view (the loss attack)": t1,
        "log p_y, views mean": t,
        "r(x) online, first view": online1,
        "r(x) online, views mean (RMIA's order)": online,
        "r(x) OUT only, views mean": t - log_out,
    }
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
        if len(loaded["target_scores"]) > 1:
            other = "vote" if base["rmia_views"] == "mean" else "mean"
            variants += [(f"RMIA views {other}", dict(base, rmia_views=other))]
            variants += [("first view only", dict(base, first_view=True))]
        for label, options in variants:
            scores = first_view_only(loaded) if options.pop("first_view", False) else loaded
            table = membership.scores_table(**scores, bootstrap=200, seed=r["seed"], **options).table
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
        print(f"\n{r['dataset']} {r['compressor']}:\n\n| ranking by | AUC | TPR@1%FPR |\n|---|---|---|")
        for name, row in table.items():
            auc, tpr = row["auc_ci"], row["tpr@1%fpr_ci"]
            print(
                f"| {name} | {row['auc']:.3f} [{auc[0]:.3f}, {auc[1]:.3f}] | "
                f"{row['tpr@1%fpr']:.3f} [{tpr[0]:.3f}, {tpr[1]:.3f}] |"
            )
        print(
            f"pairs: {pairs['moved']} of {pairs['total']} (member, non-member) pairs ordered right by log p_y and "
            f"wrong by r(x) online (both views mean); in {pairs['member_easier']} of them the member is the easier "
            "one (higher Pr_OUT)."
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
