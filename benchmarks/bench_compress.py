r"""Cost of gradient compression in the data-parallel step: time and words on the wire.

    python -m benchmarks.bench_compress                 # ResNet-18, CIFAR-10 shapes, 8 simulated CPU devices
    python -m benchmarks.bench_compress --model=convnet --steps=10

For each compressor: median train-step time (forward, backward, compression,
collectives, optimizer), the compressor's reduce alone on the same gradients,
32-bit words one worker puts on the wire per step (gradient message +
synchronised BatchNorm statistics), the analytic word count, and the ratios
to the uncompressed step. Prints a Markdown table and writes it to --out.

The steps are timed interleaved: every compressor's step is compiled first,
then each round times one step of each in turn, and ``x none`` is the median
over rounds of the step's time over the uncompressed step's in the same
round. A slow spell of a shared machine then slows both sides of a ratio
instead of one compressor's whole row. With ``--op_profile`` one more step
of each is traced (`benchmarks.op_profile`): where the step's time goes, per
kind of operation, to compare with the uncompressed step's.
"""

from __future__ import annotations

from trustsgd_jax.devices import simulate_cpu_devices

simulate_cpu_devices(8)

# Imported after XLA_FLAGS is set, because JAX reads it when first imported.
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import op_profile, timing  # noqa: E402
from trustsgd_jax import compress, models, results, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet18", "convnet | resnet18")
flags.DEFINE_string("compressors", "none,topk_level:1,topk_level:4,powersgd:1,powersgd:4", "comma-separated specs")
flags.DEFINE_list(
    "topk_selections",
    ["exact", "approx_max_k"],
    "Top-K selections timed for every topk_level spec (compress.TOPK_SELECTIONS; exact is the spec itself)",
)
flags.DEFINE_integer("batch_size", 64, "global batch over all devices")
flags.DEFINE_integer("steps", 5, "timed rounds: steps per compressor, one of each in turn (after one warm-up step)")
flags.DEFINE_bool("op_profile", True, "trace one more step of each compressor: time per kind of operation")
flags.DEFINE_string("out", None, "also write the table to this Markdown file")


def analytic_words(spec: str, shapes) -> int:
    """Word counts from the formulas alone, independent of the message objects."""
    parsed = compress.parse_spec(spec)
    dense = sum(int(np.prod(s)) for s in shapes)
    if parsed.kind == "none":
        return dense
    if parsed.kind == "powersgd":
        return sum(compress.powersgd_words(shapes, int(parsed.number)))
    if parsed.kind == "topk_level":  # values + int32 indices, as many words as PowerSGD (rounded to even)
        return 2 * (sum(compress.powersgd_words(shapes, int(parsed.number))) // 2)
    raise ValueError(f"no analytic formula for {spec!r} in this benchmark")


def compressor_cases(params) -> list[tuple[str, str, compress.Compressor]]:
    """(label, spec, compressor) of every --compressors spec, and of every Top-K level spec in each other
    --topk_selections selection."""
    cases = []
    for spec in FLAGS.compressors.split(","):
        cases.append((spec, spec, compress.from_spec(spec, params)))
        parsed = compress.parse_spec(spec)
        for sel in FLAGS.topk_selections:
            if parsed.kind == "topk_level" and sel != "exact":
                cases.append((f"{spec}+{sel}", spec, compress.topk_level(params, int(parsed.number), selection=sel)))
    return cases


def reduce_seconds(c: compress.Compressor, params, n: int, rng: np.random.Generator) -> list[float]:
    """Seconds of the compressor's reduce alone on random gradients over `n` devices, --steps times (compiled first)."""
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(n, *p.shape)).astype(np.float32)), params)
    cstate = train.replicate(c.init(params), n)
    red = jax.pmap(lambda g, s: c.reduce(g, s, train.AXIS)[:2], axis_name=train.AXIS)
    jax.block_until_ready(red(grads, cstate))
    times = []
    for _ in range(FLAGS.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(red(grads, cstate))
        times.append(time.perf_counter() - t0)
    return times


def main(argv):
    del argv
    n = jax.local_device_count()
    model = models.make_model(FLAGS.model, 10, norm="batch", axis_name=train.AXIS)
    image_shape = (32, 32, 3)
    per = train.check_batch(FLAGS.batch_size, n)
    rng = np.random.default_rng(0)
    # Timing only: pixel values do not change the cost of the step.
    images = jnp.asarray(rng.normal(size=(n, per, *image_shape)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, size=(n, per)).astype(np.int32))
    optimizer = optax.sgd(0.01, momentum=0.9)
    params = models.init_variables(model, jax.random.key(0), image_shape)["params"]
    shapes = [np.shape(x) for x in jax.tree.leaves(params)]
    built = []
    for label, spec, c in compressor_cases(params):
        state = train.replicate(train.init_state(model, optimizer, c, image_shape, 0), n)
        wire = train.step_wire_cost(model, c, train.unreplicate(state))
        step = train.pmap_step(train.make_step(model, optimizer, c))
        t0 = time.perf_counter()
        state, m = step(state, images, labels)
        jax.block_until_ready(m)
        built.append(
            dict(label=label, spec=spec, c=c, step=step, state=state, wire=wire, compile=time.perf_counter() - t0)
        )

    def one_step(b):
        b["state"], m = b["step"](b["state"], images, labels)  # the state is donated: keep the new one
        return jax.block_until_ready(m)

    # Interleaved: round r times one step of every case, so a slow spell of the machine hits every case alike.
    per_case = timing.interleaved([functools.partial(one_step, b) for b in built], FLAGS.steps)
    times = {b["label"]: t for b, t in zip(built, per_case, strict=True)}
    base_label = next((b["label"] for b in built if b["spec"] == "none"), built[0]["label"])
    rows, profiles = [], []
    for b in built:
        label = b["label"]
        if FLAGS.op_profile:
            prof = op_profile.op_profile(functools.partial(one_step, b))
            profiles.append(f"* {label}: " + op_profile.summary(prof, unit="step"))
        ratios = np.asarray(times[label]) / np.asarray(times[base_label])
        rows.append(
            dict(
                spec=label,
                step=float(np.median(times[label])),
                ratio=timing.paired_ratio(times[label], times[base_label]),
                ratio_range=(float(np.min(ratios)), float(np.max(ratios))),
                reduce=float(np.median(reduce_seconds(b["c"], params, n, rng))),
                compile=b["compile"],
                words=b["wire"]["grad_words"],
                bn=b["wire"]["bn_words"],
                analytic=analytic_words(b["spec"], shapes),
            )
        )
        print(
            f"{label}: step {rows[-1]['step']:.3f}s ({rows[-1]['ratio']:.2f}x none) reduce {rows[-1]['reduce']:.3f}s",
            flush=True,
        )
    results.write_table("\n".join(table_lines(rows, n, profiles)), FLAGS.out)


def table_lines(rows: list[dict], n: int, profiles: list[str]) -> list[str]:
    """The Markdown table of `rows` (ratios to the uncompressed step's), with its heading and notes."""
    base = next((r for r in rows if r["spec"] == "none"), rows[0])
    lines = [
        f"ResNet-18 step cost, {n} devices, global batch {FLAGS.batch_size}, {jax.devices()[0].platform}"
        if FLAGS.model == "resnet18"
        else f"{FLAGS.model}, {n} devices, global batch {FLAGS.batch_size}",
        "",
    ] + results.markdown_table(
        [
            "compressor",
            "step s",
            "x none (median of rounds)",
            "range over rounds",
            "reduce s",
            "words/worker/step",
            "analytic",
            "+ sync-BN words",
            "wire ratio",
        ],
        [
            [
                r["spec"],
                f"{r['step']:.3f}",
                f"{r['ratio']:.2f}",
                f"{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}",
                f"{r['reduce']:.4f}",
                r["words"],
                r["analytic"],
                r["bn"],
                f"{r['words'] / base['words']:.4f}",
            ]
            for r in rows
        ],
    )
    lines += [
        "",
        f"Steps timed interleaved: {FLAGS.steps} rounds, one step of each compressor per round.",
    ]
    if profiles:
        lines += ["", "Where one step goes (thread time of XLA's operations, benchmarks.op_profile):", *profiles]
    return lines


if __name__ == "__main__":
    app.run(main)
