"""Eight simulated CPU devices for every test: set before JAX is first imported."""

import gc
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.local_device_count() == 8, "tests expect 8 simulated CPU devices (XLA_FLAGS set too late?)"


@pytest.fixture(scope="module", autouse=True)
def _fresh_compilation_caches():
    """Drops each test module's compiled programs when it ends.

    One process runs the whole suite; without this every module's
    executables stay alive to the end (several GB by the last modules).
    """
    yield
    jax.clear_caches()
    gc.collect()
