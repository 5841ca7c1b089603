"""The one place entry points ask for simulated CPU devices; it must run before JAX is first imported."""

from __future__ import annotations

import os
import sys


def simulate_cpu_devices(n: int = 8) -> None:
    """Asks XLA for `n` host (CPU) devices unless JAX is already loaded or the caller chose a count.

    Data-parallel steps need one device per worker; on a CPU-only machine
    XLA simulates them. No effect on GPUs or TPUs.
    """
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
