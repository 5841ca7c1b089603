r"""Reproduce and extend the study: Table 1, Figure 1 and Table 2 from one resumable run.

    python -m experiments.reproduce                       # --preset=quick: CPU, bundled data, ~10 minutes
    python -m experiments.reproduce --preset=paper        # ResNet-18, paper scale (GPU / several hosts)

Units of work, each appended to ``<workdir>/results.jsonl`` as one fsynced
line when it finishes (a rerun with the same workdir skips finished units):

* ``gradinv``: dataset x compressor x threat model x image group: gradient
  inversion of each image of the group (its own victim batch of
  ``--victim_batch`` images) from the victim's message, scored by SSIM / PSNR;
  reconstructions saved under ``recon/``.
* ``mia``: dataset x compressor: target and shadow models trained with the
  compressor; threshold attacks and LiRA; the target's accuracy on held-out
  data and its wire bytes (the utility table).

Reports (``experiments/report.py``) are regenerated at the end of every run.
Presets only set defaults; flags on the command line win.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # 8 simulated CPU workers unless the caller chose otherwise (no effect on GPUs)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import hashlib
import json
import os
import pathlib
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "quick", ["tiny", "quick", "paper"], "flag defaults: tiny (tests), quick (CPU), paper")
flags.DEFINE_list("datasets", None, "datasets, e.g. mnist,cifar10,cifar100")
flags.DEFINE_list("compressors", None, "compressor specs, e.g. none,powersgd:1,topk_level:1")
flags.DEFINE_list("threat_models", None, "observed and/or adaptive")
flags.DEFINE_integer("images", None, "images attacked per dataset and configuration")
flags.DEFINE_integer("victim_batch", 1, "images in one victim batch (B)")
flags.DEFINE_integer("group", None, "victim batches attacked together in one program (one unit)")
flags.DEFINE_integer("iterations", None, "attack iterations")
flags.DEFINE_integer("restarts", None, "attack restarts")
flags.DEFINE_float("tv", 1e-4, "total-variation weight")
flags.DEFINE_integer("attack_step", 0, "attack at this training step (0: first step, no error memory)")
flags.DEFINE_string("model", None, "convnet | resnet18")
flags.DEFINE_bool("mia", None, "run membership inference units")
flags.DEFINE_list("mia_datasets", None, "datasets for membership inference (default: --datasets)")
flags.DEFINE_list("mia_compressors", None, "compressors for membership inference (default: --compressors)")
flags.DEFINE_integer("mia_shadows", None, "shadow models per MIA configuration")
flags.DEFINE_integer("mia_steps", None, "training steps of target and shadow models")
flags.DEFINE_integer("mia_pool", None, "images in the MIA pool (members + non-members)")
flags.DEFINE_integer("parallel_models", 1, "target/shadow models trained at once (train.fit_many); >1 on real devices")
flags.DEFINE_integer("batch_size", 64, "global training batch")
flags.DEFINE_string("data_source", "auto", "auto | npz | sample | tfds")
flags.DEFINE_string("data_dir", None, "directory of {dataset}.npz (else $TRUSTSGD_DATA_DIR, else bundled sample)")
flags.DEFINE_string("tfds_data_dir", None, "prepared TFDS data_dir for --data_source=tfds")
flags.DEFINE_string("workdir", "runs/reproduce", "output directory (resumable)")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_bool("progress", True, "progress bars")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host)")
flags.DEFINE_integer("num_processes", 1, "processes (multi-host)")
flags.DEFINE_integer("process_id", 0, "this process (multi-host)")

PRESETS = {
    "tiny": dict(datasets=["mnist"], compressors=["none", "powersgd:1"], threat_models=["observed"], images=1,
                 group=1, iterations=20, restarts=1, model="convnet", mia=True, mia_shadows=2, mia_steps=10,
                 mia_pool=256),
    "quick": dict(datasets=["mnist", "cifar10", "cifar100"],
                  compressors=["none", "powersgd:1", "topk_level:1", "powersgd:2", "topk_level:2", "powersgd:4",
                               "topk_level:4"],
                  threat_models=["observed", "adaptive"], images=2, group=2, iterations=400, restarts=1,
                  model="convnet", mia=True, mia_datasets=["cifar10"], mia_compressors=["none", "powersgd:1", "topk_level:1"],
                  mia_shadows=4, mia_steps=100, mia_pool=1200),
    "paper": dict(datasets=["cifar10", "cifar100", "mnist"],
                  compressors=["none", "powersgd:1", "topk_level:1", "powersgd:2", "topk_level:2", "powersgd:4",
                               "topk_level:4", "powersgd:30", "topk_level:30", "powersgd:50", "topk_level:50"],
                  threat_models=["observed", "adaptive"], images=10, group=10, iterations=24000, restarts=1,
                  model="resnet18", mia=True, mia_shadows=16, mia_steps=3000, mia_pool=20000),
}


class ConfigError(ValueError):
    pass


def apply_preset():
    for name, value in PRESETS[FLAGS.preset].items():
        if not FLAGS[name].present or getattr(FLAGS, name) is None:
            if FLAGS[name].present:
                continue
            setattr(FLAGS, name, value)
    if FLAGS.mia_datasets is None:
        FLAGS.mia_datasets = list(FLAGS.datasets)
    if FLAGS.mia_compressors is None:
        FLAGS.mia_compressors = list(FLAGS.compressors)
    if FLAGS.group is None:
        FLAGS.group = FLAGS.images


def unit_key(record: dict) -> str:
    fields = {k: record[k] for k in sorted(record) if k in KEY_FIELDS}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


KEY_FIELDS = ("kind", "dataset", "compressor", "threat", "group_index", "images", "victim_batch", "iterations",
              "restarts", "tv", "attack_step", "model", "seed", "mia_shadows", "mia_steps", "mia_pool",
              "batch_size", "data_source")


def validate(datasets_loaded, params_by_dataset):
    """All flag errors before any work starts."""
    from trustsgd_jax import compress
    from trustsgd_jax.attacks import gradinv

    for t in FLAGS.threat_models:
        if t not in gradinv.THREATS:
            raise ConfigError(f"unknown threat model {t!r}; use {', '.join(gradinv.THREATS)}.")
    if FLAGS.images < 1 or FLAGS.iterations < 1 or FLAGS.restarts < 1 or FLAGS.group < 1:
        raise ConfigError("--images, --iterations, --restarts and --group must be >= 1.")
    if FLAGS.images % FLAGS.victim_batch:
        raise ConfigError(f"--images={FLAGS.images} is not a multiple of --victim_batch={FLAGS.victim_batch}.")
    for name, params in params_by_dataset.items():
        import jax
        import numpy as np

        shapes = [np.shape(x) for x in jax.tree.leaves(params)]
        for spec in FLAGS.compressors:
            c = compress.from_spec(spec, params)  # raises on unknown specs
            kind, _, arg = spec.partition(":")
            if kind in ("powersgd", "topk_level"):
                if not any(compress.powersgd_plan(shapes, int(arg))):
                    useful = max((r for r in range(1, 513) if any(compress.powersgd_plan(shapes, r))), default=0)
                    raise ConfigError(f"{spec}: rank {arg} compresses no tensor of {FLAGS.model} on {name} "
                                      f"(every tensor would travel in full); the largest useful rank is {useful}.")
            del c


def prepare():
    """Everything that can be wrong with the flags fails here, before any work starts."""
    import jax

    from trustsgd_jax import data, models, results

    workdir = results.ensure_workdir(FLAGS.workdir)
    datasets = {}
    for name in sorted(set(FLAGS.datasets) | set(FLAGS.mia_datasets if FLAGS.mia else [])):
        datasets[name] = data.load(name, FLAGS.data_source, FLAGS.data_dir, FLAGS.tfds_data_dir)
    attack_models, variables = {}, {}
    for name in FLAGS.datasets:
        ds = datasets[name]
        attack_models[name] = models.make_model(FLAGS.model, ds.num_classes, norm="batch", conv_impl="patches")
        variables[name] = models.init_variables(attack_models[name], jax.random.key(FLAGS.seed), ds.image_shape)
        if FLAGS.images > len(ds.x_train):
            raise ConfigError(f"--images={FLAGS.images} exceeds the {len(ds.x_train)} images of {name}.")
    validate(datasets, {n: v["params"] for n, v in variables.items()})
    return workdir, datasets, attack_models, variables


def main(argv):
    del argv
    import jax

    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import numpy as np

    from experiments import report
    from trustsgd_jax import data, results

    apply_preset()
    try:
        workdir, datasets, attack_models, variables = prepare()
    except (data.DataError, results.ResultsError, ValueError) as e:
        raise ConfigError(str(e)) from e
    is_main = jax.process_index() == 0

    results_path = workdir / "results.jsonl"
    damaged = results.repair_trailing_line(results_path)
    if damaged is not None:
        print(f"WARNING: the last line of {results_path} was cut short (a run was killed while writing); moved it "
              f"to {results_path}.corrupt and that unit will be redone: {damaged[:80]!r}", flush=True)
    done = {r.get("key") for r in results.read_records(results_path).records}
    (workdir / "recon").mkdir(exist_ok=True)
    (workdir / "roc").mkdir(exist_ok=True)

    units = []
    for name in FLAGS.datasets:
        n_groups = -(-FLAGS.images // (FLAGS.group * FLAGS.victim_batch))
        for spec in FLAGS.compressors:
            for threat in FLAGS.threat_models:
                if threat == "adaptive" and spec in ("none", "sgd"):
                    continue  # nothing to adapt to: identical to observed
                for g in range(n_groups):
                    units.append(dict(kind="gradinv", dataset=name, compressor=spec, threat=threat, group_index=g,
                                      images=FLAGS.images, victim_batch=FLAGS.victim_batch,
                                      iterations=FLAGS.iterations, restarts=FLAGS.restarts, tv=FLAGS.tv,
                                      attack_step=FLAGS.attack_step, model=FLAGS.model, seed=FLAGS.seed,
                                      data_source=datasets[name].source))
    if FLAGS.mia:
        for name in FLAGS.mia_datasets:
            for spec in FLAGS.mia_compressors:
                units.append(dict(kind="mia", dataset=name, compressor=spec, model=FLAGS.model, seed=FLAGS.seed,
                                  mia_shadows=FLAGS.mia_shadows, mia_steps=FLAGS.mia_steps, mia_pool=FLAGS.mia_pool,
                                  batch_size=FLAGS.batch_size, data_source=datasets[name].source))
    for u in units:
        u["key"] = unit_key(u)
    todo = [u for u in units if u["key"] not in done]
    if is_main:
        print(f"{len(units)} units, {len(units) - len(todo)} already done in {results_path}; {len(todo)} to run",
              flush=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="units", unit="unit", dynamic_ncols=True,
               disable=not (FLAGS.progress and is_main))
    for u in todo:
        t0 = time.time()
        if u["kind"] == "gradinv":
            record = run_gradinv_unit(u, datasets[u["dataset"]], attack_models[u["dataset"]],
                                      variables[u["dataset"]], workdir)
            line = (f"{u['dataset']} {u['compressor']} {u['threat']} group {u['group_index']}: "
                    f"SSIM {np.mean(record['ssim']):.3f} PSNR {np.mean(record['psnr']):.1f} dB")
        else:
            record = run_mia_unit(u, datasets[u["dataset"]], workdir)
            t = record["attacks"]
            line = (f"MIA {u['dataset']} {u['compressor']}: loss AUC {t['loss']['auc']:.3f}, LiRA TPR@1%FPR "
                    f"{t.get('lira_online', t['loss'])['tpr@1%fpr']:.3f}, test acc {record['test_accuracy']:.3f}")
        if is_main:
            results.append_record(results_path, record)
            bar.write(f"{line}  ({time.time() - t0:.0f}s)")
        bar.update(1)
    bar.close()
    if is_main:
        written = report.write_reports(workdir)
        print("reports: " + ", ".join(str(p) for p in written), flush=True)
    return 0


def run_gradinv_unit(u, ds, model, variables, workdir):
    import jax
    import numpy as np

    from trustsgd_jax import compress, data, results, train
    from trustsgd_jax.attacks import gradinv

    b = u["victim_batch"]
    per_group = FLAGS.group * b
    ids = np.arange(u["group_index"] * per_group, min((u["group_index"] + 1) * per_group, u["images"]))
    # Attacked images: a fixed, seeded draw from the training split.
    order = np.random.default_rng(u["seed"]).permutation(len(ds.x_train))
    pick = order[ids]
    x = data.normalize(ds.x_train[pick], ds.name)
    y = ds.y_train[pick]
    c = compress.from_spec(u["compressor"], variables["params"], seed=u["seed"])
    state = None
    if u["attack_step"] > 0:
        variables, state = trained_victim(u, ds, c)
    cfg = gradinv.AttackConfig(iterations=u["iterations"], restarts=u["restarts"], tv=u["tv"],
                               chunk=min(100, u["iterations"]), parallel=len(ids) // b * u["restarts"],
                               seed=u["seed"])
    r = gradinv.audit(model, variables, x, y, c, dataset=ds.name, threat=u["threat"], config=cfg, batch_size=b,
                      compressor_state=state, progress=FLAGS.progress)
    recon = pathlib.Path("recon") / f"{u['key']}.npz"
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, reconstructions=(r.reconstructions * 255).round().astype(np.uint8),
                        originals=(r.originals * 255).round().astype(np.uint8), image_ids=pick)
    results.write_atomic(workdir / recon, buf.getvalue())
    return dict(u, image_ids=pick.tolist(), labels=y.tolist(), ssim=r.per_image["ssim"].tolist(),
                psnr=r.per_image["psnr"].tolist(), mse=r.per_image["mse"].tolist(),
                matching_loss=r.matching_loss.tolist(), wire_words=r.wire.words,
                uncompressed_words=sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(variables["params"])),
                recon=str(recon))


_VICTIMS = {}


def trained_victim(u, ds, compressor):
    """(variables, worker 0's compressor state) after `attack_step` steps of compressed training.

    Trained once per (dataset, compressor, step, ...) and shared by every
    threat model and image group that attacks it; a resumed run retrains it
    once (training is seeded, so the victim is the same).
    """
    import jax

    from trustsgd_jax import data, models, train

    key = (u["dataset"], u["compressor"], u["attack_step"], u["model"], u["seed"], FLAGS.batch_size)
    if key not in _VICTIMS:
        dp_model = models.make_model(u["model"], ds.num_classes, norm="batch", axis_name=train.AXIS)
        fitted = train.fit(dp_model, compressor, data.normalize(ds.x_train, ds.name), ds.y_train,
                           steps=u["attack_step"], global_batch=FLAGS.batch_size, seed=u["seed"], progress=False)
        _VICTIMS[key] = ({"params": fitted.state.params, "batch_stats": fitted.state.batch_stats},
                         jax.tree.map(lambda s: s[0], fitted.state.comp_state))  # the victim is worker 0
        if jax.process_index() == 0:
            print(f"trained the victim for {u['dataset']} {u['compressor']} to step {u['attack_step']}", flush=True)
    return _VICTIMS[key]


def run_mia_unit(u, ds, workdir):
    import numpy as np

    from trustsgd_jax import data, models, results, train
    from trustsgd_jax.attacks import membership as mia

    x = np.concatenate([ds.x_train, ds.x_test])[: u["mia_pool"]]
    y = np.concatenate([ds.y_train, ds.y_test])[: u["mia_pool"]]
    x = data.normalize(x, ds.name)
    split = pathlib.Path("roc") / f"{u['key']}_split.npz"
    setup = mia.train_target_and_shadows(
        x, y, model_fn=lambda: models.make_model(u["model"], ds.num_classes, norm="batch", axis_name=train.AXIS),
        compressor_spec=u["compressor"], num_shadows=u["mia_shadows"], steps=u["mia_steps"],
        global_batch=u["batch_size"], seed=u["seed"], split_path=workdir / split,
        parallel_models=FLAGS.parallel_models)
    rep = mia.evaluate_membership(setup.target_predict, x, y, setup.is_member, shadow_predicts=setup.shadow_predicts,
                                  shadow_in=setup.shadow_in, augment="flip" if ds.name != "mnist" else "none",
                                  bootstrap=200, seed=u["seed"])
    roc = pathlib.Path("roc") / f"{u['key']}.npz"
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **{f"{k}_fpr": v[0] for k, v in rep.roc.items()},
                        **{f"{k}_tpr": v[1] for k, v in rep.roc.items()})
    results.write_atomic(workdir / roc, buf.getvalue())
    return dict(u, attacks=rep.table, test_accuracy=setup.target_test_accuracy, wire=setup.wire, roc=str(roc),
                split=str(split))


if __name__ == "__main__":
    try:
        app.run(main)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
