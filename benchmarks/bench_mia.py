r"""Throughput of membership inference: shadow-model training and scoring.

    python -m benchmarks.bench_mia                       # CPU default (ConvNet) and ResNet-18
    python -m benchmarks.bench_mia --models=convnet --shadows=8

Shadow training images/s (all models together) for K models trained one
after another (``train.fit``) and K models at once (``train.fit_many``: the
data-parallel step vmapped over models, each with the compressor over all
devices), and eval-mode scoring images/s (logits + every attack's score).
Timings exclude the first (compiling) steps.
"""

from __future__ import annotations

from trustsgd_jax.devices import simulate_cpu_devices

simulate_cpu_devices(8)

# Imported after XLA_FLAGS is set, because JAX reads it when first imported.
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from trustsgd_jax import compress, data, models, results, train  # noqa: E402
from trustsgd_jax.attacks import membership as mia  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["convnet", "resnet18"], "models to measure")
flags.DEFINE_string("dataset", "cifar10", "dataset of the images (real, bundled sample by default)")
flags.DEFINE_string("compressor", "powersgd:1", "training compressor")
flags.DEFINE_integer("shadows", 4, "models trained together")
flags.DEFINE_integer("steps", 10, "timed training steps per model")
flags.DEFINE_integer("batch_size", 64, "global batch")
flags.DEFINE_string("out", None, "also write the table to this Markdown file")


def main(argv):
    del argv
    ds = data.load(FLAGS.dataset)
    x = data.normalize(np.concatenate([ds.x_train, ds.x_test]), ds.name)
    y = np.concatenate([ds.y_train, ds.y_test])
    k, steps, b = FLAGS.shadows, FLAGS.steps, FLAGS.batch_size
    masks = np.random.default_rng(0).random((k, len(x))).argsort(0) < k // 2
    rows = []
    for name in FLAGS.models:
        for impl in ("xla", "patches"):
            model = models.make_model(name, ds.num_classes, norm="batch", axis_name=train.AXIS, conv_impl=impl)
            params = models.init_variables(model, jax.random.key(0), x.shape[1:])["params"]
            c = compress.from_spec(FLAGS.compressor, params)
            # One compiling step, then the timed steps.
            train.fit(model, c, x[masks[0]], y[masks[0]], steps=1, global_batch=b, progress=False)
            t0 = time.perf_counter()
            for i, m in enumerate(masks):  # as shadows.train_target_and_shadows does with parallel_models=1
                train.fit(model, c, x[m], y[m], steps=steps, global_batch=b, seed=i, progress=False)
            seq = time.perf_counter() - t0
            train.fit_many(model, c, x, y, masks, list(range(k)), steps=1, global_batch=b)
            t0 = time.perf_counter()
            states = train.fit_many(model, c, x, y, masks, list(range(k)), steps=steps, global_batch=b)
            many = time.perf_counter() - t0
            st = states[0]
            train.predict_logits(model, st.params, st.batch_stats, x[:500])
            t0 = time.perf_counter()
            logits = train.predict_logits(model, st.params, st.batch_stats, x)
            mia.membership_scores(logits, y)
            score = time.perf_counter() - t0
            rows.append(
                dict(model=name, impl=impl, seq=k * steps * b / seq, many=k * steps * b / many, score=len(x) / score)
            )
            print(rows[-1], flush=True)
    lines = [
        f"Membership inference throughput, {FLAGS.dataset} {x.shape[1:]}, {FLAGS.compressor}, K = {k} models, "
        f"global batch {b}, {jax.device_count()} {jax.devices()[0].platform} devices",
        "",
    ] + results.markdown_table(
        [
            "model",
            "conv",
            "shadow training img/s, sequential",
            "img/s, K at once (fit_many)",
            "speed-up",
            "scoring img/s",
        ],
        [
            [
                r["model"],
                r["impl"],
                f"{r['seq']:.0f}",
                f"{r['many']:.0f}",
                f"{r['many'] / r['seq']:.2f}x",
                f"{r['score']:.0f}",
            ]
            for r in rows
        ],
    )
    results.write_table("\n".join(lines), FLAGS.out)


if __name__ == "__main__":
    app.run(main)
