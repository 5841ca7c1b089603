"""In-run checkpoints of an attack (AttackConfig.checkpoints): one long run gives the budget curve exactly."""

import jax
import numpy as np
import pytest

from trustsgd_jax import compress, data, models
from trustsgd_jax.attacks import audit


@pytest.fixture(scope="module")
def victim():
    ds = data.load("cifar10", "sample")
    model = models.make_model("convnet", ds.num_classes, width=8)
    variables = models.init_variables(model, jax.random.key(0), ds.image_shape)
    x, y = data.normalize(ds.x_train[:1], "cifar10"), ds.y_train[:1]
    return model, variables, x, y


def run(victim, spec, **config):
    model, variables, x, y = victim
    c = compress.from_spec(spec, variables["params"])
    cfg = audit.AttackConfig(chunk=10, **config)
    return audit.audit(
        model,
        variables,
        x,
        y,
        c,
        dataset="cifar10",
        threat="strongest",
        workers=1,
        bn_statistics="eval",
        config=cfg,
        progress=False,
    )


@pytest.mark.parametrize("spec", ["none", "powersgd:1"])
def test_checkpoint_equals_a_run_stopped_there(victim, spec):
    """SSIM at iteration 20 of a 40-iteration run = the run of 20 iterations on the same schedule and seed."""
    long = run(victim, spec, iterations=40, checkpoints=(20,))
    stopped = run(victim, spec, iterations=20, schedule_iterations=40)
    np.testing.assert_array_equal(long.checkpoints[20]["ssim"], stopped.per_image["ssim"])
    assert long.checkpoints[20]["chosen"] == stopped.chosen
    for name, values in stopped.candidate_ssim.items():
        np.testing.assert_array_equal(long.checkpoints[20]["candidate_ssim"][name], values)
    plain = run(victim, spec, iterations=40)  # keeping checkpoints changes nothing at the end
    np.testing.assert_array_equal(long.per_image["ssim"], plain.per_image["ssim"])
    assert plain.checkpoints == {}


def test_bad_checkpoints_are_one_line_errors(victim):
    with pytest.raises(audit.AttackError, match="checkpoints"):
        run(victim, "none", iterations=20, checkpoints=(20,))
    with pytest.raises(audit.AttackError, match="schedule_iterations"):
        run(victim, "none", iterations=20, schedule_iterations=10)
