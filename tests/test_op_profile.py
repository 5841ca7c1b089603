"""The per-operation profile of the benchmarks: names to kinds, and a traced call's time split."""

import jax
import jax.numpy as jnp

from benchmarks import op_profile


def test_op_kind_names_the_kinds_xla_cpu_uses():
    assert op_profile.op_kind("ynn_fusion.194") == "matmul"
    assert op_profile.op_kind("dot.3") == "matmul"
    assert op_profile.op_kind("dot_general") == "matmul"
    assert op_profile.op_kind("convert_fusion.2") == "elementwise"  # 'conv' is a matmul, 'convert' is not
    assert op_profile.op_kind("geqrf.24") == "linear algebra"
    assert op_profile.op_kind("pad_slice_fusion.1") == "data movement"
    assert op_profile.op_kind("wrapped_broadcast") == "data movement"
    assert op_profile.op_kind("concatenate.7") == "data movement"
    assert op_profile.op_kind("bitcast_select_fusion.8") == "elementwise"  # a select computes
    assert op_profile.op_kind("wrapped_scatter.1") == "scatter/gather"
    assert op_profile.op_kind("sort.2") == "sort"
    assert op_profile.op_kind("all-reduce.1") == "collective"
    assert op_profile.op_kind("psum.308") == "collective"  # jax.lax.psum's all-reduce, as XLA:CPU's trace names it
    assert op_profile.op_kind("psum_scatter.1") == "collective"
    assert op_profile.op_kind("all_gather.2") == "collective"
    assert set(op_profile.KINDS) >= {op_profile.op_kind(n) for n in ("x", "add.1", "reduce.3")}


def test_op_profile_times_the_matmul_of_a_traced_call():
    a = jax.random.normal(jax.random.key(0), (512, 512))
    f = jax.jit(lambda a: jnp.tanh(a @ a) + 1.0)
    jax.block_until_ready(f(a))
    prof = op_profile.op_profile(f, a)
    assert prof.wall_s > 0 and prof.threads >= 1
    assert prof.by_kind.get("matmul", 0.0) > 0.0
    assert abs(prof.thread_s - sum(prof.by_op.values())) < 1e-9
    assert not any(name.startswith("$") for name in prof.by_op)  # the caller's Python frames are not operations
    assert prof.thread_s < 2 * prof.wall_s * prof.threads  # threads' busy time, each counted once
    line = op_profile.summary(prof, per=2, unit="half")
    assert "per half" in line and "matmul" in line
