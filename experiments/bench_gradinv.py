r"""Speed of the gradient-inversion attack: iterations per second, compile time, peak memory.

    python -m experiments.bench_gradinv                    # ResNet-18, 32x32x3, B = 1
    python -m experiments.bench_gradinv --conv_impls=xla,patches --iterations=10
    python -m experiments.bench_gradinv --model=convnet --iterations=200

Rows: one attack, and N independent attacks batched in one program (vmap),
for each convolution implementation (``patches``: `models.PatchesConv`,
im2col + matmul, the attack's kernel weight gradients kept factored, see
`objectives.Factored`; ``xla``: native convolutions, which XLA:CPU runs slowly
inside the attack's scan loop). "aggregate it/s" counts iterations of all
attacks together; "vs sequential" compares the batched aggregate with N
single attacks run one after another. "GFLOP/it" is XLA's cost analysis of
one iteration of all attacks in the row; "GFLOP/s" the rate achieved, to
set against the measured dense-matmul peak printed below the table: a
batched row can only beat N sequential attacks by as much as batching
raises that rate. Peak memory is the process's peak resident set size (CPU)
or the device's peak bytes in use (GPU).
"""

from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from trustsgd_jax import compress, data, models, results
from trustsgd_jax.attacks import gradinv, victim

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet18", "convnet | resnet18")
flags.DEFINE_integer("iterations", 40, "timed attack iterations per configuration (after compiling)")
flags.DEFINE_integer("batched", 8, "number of independent attacks batched together")
flags.DEFINE_string("conv_impls", "patches", "convolution implementations to compare (xla,patches)")
flags.DEFINE_string("out", None, "also write the table to this Markdown file")


def _peak_mb():
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _matmul_gflops(n: int = 2048) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, a))
    t0 = time.perf_counter()
    for _ in range(10):
        out = mm(a, a)
    jax.block_until_ready(out)
    return 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e9


def main(argv):
    del argv
    ds = data.load("cifar10")
    rows = []
    for impl in FLAGS.conv_impls.split(","):
        model = models.make_model(FLAGS.model, 10, norm="batch", conv_impl=impl)
        variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
        # Messages of one-worker eval-mode rounds: the attack's cost does not depend on the round.
        round_ = victim.make_round(model, compress.none(), workers=1, bn_statistics="eval")
        x = data.normalize(ds.x_train[: FLAGS.batched], "cifar10")
        msgs = [
            round_(variables, x[None, i : i + 1], ds.y_train[None, i : i + 1]).message for i in range(FLAGS.batched)
        ]
        for n in (1, FLAGS.batched):
            cfg = gradinv.AttackConfig(iterations=10**6, chunk=FLAGS.iterations, parallel=n)
            attack = gradinv.compile_attack(
                model, variables, "observed", cfg, "cifar10", (32, 32, 3), train=False, width=n
            )
            msg = jax.tree.map(lambda *a: jnp.stack(a), *msgs[:n])
            y = jnp.asarray(ds.y_train[:n, None].astype(np.int32))
            xs = jax.random.normal(jax.random.key(1), (n, 1, 32, 32, 3))
            st = attack.init(xs)
            t0 = time.perf_counter()
            jax.block_until_ready(attack.run_chunk(xs, st, msg, y, FLAGS.iterations))
            compile_and_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready(attack.run_chunk(xs, st, msg, y, FLAGS.iterations))
            run = time.perf_counter() - t0
            gflop = attack.run_chunk.lower(xs, st, msg, y, 1).compile().cost_analysis()["flops"] / 1e9
            rows.append(
                dict(
                    impl=impl,
                    n=n,
                    its=FLAGS.iterations / run,
                    agg=n * FLAGS.iterations / run,
                    compile=compile_and_first - run,
                    mem=_peak_mb(),
                    gflop=gflop,
                    rate=gflop * FLAGS.iterations / run,
                )
            )
            print(rows[-1], flush=True)
    single = {r["impl"]: r["agg"] for r in rows if r["n"] == 1}
    best_single = max(single.values())

    lines = [
        f"Gradient inversion speed, {FLAGS.model} 32x32x3, B = 1, {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind})",
        "",
    ] + results.markdown_table(
        [
            "conv",
            "attacks",
            "it/s per attack",
            "aggregate it/s",
            "vs sequential (same conv)",
            "vs best single",
            "GFLOP/it",
            "GFLOP/s",
            "compile s",
            "peak MB",
        ],
        [
            [
                r["impl"],
                r["n"],
                f"{r['its']:.2f}",
                f"{r['agg']:.2f}",
                f"{r['agg'] / single[r['impl']]:.2f}x",
                f"{r['agg'] / best_single:.2f}x",
                f"{r['gflop']:.2f}",
                f"{r['rate']:.0f}",
                f"{r['compile']:.1f}",
                f"{r['mem']:.0f}",
            ]
            for r in rows
        ],
    )
    lines += ["", f"Dense fp32 matmul peak, 2048x2048: {_matmul_gflops():.0f} GFLOP/s."]

    results.write_table("\n".join(lines), FLAGS.out)


if __name__ == "__main__":
    app.run(main)
