r"""Compressed data-parallel training on every local device (and, optionally, several processes).

    python -m experiments.train --dataset=mnist --model=convnet --compressor=powersgd:2 \
        --steps=300 --batch_size=64 --workdir=runs/train

Writes to --workdir: ``train_metrics.jsonl`` (loss / accuracy / wire words as
training goes), ``summary.json`` (test accuracy, wire bytes per step, config)
and an orbax checkpoint in ``checkpoint/``.

Several processes (one machine or many): start one per host with the same
flags plus ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``.
On CPU, JAX's gloo collectives carry the step between processes.
"""

from __future__ import annotations

from trustsgd_jax.devices import simulate_cpu_devices

simulate_cpu_devices(8)

# Imported after XLA_FLAGS is set, because JAX reads it when first imported.
import os  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags  # noqa: E402

from trustsgd_jax import compress, data, models, results, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "mnist", "mnist | cifar10 | cifar100")
flags.DEFINE_string("data_source", "auto", "auto | npz | sample | tfds (see trustsgd_jax.data)")
flags.DEFINE_string(
    "data_dir", None, "directory of {dataset}.npz files (else $TRUSTSGD_DATA_DIR, else the bundled sample)"
)
flags.DEFINE_string("tfds_data_dir", None, "prepared TFDS data_dir for --data_source=tfds")
flags.DEFINE_string("model", "convnet", "convnet | resnet18")
flags.DEFINE_string("norm", "batch", "batch (synchronised) | batch_local | group | none")
flags.DEFINE_string("compressor", "powersgd:2", "compressor spec, e.g. none, powersgd:4, topk_level:4, topk:0.01")
flags.DEFINE_integer("steps", 300, "training steps")
flags.DEFINE_integer("batch_size", 64, "global batch (divisible by the total device count)")
flags.DEFINE_float("learning_rate", 0.05, "SGD learning rate (momentum 0.9)")
flags.DEFINE_integer("seed", 0, "seed for init, data order and compressor randomness")
flags.DEFINE_string("workdir", "runs/train", "output directory")
flags.DEFINE_bool("checkpoint", True, "save an orbax checkpoint of the final state")
flags.DEFINE_bool("shard_map", False, "run the step under jax.shard_map instead of jax.pmap")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, to run across processes")
flags.DEFINE_integer("num_processes", 1, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", 0, "this process's index (with --coordinator_address)")


CONFIG_FLAGS = ("dataset", "model", "norm", "compressor", "steps", "batch_size", "learning_rate", "seed", "shard_map")


def main(argv):
    del argv
    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    workdir = results.ensure_workdir(FLAGS.workdir)
    ds = data.load(FLAGS.dataset, FLAGS.data_source, FLAGS.data_dir, FLAGS.tfds_data_dir)
    train.check_batch(FLAGS.batch_size, jax.device_count())
    model = models.make_model(FLAGS.model, ds.num_classes, norm=FLAGS.norm, axis_name=train.AXIS)
    x_train, x_test = data.normalize(ds.x_train, ds.name), data.normalize(ds.x_test, ds.name)
    params = models.init_variables(model, jax.random.key(FLAGS.seed), x_train.shape[1:])["params"]
    compressor = compress.from_spec(FLAGS.compressor, params, seed=FLAGS.seed)
    is_main = jax.process_index() == 0
    if is_main:
        print(
            f"{ds.name} from {ds.source}: {len(x_train)} train / {len(x_test)} test; {FLAGS.model} "
            f"norm={FLAGS.norm}; {compressor.name}; {jax.device_count()} devices in "
            f"{jax.process_count()} process(es)",
            flush=True,
        )
    result = train.fit(
        model,
        compressor,
        x_train,
        ds.y_train,
        steps=FLAGS.steps,
        global_batch=FLAGS.batch_size,
        optimizer=optax.sgd(FLAGS.learning_rate, momentum=0.9),
        seed=FLAGS.seed,
        progress=FLAGS.progress,
        use_shard_map=FLAGS.shard_map,
    )
    test = train.evaluate(model, result.state.params, result.state.batch_stats, x_test, ds.y_test)
    summary = run_summary(result, test, ds.source)
    if is_main:
        write_metrics(workdir, result, summary)
    if FLAGS.checkpoint:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(
            os.path.abspath(workdir / "checkpoint"),
            {"params": result.state.params, "batch_stats": result.state.batch_stats},
            force=True,
        )
        ckpt.wait_until_finished()
    if is_main:
        print(
            f"test accuracy {test['accuracy']:.4f}  loss {test['loss']:.4f}  wire {result.wire['words']} words/step "
            f"({summary['compression_ratio']:.1f}x less than uncompressed)  -> {workdir}",
            flush=True,
        )
    print(f"process {jax.process_index()} param_abs_sum {summary['param_abs_sum']:.10e}", flush=True)
    return 0


def run_summary(result: train.FitResult, test: dict, data_source: str) -> dict:
    """``summary.json``: the flags that define the run, where it ran, its test accuracy, wire cost and a digest."""
    return {
        "config": {k: getattr(FLAGS, k) for k in CONFIG_FLAGS},
        "data_source": data_source,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "wire_per_step": result.wire,
        "compression_ratio": result.wire["uncompressed_words"] / result.wire["words"],
        "train_seconds": result.seconds,
        # Equal on every process when they applied identical updates (tests compare it).
        "param_abs_sum": float(
            sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(result.state.params))
        ),
    }


def write_metrics(workdir: pathlib.Path, result: train.FitResult, summary: dict) -> None:
    """``train_metrics.jsonl`` (the history, replacing an earlier run's) and ``summary.json``."""
    metrics_path = workdir / "train_metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()
    for rec in result.history:
        results.append_record(metrics_path, rec)
    results.write_json(workdir / "summary.json", summary)


if __name__ == "__main__":
    app.run(main)
