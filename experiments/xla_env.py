"""The one place entry points ask for simulated CPU devices; it must run before JAX is first imported."""

from __future__ import annotations

import os
import sys

# Simulated devices share the host's cores, so one device of a heavy collective step can reach the all-reduce
# long after the others: on 2 cores a ResNet-18 step on 8 devices, or any step while another process holds the
# cores, can overrun XLA's default 40 s. A stuck collective still ends, after 10 minutes. Some of the aborts
# seen at 40 s were deadlocks, not slowness (6-7 of 8 devices waiting, the host idle): work queued ahead of the
# step. `train._run_steps` keeps one step in flight and `train.unreplicate` reads one shard, which ended them.
CPU_COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds=600"


_DEFAULT_COUNT: int | None = None  # the count `simulate_cpu_devices` chose (None: the caller's XLA_FLAGS did)


def simulate_cpu_devices(n: int = 8) -> None:
    """Asks XLA for `n` host (CPU) devices unless JAX is already loaded or the caller chose a count.

    Data-parallel steps need one device per worker; on a CPU-only machine
    XLA simulates them. Also raises the CPU collectives' timeout
    (`CPU_COLLECTIVE_TIMEOUT`) unless the caller set it. No effect on GPUs
    or TPUs.
    """
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={n}"
        global _DEFAULT_COUNT
        _DEFAULT_COUNT = n
    if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
        flags = f"{flags} {CPU_COLLECTIVE_TIMEOUT}"
    os.environ["XLA_FLAGS"] = flags.strip()


def narrow_cpu_devices(n: int) -> bool:
    """Replaces `simulate_cpu_devices`' default count by `n` while it is still open; True if it did.

    Open means: the default came from `simulate_cpu_devices` (a count in the
    caller's XLA_FLAGS is kept) and JAX has not started its backends yet
    (``jax_num_cpu_devices`` is read once, when the CPU client is made; it
    overrides the XLA flag). Why fewer: simulated devices share the host's
    cores, and on 2 cores the ResNet-18 speed job took 5% longer in a
    process with 8 of them than with the 4 its round needs (README,
    Benchmarks).
    """
    import jax

    if _DEFAULT_COUNT is None or n == _DEFAULT_COUNT:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already started (e.g. a test process): keep the count they have
        return False
    return True
