r"""Speed of the gradient-inversion attack: iterations per second per attacker, width, matmul dtype and devices.

    python -m benchmarks.bench_gradinv                      # ResNet-18, 32x32x3, B = 1: the README's table
    python -m benchmarks.bench_gradinv --model=convnet --iterations=200
    python -m benchmarks.bench_gradinv --attackers=none/observed --widths=1 --dtypes=float32 --devices=1

Rows (all in one run, on this machine):

* every attacker of `attacks.objectives` on its compressor's message (SGD,
  PowerSGD rank 1, Top-K level 1; a one-worker eval-mode round: the attack's
  cost does not depend on the round), one attack at a time, in fp32; the
  first attacker also in bf16 (`invert.attack_model(..., matmul_dtype="bfloat16")`);
* N attacks batched in one program (``--widths``), aggregate it/s;
* `strongest`'s candidates side by side in one program (``--together``:
  every applicable objective of the compressor's message, one attack each,
  as `invert.invert_gradients` runs them), aggregate it/s, against the
  same objectives timed one program each above;
* the same batch spread over 2 local devices (a subprocess started with
  ``--xla_force_host_platform_device_count=2``, `invert.AttackConfig.devices`);
* a PyTorch eager Geiping loop on the same model shape (cosine + TV, Adam on
  the signed gradient, double backward; `benchmarks.torch_reference`) when
  ``torch`` is importable: the reference the speed target is set against
  (torch is not a dependency).

"GFLOP/it" is XLA's cost analysis of one iteration of all attacks in the
row, "GFLOP/s" the rate achieved, to set against the dense-matmul peaks
printed below the table (fp32, and bf16 inputs with fp32 accumulation);
"GB/it" the bytes its fused operations read and write by the same count,
"GB/s" their rate, to set against the memory bandwidth of elementwise
passes, printed there too. A profile line splits one fp32 observed
iteration into the model's forward and backward (the dummy gradient), the
second backward through it, and the rest;
with ``--op_profile`` each fp32 one-device row is traced once more and split
per kind of XLA operation (matmuls, elementwise, data movement, ...,
`benchmarks.op_profile`), with how busy the threads were.
Each figure times the second call of a compiled function, never the first:
every row is compiled first, then ``--rounds`` rounds each time one chunk of
every row in turn (`time_rows`), and a row's it/s is its median over rounds.
"""

from __future__ import annotations

import sys

from trustsgd_jax.devices import simulate_cpu_devices

if __name__ == "__main__":
    # The device count is fixed when JAX starts: the 2-device rows come from a subprocess given --simulated_devices=2.
    simulate_cpu_devices(int(next((a.split("=")[1] for a in sys.argv if a.startswith("--simulated_devices=")), 1)))

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import op_profile, timing, torch_reference  # noqa: E402
from trustsgd_jax import compress, data, models, results  # noqa: E402
from trustsgd_jax.attacks import invert, objectives, victim  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet18", "convnet | resnet18")
flags.DEFINE_integer("iterations", 40, "timed attack iterations per row and round (after compiling)")
flags.DEFINE_integer("rounds", 3, "timing rounds: each times every row once, in turn (time_rows)")
flags.DEFINE_list(
    "attackers",
    [
        "none/observed",
        "powersgd:1/observed",
        "powersgd:1/factors",
        "powersgd:1/factors_residual",
        "topk_level:1/observed",
        "topk_level:1/sent_coordinates",
        "topk_level:1/cosine_support",
    ],
    "compressor/objective pairs timed one attack at a time",
)
flags.DEFINE_list("widths", ["4", "8"], "batched widths, timed for the first attacker")
flags.DEFINE_list(
    "together",
    ["powersgd:1", "topk_level:1"],
    "compressors whose strongest candidates are also timed side by side in one program (invert.compile_attack)",
)
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "matmul dtypes (invert.MATMUL_DTYPES)")
flags.DEFINE_list("devices", ["1", "2"], "local device counts for the batched rows (2: in a subprocess)")
flags.DEFINE_integer("simulated_devices", 1, "simulated CPU devices of this process (set for the subprocess)")
flags.DEFINE_bool(
    "dense_targets_row",
    True,
    "time the first attacker also with dense deep-layer targets (objectives.dense_target_ranks)",
)
flags.DEFINE_bool(
    "op_profile",
    True,
    "trace one more chunk of each fp32 one-device row: time per kind of XLA operation (benchmarks.op_profile)",
)
flags.DEFINE_bool("torch", True, "time a PyTorch eager Geiping loop when torch is importable")
flags.DEFINE_bool("json_rows", False, "print the rows as JSON only (the subprocess's output)")
flags.DEFINE_string("out", None, "also write the table to this Markdown file")


def _peak_mb():
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(f, *args, repeats: int = 1) -> float:
    """Seconds of one call of `f`, compiled beforehand: the second call, never the first."""
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def _matmul_gflops(dtype, n: int = 2048) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    return 2 * n**3 / _timed(mm, a, a, repeats=10) / 1e9


def _stream_gbs(n: int = 2**26, passes: int = 8) -> float:
    """Memory bandwidth XLA's elementwise loops reach here: GB/s read and written by x <- 1.0001 x + 1 over n fp32.

    The passes run inside one program, as an attack chunk's iterations do: a program per pass would also time
    the kernel's page faults on each call's fresh 256 MB output (3 GB/s against 20 in one program, measured here
    on 2026-12-03).
    """
    a = jnp.ones((n,), jnp.float32)
    axpy = jax.jit(lambda a: jax.lax.fori_loop(0, passes, lambda _, a: a * 1.0001 + 1.0, a))
    return passes * 2 * 4 * n / _timed(axpy, a, repeats=2) / 1e9


def _setting():
    ds = data.load("cifar10")
    model = models.make_model(FLAGS.model, 10, norm="batch")
    variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
    x = data.normalize(ds.x_train[:8], "cifar10")
    y = ds.y_train[:8].astype(np.int32)
    return ds, model, variables, x, y


def _messages(model, variables, x, y, spec):
    c = compress.from_spec(spec, variables["params"])
    round_ = victim.make_round(model, c, workers=1, bn_statistics="eval")
    return [round_(variables, x[None, i : i + 1], y[None, i : i + 1]).message for i in range(len(x))]


def build_attack(model, variables, msgs, y, objective, dtype, width, devices, thin_targets=True) -> dict:
    """One row, compiled and called once: `width` attacks with `objective` on `devices` local devices.

    A tuple of objectives runs one attack per objective side by side in one
    program (`invert.compile_attack`): the row's attacks are width x lanes.
    Returns the row's fields and ``run``, one timed call (a chunk of
    ``--iterations``); `time_rows` times the rows.

    ``thin_targets``: dense deep-layer targets as U V^T at their measured rank, as `invert.invert_gradients`
    holds them (`objectives.dense_target_ranks`); False times the dense targets, for comparison.
    """
    cfg = invert.AttackConfig(
        iterations=10**6, chunk=FLAGS.iterations, parallel=width, matmul_dtype=dtype, devices=devices
    )
    attacker = invert.attack_model(model, dtype)
    batch = [msgs[i % len(msgs)] for i in range(width)]
    names = (objective,) if isinstance(objective, str) else tuple(objective)
    ranks = None
    if any(objectives.takes_thin_targets(name) for name in names):
        ranks = objectives.dense_target_ranks(attacker, variables, batch, (1, 32, 32, 3), False)
    attack = invert.compile_attack(
        attacker,
        variables,
        objective,
        cfg,
        "cifar10",
        (32, 32, 3),
        train=False,
        width=width,
        target_ranks=ranks if thin_targets else None,
    )
    msg = jax.tree.map(lambda *a: jnp.stack(a), *batch)
    ys = jnp.asarray(np.resize(y, width)[:, None])
    x0 = jax.random.normal(jax.random.key(1), (width, 1, 32, 32, 3))
    # One start per lane where the row runs several objectives in one program (the same start in each).
    xs = tuple(x0 for _ in names) if len(names) > 1 or not isinstance(objective, str) else x0
    st = attack.init(xs)

    def run():
        jax.block_until_ready(attack.run_chunk(xs, st, msg, ys, FLAGS.iterations))

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    profile = None
    if FLAGS.op_profile and devices == 1 and dtype == "float32":
        traced = op_profile.op_profile(attack.run_chunk, xs, st, msg, ys, FLAGS.iterations)
        profile = op_profile.summary(traced, per=FLAGS.iterations * width * len(names), unit="attack-iteration")
    gflop = gbytes = None
    if devices == 1:
        one_iteration = jax.jit(lambda xs, st, msg, ys: attack.run_chunk(xs, st, msg, ys, 1))
        cost = one_iteration.lower(xs, st, msg, ys).compile().cost_analysis()
        if cost:  # None where the backend has no cost analysis: the row shows none
            gflop, gbytes = cost["flops"] / 1e9, cost["bytes accessed"] / 1e9
    if not isinstance(objective, str):
        label = " + ".join(names) + " (one program)"
    elif not thin_targets and ranks and any(ranks):  # labelled apart only where some target would have been thin
        label = f"{objective} (dense targets)"
    else:
        label = objective
    return dict(
        objective=label,
        dtype=dtype,
        width=width * len(names),
        devices=devices,
        first=first,
        gflop=gflop,
        gbytes=gbytes,
        mem=_peak_mb(),
        profile=profile,
        run=run,
    )


def time_rows(built: list[dict], rounds: int) -> list[dict]:
    """Times built rows interleaved (`timing.interleaved`): a row's it/s is its median over rounds.

    ``times`` keeps every round's seconds, so that two rows compare round by
    round (`_ratio`); ``compile`` is the first call less the median one.
    """
    times = timing.interleaved([b["run"] for b in built], rounds)
    rows = []
    for b, t in zip(built, times, strict=True):
        median = float(np.median(t))
        row = {k: v for k, v in b.items() if k not in ("run", "first")}
        rows.append(
            dict(
                row,
                its=FLAGS.iterations / median,
                agg=b["width"] * FLAGS.iterations / median,
                compile=b["first"] - median,
                times=t,
            )
        )
    return rows


def _ratio(row: dict, base: dict) -> float:
    """Aggregate it/s of `row` over `base`'s: per round where both were timed in the same rounds
    (`timing.paired_ratio`), else the ratio of their medians (rows from another process)."""
    a, b = row.get("times"), base.get("times")
    if a and b and len(a) == len(b):
        return row["width"] / base["width"] * timing.paired_ratio(b, a)
    return row["agg"] / base["agg"]


def profile_line(model, variables, msgs, y) -> str:
    """Where one fp32 observed iteration goes: the dummy gradient, its second backward, the rest (timed apart)."""
    attacker = invert.attack_model(model)
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
    yy = jnp.asarray(y[:1])
    weights = [1.0] * len(jax.tree.leaves(variables["params"]))
    ranks = objectives.dense_target_ranks(attacker, variables, msgs[:1], (1, 32, 32, 3), False)
    matching = objectives.matching_loss(attacker, variables, "observed", weights, False, ranks)
    target = jax.jit(matching.prepare)(msgs[0])
    grads = jax.jit(lambda x: objectives.factored_param_grads(attacker, variables, x, yy))
    loss = jax.jit(lambda x: matching.loss(x, msgs[0], target, yy))
    full = jax.jit(jax.grad(lambda x: matching.loss(x, msgs[0], target, yy)))
    t_grads, t_loss, t_full = (_timed(f, x, repeats=5) for f in (grads, loss, full))
    return (
        f"Profile of one fp32 observed iteration ({1 / t_full:.1f} it/s for the loss and its input gradient): "
        f"the dummy gradient (forward + backward, kernels factored) {1000 * t_grads:.0f} ms; "
        f"the matching loss on top of it {1000 * (t_loss - t_grads):.0f} ms; "
        f"the second backward through both {1000 * (t_full - t_loss):.0f} ms."
    )


def device_rows() -> list[dict]:
    """The batched rows of the first attacker on 2 local devices, from a subprocess that simulates them."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_gradinv",
        "--simulated_devices=2",
        "--json_rows",
        "--torch=false",
        f"--model={FLAGS.model}",
        f"--iterations={FLAGS.iterations}",
        f"--rounds={FLAGS.rounds}",
        f"--attackers={FLAGS.attackers[0]}",
        f"--widths={','.join(FLAGS.widths)}",
        "--dtypes=float32",
        "--devices=2",
    ]
    # This process asked XLA for one device through XLA_FLAGS; the child must not inherit that count.
    flags_ = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = dict(os.environ, XLA_FLAGS=f"{flags_} --xla_force_host_platform_device_count=2".strip())
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [{k: v for k, v in r.items() if k != "times"} for r in rows]  # another process's rounds: not paired


def build_all(model, variables, x, y, by_spec: dict) -> list[dict]:
    """Every row this process times (`build_attack`), compiled: each attacker alone (fp32, and the first in every
    dtype), the first attacker batched at each width and device count, and `strongest`'s candidates together."""
    here = len(jax.local_devices())
    first_spec, first_objective = FLAGS.attackers[0].split("/")
    built: list[dict] = []

    def build(spec, *args, **kw):
        built.append(dict(build_attack(model, variables, *args, **kw), spec=spec))
        print(f"built {spec} / {built[-1]['objective']} ({built[-1]['width']} attacks)", file=sys.stderr, flush=True)

    if not FLAGS.json_rows or here == 1:
        for dtype in FLAGS.dtypes:
            # Every attacker in fp32; bf16 for the first one (its effect on speed is the same kind everywhere).
            for pair in FLAGS.attackers if dtype == "float32" else FLAGS.attackers[:1]:
                spec, objective = pair.split("/")
                build(spec, by_spec[spec], y, objective, dtype, 1, 1)
                if pair == FLAGS.attackers[0] and dtype == "float32" and FLAGS.dense_targets_row:
                    build(spec, by_spec[spec], y, objective, dtype, 1, 1, thin_targets=False)
                    if built[-1]["objective"] == objective:  # no thin deep-layer target to compare on this message
                        built.pop()
    for dtype in FLAGS.dtypes:
        for width in (int(w) for w in FLAGS.widths):
            devices = [d for d in (int(d) for d in FLAGS.devices) if d <= here]
            for d in devices:
                if width % d:
                    continue
                build(first_spec, by_spec[first_spec], y, first_objective, dtype, width, d)
    if not FLAGS.json_rows:
        for spec in FLAGS.together:
            msgs = by_spec.setdefault(spec, _messages(model, variables, x, y, spec))
            names = tuple(objectives.applicable_objectives(msgs[0]))
            build(spec, msgs, y, names, "float32", 1, 1)
            built[-1]["lanes"] = names
    return built


def main(argv):
    del argv
    _, model, variables, x, y = _setting()
    by_spec: dict = {}
    for pair in FLAGS.attackers:
        spec, _ = pair.split("/")
        by_spec.setdefault(spec, _messages(model, variables, x, y, spec))
    rows = time_rows(build_all(model, variables, x, y, by_spec), FLAGS.rounds)
    for row in rows:
        print(json.dumps(row), flush=True)
    if FLAGS.json_rows:
        return
    if "2" in FLAGS.devices and len(jax.local_devices()) == 1:
        rows += device_rows()
    notes = []
    if FLAGS.torch:
        reference, note = torch_reference.torch_row(FLAGS.model, x[:1], y[:1], FLAGS.iterations)
        notes.append(note)
        if reference is not None:
            rows.append(dict(reference, spec="none"))
    first_spec, first_objective = FLAGS.attackers[0].split("/")
    peak32, peak16, stream = _matmul_gflops(jnp.float32), _matmul_gflops(jnp.bfloat16), _stream_gbs()
    lines = [
        f"Gradient inversion speed, {FLAGS.model} 32x32x3, B = 1, {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}), {FLAGS.iterations} timed iterations per row and round, "
        f"{FLAGS.rounds} rounds (median; × observed: median of the per-round ratios)",
        "",
        *speed_table(rows),
        "",
        f"Dense 2048x2048 matmul peak: fp32 {peak32:.0f} GFLOP/s; bf16 inputs, fp32 accumulation {peak16:.0f} GFLOP/s. "
        "Memory bandwidth of elementwise passes (x <- a x + b over 256 MB, read and written, 8 passes in one "
        f"program): {stream:.1f} GB/s. "
        "GB/it is XLA's count of bytes its operations read and write per iteration (cost analysis, after fusion; "
        "it counts cached reads too, so GB/it over that bandwidth is a rough floor, not a bound).",
        profile_line(model, variables, by_spec[first_spec], y) if first_objective == "observed" else "",
        *notes,
        *together_lines(rows),
    ]
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += ["", "Where an iteration goes, per kind of XLA operation (thread time, benchmarks.op_profile):"]
        lines += [f"* {r['spec']} / {r['objective']}, {r['width']} attack(s): {r['profile']}" for r in profiled]
    results.write_table("\n".join(line for line in lines if line is not None), FLAGS.out)


def speed_table(rows: list[dict]) -> list[str]:
    """The Markdown table of the timed rows: it/s against the observed attacker's and PyTorch's, FLOPs, bytes."""
    single: dict = {}
    for r in rows:
        if r["objective"] == "observed" and r["width"] == 1 and r["devices"] == 1:
            single.setdefault((r["spec"], r["dtype"]), r)
    reference = next((r["its"] for r in rows if "PyTorch" in r["objective"]), None)

    def cell(r, key, fmt):
        return "–" if r.get(key) is None else format(r[key], fmt)

    return results.markdown_table(
        [
            "message",
            "attacker",
            "matmuls",
            "attacks",
            "devices",
            "it/s per attack",
            "aggregate it/s",
            "× observed (same message, dtype)",
            "× PyTorch eager",
            "GFLOP/it",
            "GFLOP/s",
            "GB/it",
            "GB/s",
            "compile s",
            "peak MB",
        ],
        [
            [
                r["spec"],
                r["objective"],
                r["dtype"],
                r["width"],
                r["devices"],
                f"{r['its']:.2f}",
                f"{r['agg']:.2f}",
                f"{_ratio(r, single[r['spec'], r['dtype']]):.2f}x" if (r["spec"], r["dtype"]) in single else "–",
                f"{r['agg'] / reference:.2f}x" if reference else "–",
                cell(r, "gflop", ".2f"),
                "–" if r.get("gflop") is None else f"{r['gflop'] * r['agg'] / r['width']:.0f}",
                cell(r, "gbytes", ".2f"),
                "–" if r.get("gbytes") is None else f"{r['gbytes'] * r['agg'] / r['width']:.0f}",
                cell(r, "compile", ".1f"),
                cell(r, "mem", ".0f"),
            ]
            for r in rows
        ],
    )


def together_lines(rows: list[dict]) -> list[str]:
    """For each row of `strongest`'s candidates in one program: its time per iteration against one program each."""
    lines = []
    for r in rows:
        if r.get("lanes"):
            alone = {o["objective"]: o["its"] for o in rows if o["spec"] == r["spec"] and o["width"] == 1}
            if all(name in alone for name in r["lanes"]):
                # Seconds per iteration of every lane, one program each (their rows above) over the same in one program.
                separate = sum(1 / alone[name] for name in r["lanes"])
                lines.append(
                    f"{r['spec']}: its {len(r['lanes'])} strongest candidates in one program take "
                    f"{1000 / r['its']:.0f} ms per iteration of all of them, one program each "
                    f"{1000 * separate:.0f} ms: {separate * r['its']:.2f}x."
                )
    return lines


if __name__ == "__main__":
    app.run(main)
