"""Simulated CPU devices: the preamble every program and the tests run before JAX is first imported.

A data-parallel round needs one device per worker. On a CPU-only machine XLA
simulates them when ``XLA_FLAGS`` asks for a count, and it reads that
variable once, when JAX starts. So an entry point asks here first, before it
(or any module it imports) imports JAX::

    from trustsgd_jax import devices

    devices.simulate_cpu_devices(8)

    import jax  # noqa: E402

This module must therefore never import JAX at import time (nor may
``trustsgd_jax/__init__.py``); `narrow_cpu_devices` imports it when called,
after the program has chosen its count. On GPUs and TPUs none of this has an
effect.
"""

from __future__ import annotations

import os
import re
import sys

# Simulated devices share the host's cores, so one device of a heavy collective step can reach the all-reduce
# long after the others: on 2 cores a ResNet-18 step on 8 devices, or any step while another process holds the
# cores, can overrun XLA's default 40 s. A stuck collective still ends, after 10 minutes. Some of the aborts
# seen at 40 s were deadlocks, not slowness (6-7 of 8 devices waiting, the host idle): work queued ahead of the
# step. `train.fit`'s step loop keeps one step in flight and `train.unreplicate` reads one shard, which ended them.
CPU_COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds=600"

COUNT_FLAG = "--xla_force_host_platform_device_count"

_default_count: int | None = None  # the count `simulate_cpu_devices` chose (None: the caller's XLA_FLAGS did)


def simulate_cpu_devices(n: int = 8, force: bool = False) -> None:
    """Asks XLA for `n` host (CPU) devices unless JAX is already loaded or the caller chose a count.

    ``force=True`` replaces a count in the caller's ``XLA_FLAGS`` too, and
    sets it even if JAX is imported (its backends read the flags when they
    start): the tests, which all expect `n`. Also raises the CPU collectives' timeout
    (`CPU_COLLECTIVE_TIMEOUT`) unless the caller set it.
    """
    global _default_count
    if "jax" in sys.modules and not force:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if force:
        flags = re.sub(rf"{COUNT_FLAG}=\S*", "", flags)
    if COUNT_FLAG.lstrip("-") not in flags:
        flags = f"{flags} {COUNT_FLAG}={n}"
        _default_count = None if force else n
    if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
        flags = f"{flags} {CPU_COLLECTIVE_TIMEOUT}"
    os.environ["XLA_FLAGS"] = " ".join(flags.split())


def narrow_cpu_devices(n: int) -> bool:
    """Replaces `simulate_cpu_devices`' default count by `n` while it is still open; True if it did.

    Open means: the default came from `simulate_cpu_devices` (a count in the
    caller's XLA_FLAGS, or a forced one, is kept) and JAX has not started its
    backends yet (``jax_num_cpu_devices`` is read once, when the CPU client is
    made; it overrides the XLA flag). Why fewer: simulated devices share the
    host's cores, and on 2 cores the ResNet-18 speed job took 5% longer in a
    process with 8 of them than with the 4 its round needs (README,
    Benchmarks).
    """
    import jax  # noqa: PLC0415 (here, not at the top: the module must not import JAX before the count is set)

    if _default_count is None or n == _default_count:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already started (e.g. a test process): keep the count they have
        return False
    return True
