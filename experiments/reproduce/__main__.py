"""`python -m experiments.reproduce`: simulated CPU devices first (before JAX starts), then absl runs `main.main`."""

import sys

import experiments.reproduce
from experiments.reproduce.presets import MIA_CPU_DEVICES
from trustsgd_jax import devices

# The most a run needs (membership inference trains over every device); `main.run` narrows it to the Config's
# --cpu_devices while JAX has not started its backends.
devices.simulate_cpu_devices(MIA_CPU_DEVICES)

from absl import app, flags  # noqa: E402

from experiments.reproduce import config  # noqa: E402
from experiments.reproduce.main import main  # noqa: E402

__doc__ = experiments.reproduce.__doc__  # absl's usage text
flags.adopt_module_key_flags(config)  # --helpshort lists the run's flags

try:
    app.run(main)
except config.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
