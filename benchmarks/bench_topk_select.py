r"""Ways to pick Top-K's entries on this machine: is there one faster than ``lax.top_k`` that sends the same ones?

    python -m benchmarks.bench_topk_select                 # ResNet-18's tensors, Top-K level 4, one device
    python -m benchmarks.bench_topk_select --level=1 --rounds=7

Issue 13 asks for a Top-K step within 1.20x of the uncompressed one, and the
selection is most of Top-K's overhead (README, ``bench_compress``). Each
candidate below picks, per tensor of ResNet-18, the k entries of largest
magnitude (`compress.topk_level_k`) of a normal random gradient, all tensors
in one program; the program prints, per candidate, whether it picked the same
set as ``lax.top_k`` and its milliseconds, timed interleaved
(`benchmarks.timing`), second calls only:

* ``lax.top_k``: what `compress.topk` uses (``selection="exact"``);
* ``lax.approx_max_k`` at ``recall_target=1.0`` (``selection="approx_max_k"``);
* two stages: ``top_k`` of each of 16 rows, then of their 16 k candidates;
* threshold first: the k-th largest magnitude of a strided 1/16 sample, with a
  margin, gives a threshold above which at least k and at most a cap of
  entries lie (checked; else the full ``top_k``); those are compacted
  (``jnp.nonzero``) and ``top_k`` picks among them: the same set by
  construction, one pass over the tensor plus the compaction.

The last two (`benchmarks.topk_selections`) are exact (same set, ties to
the lowest index) but are not in the package: neither was faster here
(README).
"""

from __future__ import annotations

from trustsgd_jax.devices import simulate_cpu_devices

if __name__ == "__main__":
    simulate_cpu_devices(1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import timing  # noqa: E402
from benchmarks.topk_selections import CASES  # noqa: E402
from trustsgd_jax import compress, models, results  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet18", "convnet | resnet18")
flags.DEFINE_integer("level", 4, "Top-K level (as many words as PowerSGD of this rank)")
flags.DEFINE_integer("rounds", 5, "interleaved timing rounds")
flags.DEFINE_integer("calls", 3, "calls per case and round")


def main(argv):
    del argv
    model = models.make_model(FLAGS.model, 10, norm="batch")
    params = models.init_variables(model, jax.random.key(0), (32, 32, 3))["params"]
    shapes = [p.shape for p in jax.tree.leaves(params)]
    grads = [jax.random.normal(jax.random.key(i), s).reshape(-1) for i, s in enumerate(shapes)]
    ks = compress.topk_level_k(shapes, FLAGS.level)
    programs, picked = [], []
    for pick in CASES.values():
        program = jax.jit(lambda gs, pick=pick: [pick(jnp.abs(g), k) for g, k in zip(gs, ks, strict=True)])
        picked.append([set(np.asarray(i).tolist()) for i in program(grads)])
        programs.append(program)

    def call(program):
        def run():
            for _ in range(FLAGS.calls):
                out = program(grads)
            jax.block_until_ready(out)

        return run

    times = timing.interleaved([call(p) for p in programs], FLAGS.rounds)
    base = times[0]
    rows = [
        [
            name,
            "yes" if sets == picked[0] else "no",
            f"{1000 * float(np.median(t)) / FLAGS.calls:.1f}",
            f"{timing.paired_ratio(t, base):.2f}x",
        ]
        for name, sets, t in zip(CASES, picked, times, strict=True)
    ]
    lines = [
        f"Top-K selection, {FLAGS.model}'s {len(shapes)} tensors ({sum(g.size for g in grads):,} entries), level "
        f"{FLAGS.level} (k = {sum(ks):,} in all), one CPU device, {FLAGS.rounds} interleaved rounds of "
        f"{FLAGS.calls} calls (median)",
        "",
        *results.markdown_table(["selection", "same entries as lax.top_k", "ms", "× lax.top_k time"], rows),
    ]
    results.write_table("\n".join(lines), None)


if __name__ == "__main__":
    app.run(main)
