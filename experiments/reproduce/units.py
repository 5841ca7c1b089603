"""The two kinds of unit: each a pure function of its record (and the dataset it names), returning the record.

* `run_gradinv_unit`: a group of victim batches, each worker 0's batch in a
  real round of ``workers`` workers (`attacks.victim`); its message is
  inverted and scored; reconstructions go to ``recon/``. At ``attack_step``
  > 0 the victim is trained first (`trained_victim`, checkpointed).
* `run_mia_unit`: target and reference models trained with the compressor;
  threshold attacks, LiRA and RMIA at every snapshot; budget curves and ROC
  curves of the final models (``roc/``).
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from trustsgd_jax import compress, data, models, results, train
from trustsgd_jax.attacks import audit, invert, membership, objectives, shadows, victim


def unit_compressor(u: dict, params) -> compress.Compressor:
    """The unit's compressor; PowerSGD with its warm-up (``start_iter``), which no other kind has."""
    if compress.parse_spec(u["compressor"]).kind == "powersgd":
        return compress.from_spec(u["compressor"], params, seed=u["seed"], start_iter=u["start_iter"])
    return compress.from_spec(u["compressor"], params, seed=u["seed"])


def run_gradinv_unit(u: dict, ds: data.Dataset, workdir: pathlib.Path, progress: bool = False) -> dict:
    """One gradinv unit: a pure function of its record `u` (and the dataset it names)."""
    model = models.make_model(u["model"], ds.num_classes, norm=u["norm"])
    variables = models.init_variables(model, jax.random.key(u["seed"]), ds.image_shape)
    compressor = unit_compressor(u, variables["params"])
    comp_state = None
    if u["attack_step"] > 0:
        variables, comp_state = trained_victim(u, ds, workdir)
    ids = np.asarray(u["victim_ids"])  # [n, B]
    n, b = ids.shape
    others = np.asarray(u["worker_ids"], np.int64).reshape(n, u["workers"] - 1, b)  # [n, N-1, B]
    x = data.normalize(ds.x_train[ids.reshape(-1)], ds.name)
    y = ds.y_train[ids.reshape(-1)]
    r = audit.audit(
        model,
        variables,
        x,
        y,
        compressor,
        dataset=ds.name,
        threat=u["threat"],
        config=attack_config(u, n),
        batch_size=b,
        workers=u["workers"],
        other_images=data.normalize(ds.x_train[others.reshape(-1)], ds.name).reshape(*others.shape, *ds.image_shape),
        other_labels=ds.y_train[others],
        observer=u["observer"],
        bn_statistics=u["bn_statistics"],
        batchnorm=u["batchnorm"],
        comp_state=comp_state,
        step=u["attack_step"],
        seeds=ids[:, 0],
        progress=progress,
    )
    recon = pathlib.Path("recon") / f"{u['key']}.npz"
    arrays = {
        "reconstructions": uint8(r.reconstructions),
        "originals": uint8(r.originals),
        "image_ids": ids.reshape(-1),
        **{f"candidate_{k}": uint8(v) for k, v in r.candidate_reconstructions.items()},
    }
    results.write_atomic(workdir / recon, npz_bytes(arrays))
    return dict(
        u,
        image_ids=ids.reshape(-1).tolist(),
        labels=y.tolist(),
        ssim=r.per_image["ssim"].tolist(),
        psnr=r.per_image["psnr"].tolist(),
        mse=r.per_image["mse"].tolist(),
        matching_loss=r.matching_loss.tolist(),
        chosen=r.chosen,
        candidate_ssim={k: v.tolist() for k, v in r.candidate_ssim.items()},
        candidate_psnr={k: v.tolist() for k, v in r.candidate_psnr.items()},
        upper_bound_ssim=r.upper_bound_ssim.tolist(),
        checkpoint_ssim={str(k): v["ssim"].tolist() for k, v in r.checkpoints.items()},
        checkpoint_candidate_ssim={
            str(k): {name: s.tolist() for name, s in v["candidate_ssim"].items()} for k, v in r.checkpoints.items()
        },
        wire_words=r.wire.words,
        uncompressed_words=sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(variables["params"])),
        recon=str(recon),
    )


def attack_config(u: dict, n: int) -> invert.AttackConfig:
    """The attack of a gradinv unit of `n` victim batches: the whole unit in one program."""
    return invert.AttackConfig(
        iterations=u["iterations"],
        restarts=u["restarts"],
        tv=u["tv"],
        chunk=min(100, u["iterations"]),
        matmul_dtype=u["matmul_dtype"],
        # Its batches and restarts, and every candidate objective side by side.
        parallel=n * u["restarts"] * 2 * len(objectives.OBJECTIVES),  # each objective with and without +bn
        seed=u.get("attack_seed", u["seed"]),
        exclude=tuple(u.get("strongest_exclude", ())),
        checkpoints=tuple(u.get("checkpoints", ())),
    )


def uint8(images) -> np.ndarray:
    """Images in [0, 1] as the 8-bit pixels they are stored as."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


def npz_bytes(arrays: dict[str, Any]) -> bytes:
    """A compressed ``.npz`` file's bytes (the caller writes them atomically).

    ``Any``: numpy's stub lets ``**arrays`` fill ``allow_pickle`` too, so a
    dict of arrays would not type-check.
    """
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def trained_victim(u: dict, ds: data.Dataset, workdir: pathlib.Path):
    """(variables, the N workers' compressor states) after `attack_step` steps of one real N-worker run.

    Trained once per (dataset, compressor, step, workers, BatchNorm, training
    batch, ...) and checkpointed with orbax under ``victims/``, so every
    threat model, mode and image group, and every resumed run, attacks the
    same trained model. Worker 0's BatchNorm buffers stand for all workers'
    (DDP broadcasts them every step).
    """
    fields = (
        "dataset",
        "compressor",
        "attack_step",
        "model",
        "norm",
        "seed",
        "train_batch",
        "workers",
        "batchnorm",
        "start_iter",
        "data_source",
    )
    key = hashlib.sha1(json.dumps({f: u[f] for f in fields}, sort_keys=True).encode()).hexdigest()[:16]
    # One copy per process under several processes: each trains the same victim (deterministic) without racing.
    sub = "victims" if jax.process_count() == 1 else f"victims/p{jax.process_index()}"
    path = (workdir / sub / key).absolute()
    model = victim.data_parallel_model(models.make_model(u["model"], ds.num_classes, norm=u["norm"]), u["batchnorm"])
    initial = models.init_variables(model, jax.random.key(u["seed"]), ds.image_shape)
    compressor = unit_compressor(u, initial["params"])
    template = {
        "params": initial["params"],
        "batch_stats": initial.get("batch_stats", {}),
        "comp_state": train.replicate(compressor.init(initial["params"]), u["workers"]),
    }
    checkpointer = ocp.StandardCheckpointer()
    if not path.exists():
        fitted = train.fit(
            model,
            compressor,
            data.normalize(ds.x_train, ds.name),
            ds.y_train,
            steps=u["attack_step"],
            global_batch=u["train_batch"],
            seed=u["seed"],
            progress=False,
            devices=jax.local_devices()[: u["workers"]],
        )
        tree = {
            "params": fitted.state.params,
            "batch_stats": fitted.state.batch_stats,
            "comp_state": fitted.state.comp_state,
        }
        checkpointer.save(path, tree)  # orbax writes to a temporary directory and renames it when complete
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            print(
                f"trained the victim for {u['dataset']} {u['compressor']} to step {u['attack_step']} "
                f"({u['workers']} workers) -> {path}",
                flush=True,
            )
    tree = checkpointer.restore(path, template)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}, tree["comp_state"]


BUDGET_ATTACKS = ("lira_online", "lira_offline", "rmia_online", "rmia_offline", "loss")
BUDGET_METRICS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr")
BUDGET_SUBSETS = 4  # disjoint reference subsets scored per budget (fewer where K / k is smaller)
SMALL_BUDGET_OFFLINE_A = 0.5  # RMIA's a where k < 3 references cannot tune it (the middle of its grid)


def mia_budget_rows(scores: dict, is_member, budgets, seed: int) -> list[dict]:
    """Budget curves: every attack of `BUDGET_ATTACKS` with only k of the K references, for each k in `budgets`.

    ``scores`` are the final models' `membership.logit_scores`. For budget k
    the references are the disjoint blocks [jk, (j+1)k) of the
    K (j < `BUDGET_SUBSETS`, K // k blocks at most); with paired splits every
    block of even k holds an IN and an OUT model for each example. Each
    metric is the mean over the blocks, with their min and max, and the first
    block's 95% bootstrap interval. Online attacks need an IN and an OUT
    reference per example (k >= 2); with k = 1 the offline attacks score the
    examples the one reference did not train on (a random half of the pool,
    members and non-members alike). RMIA's ``a`` is tuned on the block's own
    references where k >= 3, and fixed at `SMALL_BUDGET_OFFLINE_A` below.
    LiRA's global variance pools the spread within examples where every
    example has 2 IN and 2 OUT references, else the spread of all values
    (`membership.scores_table`'s ``"auto"``).
    """
    k_all = len(scores["shadow_scores"])
    rows = []

    def picked(per_view: list[dict], keep: np.ndarray) -> list[dict]:
        return [{name: v[keep] for name, v in view.items()} for view in per_view]

    def table(block: list[int]) -> tuple[dict, str, int]:
        refs_in = scores["shadow_in"][block]
        # One reference is OUT for only the examples it did not train on: k = 1 scores those (a random half).
        keep = (~refs_in).any(0) if len(block) == 1 else np.ones(len(is_member), bool)
        population = scores["population_target_scores"] is not None
        t = membership.scores_table(
            picked(scores["target_scores"], keep),
            np.asarray(is_member)[keep],
            shadow_scores=[picked(scores["shadow_scores"][i], keep) for i in block],
            shadow_in=refs_in[:, keep],
            population_target_scores=scores["population_target_scores"],
            population_shadow_scores=[scores["population_shadow_scores"][i] for i in block] if population else None,
            rmia_offline_a=None if len(block) >= 3 else SMALL_BUDGET_OFFLINE_A,
            bootstrap=200,
            seed=seed,
        ).table
        pooling = t.get("lira_offline", {}).get("variance_pooling", "-")  # scores_table's "auto" choice
        return t, pooling, int(keep.sum())

    for k in budgets:
        blocks = [list(range(j * k, (j + 1) * k)) for j in range(min(k_all // k, BUDGET_SUBSETS))]
        scored = [table(b) for b in blocks]
        tables = [t for t, _, _ in scored]
        attacks = {}
        for name in BUDGET_ATTACKS:
            if name not in tables[0]:
                continue
            row = {}
            for m in BUDGET_METRICS:
                vals = [t[name][m] for t in tables]
                row.update({m: float(np.mean(vals)), f"{m}_range": [float(min(vals)), float(max(vals))]})
                row[f"{m}_ci"] = tables[0][name][f"{m}_ci"]
            attacks[name] = row
        rows.append(
            dict(
                references=k,
                subsets=len(blocks),
                variance_pooling=scored[0][1],
                examples=scored[0][2],
                attacks=attacks,
            )
        )
    return rows


def query_augmentation(query_views: str, dataset: str) -> str:
    """`membership.augmentations`' kind for ``--mia_query_views`` on a dataset.

    The models train on the image alone, so ``"image"`` is the query that
    matches training. RMIA averages p_y over the views, and a flipped image
    (never trained on) dilutes it; ``"flip"`` is what the tables before the
    option used (MNIST digits are not flip-symmetric, so they were always
    queried alone).
    """
    return "flip" if query_views == "flip" and dataset != "mnist" else "none"


def run_mia_unit(u: dict, ds: data.Dataset, workdir: pathlib.Path, parallel_models: int = 1) -> dict:
    """One MIA unit: a pure function of its record `u`; `parallel_models` changes speed, not results.

    The target and ``mia_shadows`` references train for ``mia_steps`` steps
    (snapshots at ``mia_snapshots``); each snapshot gets the full table with
    the models' train and test accuracy, the final models the budget curves
    (``mia_budgets``) and the ROC curves.
    """
    pool, population = mia_images(u, ds)
    split = pathlib.Path("roc") / f"{u['key']}_split.npz"
    t0 = time.time()
    setup = shadows.train_target_and_shadows(
        *pool,
        model_fn=lambda: models.make_model(u["model"], ds.num_classes, norm=u["norm"], axis_name=train.AXIS),
        compressor_spec=u["compressor"],
        num_shadows=u["mia_shadows"],
        steps=u["mia_steps"],
        global_batch=u["batch_size"],
        seed=u["seed"],
        split_path=workdir / split,
        parallel_models=parallel_models,
        split=u["mia_split"],
        snapshot_steps=u["mia_snapshots"],
    )
    train_seconds = time.time() - t0
    snapshots, scores, report = score_snapshots(
        setup, pool, population, query_augmentation(u["mia_query_views"], ds.name), u["seed"]
    )
    budgets = mia_budget_rows(scores, setup.is_member, u["mia_budgets"], u["seed"]) if u["mia_budgets"] else []
    roc = pathlib.Path("roc") / f"{u['key']}.npz"
    curves = {**{f"{k}_fpr": v[0] for k, v in report.roc.items()}, **{f"{k}_tpr": v[1] for k, v in report.roc.items()}}
    results.write_atomic(workdir / roc, npz_bytes(curves))
    scores_path = pathlib.Path("roc") / f"{u['key']}_scores.npz"
    results.write_atomic(workdir / scores_path, membership.scores_npz(scores))
    final = snapshots[-1]
    return dict(
        u,
        attacks=final["attacks"],
        test_accuracy=final["test_accuracy"],
        train_accuracy=final["train_accuracy"],
        shadow_test_accuracy=final["shadow_test_accuracy"],
        snapshots=snapshots,
        budgets=budgets,
        wire=setup.wire,
        roc=str(roc),
        scores=str(scores_path),
        split=str(split),
        seconds=dict(train=train_seconds, total=time.time() - t0),
    )


Images = tuple[np.ndarray, np.ndarray]  # (normalised images, labels)


def mia_images(u: dict, ds: data.Dataset) -> tuple[Images, Images]:
    """(the pool: members and non-members, RMIA's population: the images after it), from train + test in order."""
    pool, population = u["mia_pool"], u["mia_population"]
    x = data.normalize(np.concatenate([ds.x_train, ds.x_test])[: pool + population], ds.name)
    y = np.concatenate([ds.y_train, ds.y_test])[: pool + population]
    return (x[:pool], y[:pool]), (x[pool:], y[pool:])


def score_snapshots(
    setup: shadows.MembershipSetup, pool: Images, population: Images, augment: str, seed: int
) -> tuple[list[dict], dict, membership.MembershipReport]:
    """(a row per snapshot: accuracies and every attack's metrics, the final models' scores, their report).

    Each model is queried on the views `augment` names (`membership.augmentations`).
    """
    (x, y), (x_pop, y_pop) = pool, population
    views = membership.augmentations(x, augment)
    pop_views = membership.augmentations(x_pop, augment) if len(x_pop) else []
    if len(x_pop):
        membership.check_population_disjoint(x, x_pop)
    rows, scores, report = [], {}, None
    for snap in setup.snapshots:
        scores = membership.logit_scores(
            [snap.target_predict(v) for v in views],
            y,
            setup.is_member,
            shadow_logits=[[p(v) for v in views] for p in snap.shadow_predicts] or None,
            shadow_in=setup.shadow_in,
            population_labels=y_pop if len(x_pop) else None,
            population_target_logits=[snap.target_predict(v) for v in pop_views] if len(x_pop) else None,
            population_shadow_logits=[[p(v) for v in pop_views] for p in snap.shadow_predicts] if len(x_pop) else None,
        )
        report = membership.scores_table(**scores, bootstrap=200, seed=seed)
        rows.append(
            dict(
                step=snap.step,
                train_accuracy=snap.target_train_accuracy,
                test_accuracy=snap.target_test_accuracy,
                shadow_test_accuracy=snap.shadow_test_accuracy,
                attacks=report.table,
            )
        )
    if report is None:
        raise ValueError("train_target_and_shadows returned no snapshot (the final models are one)")
    return rows, scores, report
