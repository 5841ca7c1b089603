"""Eight simulated CPU devices for every test, and one compilation cache per run: set before JAX is imported."""

import atexit
import gc
import os
import shutil
import tempfile

from trustsgd_jax import devices  # imports no JAX

devices.simulate_cpu_devices(8, force=True)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX's persistent compilation cache, fresh for every run of the suite (so every program is compiled for real
# once) and shared with the subprocesses the tests start: the end-to-end tests run the same small programs in
# many processes, and compiling them again was most of their time (a tiny reproduce run: 62 s -> 15 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="trustsgd-jax-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.local_device_count() == 8, "tests expect 8 simulated CPU devices (XLA_FLAGS set too late?)"


@pytest.fixture(scope="module", autouse=True)
def _fresh_compilation_caches():
    """Drops each test module's compiled programs when it ends.

    One process runs many modules (the whole suite, or with pytest-xdist
    half of it); without this every module's executables stay alive to the
    end (several GB by the last modules).
    """
    yield
    jax.clear_caches()
    gc.collect()
