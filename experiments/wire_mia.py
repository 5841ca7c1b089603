r"""The wire MIA (issue 14, item 5): membership inference from worker 0's compressed messages.

    python -m experiments.wire_mia                                   # CIFAR-10 sample, ConvNet, 4 workers
    python -m experiments.wire_mia --steps=32 --out_dir=runs/wire_mia_t32

For each compressor (``--compressors``, `compress.from_spec` specs), one run
of data-parallel training (`train.fit` on ``--workers`` devices, seed
``--seed``) is recorded from worker 0's side (`wire_membership.record_run`):
its gradient message at every step and the model the step started from.
Then every candidate is scored against those messages
(`wire_membership.wire_similarities`), in both views (``observed``: the
decompressed message against the whole gradient; ``compressor``: the
compressor's view, PowerSGD's factors or Top-K's sent coordinates), with both
aggregations over steps (``max`` and ``mean``).

Candidates: members are the images in worker 0's batches over the T steps
(as many as it trained on, T x global batch / workers, fewer where an image
came back in a later epoch); non-members are ``--nonmembers`` images held out
of the training set before any run (never seen by any worker). Images that
only other workers trained on are not scored. The same held-out images and
the same data order serve every compressor (one seed), so the compressors
differ only in what travelled.

Writes to ``--out_dir``: ``wire_mia.md`` (AUC, TPR at 1% and 0.1% FPR with
95% bootstrap intervals, `membership.attack_metrics`) and ``wire_mia.json``
(the same numbers, the settings and the timings), rewritten after each
compressor. TPR at 0.1% FPR below 1 / (non-members) is an interpolation
towards (0, 0) (`metrics.tpr_at_fpr`).
"""

from __future__ import annotations

from trustsgd_jax.devices import simulate_cpu_devices

simulate_cpu_devices(8)

# Imported after XLA_FLAGS is set, because JAX reads it when first imported.
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from trustsgd_jax import compress, data, models, results, train  # noqa: E402
from trustsgd_jax.attacks import membership as mia  # noqa: E402
from trustsgd_jax.attacks import wire_membership as wire  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "cifar10", "dataset (the bundled sample unless --data_dir is given)")
flags.DEFINE_string("data_dir", None, "directory of {dataset}.npz files (see trustsgd_jax.data.load)")
flags.DEFINE_string("model", "convnet", "model (trustsgd_jax.models.MODELS)")
flags.DEFINE_integer("width", 32, "model width")
flags.DEFINE_list(
    "compressors", ["none", "powersgd:1", "powersgd:4", "topk_level:1", "topk_level:4"], "compressor specs"
)
flags.DEFINE_integer("workers", 4, "data-parallel workers (simulated CPU devices)")
flags.DEFINE_integer("steps", 16, "training steps T the observer records")
flags.DEFINE_integer("global_batch", 64, "global batch (global_batch / workers images per worker and step)")
flags.DEFINE_integer("nonmembers", 256, "held-out images, never trained on, scored as non-members")
flags.DEFINE_enum("bn", "step", wire.BN_MODES, "BatchNorm mode of the candidates' gradients (wire_membership)")
flags.DEFINE_integer("seed", 0, "seed of the held-out split, the initialisation and the data order")
flags.DEFINE_integer("bootstrap", 200, "bootstrap resamples for the 95% intervals")
flags.DEFINE_float("learning_rate", 0.05, "SGD learning rate (train.fit's default optimiser)")
flags.DEFINE_float("momentum", 0.9, "SGD momentum")
flags.DEFINE_integer("chunk", 128, "candidates per vmapped gradient batch")
flags.DEFINE_string("out_dir", "runs/wire_mia", "where the table and the JSON go")

METRICS = (("auc", "AUC"), ("tpr@1%fpr", "TPR@1%FPR"), ("tpr@0.1%fpr", "TPR@0.1%FPR"))


def split(x: np.ndarray, nonmembers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out non-member indices) of the pool, seeded."""
    if not 1 <= nonmembers < len(x):
        raise app.UsageError(f"--nonmembers must be in [1, {len(x) - 1}] for a pool of {len(x)} images.")
    perm = np.random.default_rng(seed).permutation(len(x))
    return np.sort(perm[nonmembers:]), np.sort(perm[:nonmembers])


def cell(r: dict, key: str) -> str:
    lo, hi = r[f"{key}_ci"] or (float("nan"), float("nan"))
    return f"{r[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def table(rows: list[dict], settings: dict) -> str:
    s = settings
    lines = [
        f"Wire MIA, {s['dataset']} ({s['source']}), {s['model']} width {s['width']}, {s['workers']} workers, "
        f"T = {s['steps']} steps, global batch {s['global_batch']}, SGD lr {s['learning_rate']} momentum "
        f"{s['momentum']}, BatchNorm mode '{s['bn']}', seed {s['seed']}: "
        f"worker 0's members against {s['nonmembers']} held-out non-members. 95% bootstrap intervals "
        f"({s['bootstrap']} resamples).",
        "",
    ]
    header = ["compressor", "gradient words/step", "members", "view", "aggregate"] + [name for _, name in METRICS]
    body = [
        [r["compressor"], r["words_per_step"], r["n_members"], r["view"], r["aggregate"]]
        + [cell(r, key) for key, _ in METRICS]
        for r in rows
    ]
    return "\n".join(lines + results.markdown_table(header, body))


def main(argv):
    del argv
    out_dir = results.ensure_workdir(FLAGS.out_dir)
    ds = data.load(FLAGS.dataset, data_dir=FLAGS.data_dir)
    pool_x = data.normalize(np.concatenate([ds.x_train, ds.x_test]), ds.name)
    pool_y = np.concatenate([ds.y_train, ds.y_test])
    train_ids, held_out = split(pool_x, FLAGS.nonmembers, FLAGS.seed)
    x, y = pool_x[train_ids], pool_y[train_ids]
    model = models.make_model(FLAGS.model, ds.num_classes, norm="batch", axis_name=train.AXIS, width=FLAGS.width)
    params = models.init_variables(model, jax.random.key(FLAGS.seed), x.shape[1:])["params"]
    settings = dict(
        dataset=ds.name,
        source=ds.source,
        model=FLAGS.model,
        width=FLAGS.width,
        workers=FLAGS.workers,
        steps=FLAGS.steps,
        global_batch=FLAGS.global_batch,
        nonmembers=FLAGS.nonmembers,
        training_images=len(x),
        bn=FLAGS.bn,
        learning_rate=FLAGS.learning_rate,
        momentum=FLAGS.momentum,
        seed=FLAGS.seed,
        bootstrap=FLAGS.bootstrap,
        devices=f"{jax.device_count()} {jax.devices()[0].platform}",
    )
    rows: list[dict] = []
    timings: dict[str, dict] = {}
    t_start = time.perf_counter()
    for spec in FLAGS.compressors:
        c = compress.from_spec(spec, params, seed=FLAGS.seed)
        t0 = time.perf_counter()
        rec = wire.record_run(
            model,
            c,
            x,
            y,
            steps=FLAGS.steps,
            global_batch=FLAGS.global_batch,
            workers=FLAGS.workers,
            seed=FLAGS.seed,
            optimizer=optax.sgd(FLAGS.learning_rate, momentum=FLAGS.momentum),
        )
        t1 = time.perf_counter()
        members = rec.member_ids
        cx = np.concatenate([x[members], pool_x[held_out]])
        cy = np.concatenate([y[members], pool_y[held_out]])
        is_member = np.r_[np.ones(len(members), bool), np.zeros(len(held_out), bool)]
        sims = wire.wire_similarities(model, rec, cx, cy, views=wire.VIEWS, bn=FLAGS.bn, chunk=FLAGS.chunk)
        t2 = time.perf_counter()
        words = compress.wire_cost(c, params).words
        for view in wire.VIEWS:
            for how in wire.AGGREGATES:
                scores = wire.aggregate(sims[view], how)
                r = mia.attack_metrics(scores, is_member, bootstrap=FLAGS.bootstrap, seed=FLAGS.seed)
                rows.append(dict(compressor=spec, words_per_step=words, view=view, aggregate=how, **r))
        timings[spec] = dict(record_s=t1 - t0, score_s=t2 - t1, candidates=len(cx))
        print(
            f"{spec}: recorded in {t1 - t0:.1f} s, {len(cx)} candidates x {FLAGS.steps} steps scored in "
            f"{t2 - t1:.1f} s",
            flush=True,
        )
        settings["seconds"] = time.perf_counter() - t_start
        results.write_json(out_dir / "wire_mia.json", dict(settings=settings, rows=rows, timings=timings))
        results.write_atomic(out_dir / "wire_mia.md", table(rows, settings) + "\n")
    results.write_table(table(rows, settings), out_dir / "wire_mia.md")


if __name__ == "__main__":
    app.run(main)
