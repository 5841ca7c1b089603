r"""The matching loss around the true image, per setting: where can an attack from noise succeed at all?

    python -m experiments.basin_profile                                   # ConvNet and ResNet-18, both modes
    python -m experiments.basin_profile --models=convnet --train_steps=300
    python -m experiments.basin_profile --norms=batch,group --victim_batch=4
    python -m experiments.basin_profile --modes=train --batchnorm=sync --objective=observed+bn

For each model and BatchNorm mode, worker 0's message in a real round of
``--workers`` workers (`attacks.victim`, ``--batchnorm`` local or sync) on
CIFAR-10 images of the seed-0 order (``--victim_batch`` B images in worker
0's batch), and the ``--objective``'s matching loss (default: the observed
attacker's) at the true batch plus Gaussian noise of standard deviation s
(normalised pixel units), at the truth itself and at unrelated images (`attacks.landscape`). Prints a
Markdown table and writes it to ``--out``.
"""

from __future__ import annotations

from trustsgd_jax.devices import simulate_cpu_devices

simulate_cpu_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from trustsgd_jax import compress, data, models, results, train  # noqa: E402
from trustsgd_jax.attacks import invert, landscape, objectives, victim  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["convnet", "resnet18"], "models")
flags.DEFINE_list("modes", ["eval", "train"], "BatchNorm modes of the round")
flags.DEFINE_list("norms", ["batch"], "normalisation: batch and/or group, none (controls without BatchNorm)")
flags.DEFINE_string("compressor", "none", "compressor spec of the round")
flags.DEFINE_integer("images", 2, "victim batches (each its own round)")
flags.DEFINE_integer("victim_batch", 1, "B: images in each worker's batch of the round")
flags.DEFINE_integer("workers", 4, "workers in the round")
flags.DEFINE_integer("train_steps", 0, "train the model this many steps first (batch 64, --workers workers)")
flags.DEFINE_enum("batchnorm", "local", list(victim.BATCHNORM), "BatchNorm synchronisation of the round")
flags.DEFINE_string(
    "objective",
    "observed",
    "the matching loss profiled (objectives.OBJECTIVES; with +bn, from synchronised BatchNorm's traffic: "
    "--batchnorm=sync, train mode)",
)
flags.DEFINE_string("out", None, "also write the table to this Markdown file")

SIGMAS = (0.001, 0.01, 0.1, 1.0)


def main(argv):
    del argv
    ds = data.load("cifar10")
    order = np.random.default_rng(0).permutation(len(ds.x_train))
    x_all = data.normalize(ds.x_train, "cifar10")
    rows = []
    for name in FLAGS.models:
        for norm in FLAGS.norms:
            model = models.make_model(name, 10, norm=norm)
            variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
            if FLAGS.train_steps:
                fitted = train.fit(
                    victim.data_parallel_model(model, "local"),
                    compress.none(),
                    x_all,
                    ds.y_train,
                    steps=FLAGS.train_steps,
                    global_batch=64,
                    progress=False,
                    # --workers devices, as reproduce trains its victims: ResNet-18 on all 8 simulated devices
                    # of 2 cores once overran XLA's 40 s collective rendezvous.
                    devices=jax.local_devices()[: FLAGS.workers],
                )
                variables = {"params": fitted.state.params, "batch_stats": fitted.state.batch_stats}
            c = compress.from_spec(FLAGS.compressor, variables["params"])
            for mode in FLAGS.modes:
                round_ = victim.make_round(
                    model, c, workers=FLAGS.workers, bn_statistics=mode, batchnorm=FLAGS.batchnorm
                )
                profiles = []
                b = FLAGS.victim_batch
                for j in range(FLAGS.images):
                    mine = order[j * b : (j + 1) * b]  # worker 0's batch: B images of the seed-0 order
                    ids = np.concatenate([mine[None], victim.other_worker_ids(mine, len(x_all), FLAGS.workers, 0)])
                    seen = round_(variables, x_all[ids], ds.y_train[ids])
                    msg = objectives.WithBatchNorm(seen.message, seen.bn) if seen.bn else seen.message
                    others = x_all[order[-8 * b :]].reshape(8, b, *x_all.shape[1:])
                    profiles.append(
                        landscape.loss_profile(
                            invert.attack_model(model),
                            variables,
                            msg,
                            x_all[mine],
                            ds.y_train[mine],
                            others=others,
                            train=mode == "train",
                            objective=FLAGS.objective,
                            sigmas=SIGMAS,
                        )
                    )
                loss = np.mean([p.loss for p in profiles], 0)
                rows.append(
                    [name, norm, b, FLAGS.train_steps, mode, f"{np.mean([p.at_truth for p in profiles]):.4f}"]
                    + [f"{v:.4f}" for v in loss]
                    + [f"{np.mean([p.random_images for p in profiles]):.4f}"]
                )
                print(rows[-1], flush=True)
    lines = [
        f"The {FLAGS.objective} matching loss around the true batch: CIFAR-10, {FLAGS.workers} workers, "
        f"{FLAGS.batchnorm} BatchNorm, {FLAGS.compressor}, mean over {FLAGS.images} victim batches of the seed-0 order "
        "and 4 noise draws (noise on every image of the batch).",
        "",
    ] + results.markdown_table(
        [
            "model",
            "norm",
            "B",
            "train steps",
            "BatchNorm mode",
            "at truth",
            *[f"s = {s}" for s in SIGMAS],
            "random images",
        ],
        rows,
    )
    results.write_table("\n".join(lines), FLAGS.out)


if __name__ == "__main__":
    app.run(main)
