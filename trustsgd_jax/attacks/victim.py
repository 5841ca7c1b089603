"""The message one worker really sends: a real N-worker round of the project's own training step.

The attacked message is never re-derived from the victim's gradient. It is
the output of `train.make_step(..., return_message=True)`, run data-parallel
on N local devices (``pmap``), each worker with its own batch of B images;
the victim is worker 0. What an observer sees of that round:

* ``worker``: worker 0's own message, as a parameter server or a tap on its
  link sees it. Per tensor: PowerSGD's P_0 and Q_0 plus the public P_hat
  (orthonormalised from the sum of *all* workers' P) and Q_prev; Top-K's
  values and indices; a quantiser's codes; dense tensors in full. With
  synchronised BatchNorm in train mode, also that BatchNorm's uncompressed
  traffic on the same link (``bn``, `train.make_step`): worker 0's batch
  mean and mean of squares, their all-reduce, and both sides of the
  backward all-reduce of their cotangents.
* ``aggregate``: what every worker receives, the averaged update
  (1/N) sum_w decompress(msg_w), as one dense message. Nothing of worker 0 is
  separable in it; the attacker matches the mixture.
* ``peer``: the aggregate as a curious worker N-1 sees it, knowing its own
  contribution: N x update - decompress(msg_{N-1}), the sum of the other
  workers' contributions (with two workers, exactly worker 0's).

BatchNorm, as training runs it (``bn_statistics``):

* ``train``: exactly as the step computes it, with batch statistics: the
  real message of data-parallel training.
* ``eval``: the gradient computed with the running averages, Geiping et
  al.'s setting and the one the literature's numbers use (a server that
  dictates the buffers).

and its synchronisation (``batchnorm``): ``sync`` (statistics all-reduced
over the workers: an uncompressed channel, counted and observed) or
``local`` (PyTorch DDP's default: each worker normalises by its own batch;
no statistics on the wire). DDP broadcasts worker 0's running buffers every
step, so at step t every worker of the attacked round starts from worker 0's
buffers here too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trustsgd_jax import compress as compress_lib
from trustsgd_jax import models as models_lib
from trustsgd_jax import train as train_lib
from trustsgd_jax.attacks.errors import AttackError

OBSERVERS = ("worker", "aggregate", "peer")
BATCHNORM = ("sync", "local")
BN_STATISTICS = train_lib.BN_STATISTICS


class Observation(NamedTuple):
    """What one observer saw of one round (see the module docstring)."""

    message: Any  # per-parameter messages (compress message types), one worker's or the aggregate
    bn: Any  # worker 0's synchronised-BatchNorm traffic (train.bn_traffic; {} where none travels)
    wire: compress_lib.WireCost  # what worker 0's gradient message cost on the wire, whatever the observer


def check_setting(observer: str, bn_statistics: str, batchnorm: str) -> None:
    if observer not in OBSERVERS:
        raise AttackError(f"unknown observer {observer!r}; use one of {OBSERVERS}.")
    if bn_statistics not in BN_STATISTICS:
        raise AttackError(f"unknown BatchNorm mode (bn_statistics) {bn_statistics!r}; use one of {BN_STATISTICS}.")
    if batchnorm not in BATCHNORM:
        raise AttackError(f"unknown BatchNorm synchronisation {batchnorm!r}; use one of {BATCHNORM}.")


def data_parallel_model(
    model: nn.Module, batchnorm: str = "sync", axis_name: str = train_lib.AXIS, train_argument: bool | str | None = None
) -> nn.Module:
    """`model` as the training step runs it over `axis_name` (`models.for_data_parallel`).

    The project's models: native convolutions, BatchNorm synchronised or
    local; models without BatchNorm are unchanged by `batchnorm`. Any other
    Flax module runs as built (`models.OwnModule`).
    """
    if batchnorm not in BATCHNORM:
        raise AttackError(f"unknown BatchNorm synchronisation {batchnorm!r}; use one of {BATCHNORM}.")
    try:
        return models_lib.for_data_parallel(
            model, models_lib.BatchNormSetting(sync=batchnorm), axis_name, train_argument
        )
    except ValueError as e:
        raise AttackError(str(e)) from e


def check_workers(workers: int) -> None:
    if workers < 1:
        raise AttackError(f"workers must be >= 1, got {workers}.")
    if workers > jax.local_device_count():
        raise AttackError(
            f"workers={workers} needs {workers} local devices but there are {jax.local_device_count()}; use fewer "
            f"workers or, on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={workers} before JAX starts."
        )


def make_round(
    model: nn.Module,
    compressor: compress_lib.Compressor,
    *,
    workers: int,
    observer: str = "worker",
    bn_statistics: str = "train",
    batchnorm: str = "sync",
    loss_fn: train_lib.LossFn = train_lib.cross_entropy,
    axis_name: str = train_lib.AXIS,
    train_argument: bool | str | None = None,
):
    """``round(variables, images [N, B, ...], labels [N, B], comp_state=None) -> Observation``.

    One real round of `train.make_step` on the first N = `workers` local
    devices; worker w trains on ``images[w]``, the victim is worker 0.
    ``comp_state`` is the workers' compressor state stacked over N (step t of
    a real run: error memory and warm-start Q), or None for the first step.
    Compiled once per call of `make_round`. ``loss_fn``: the workers'
    per-example training loss (`train.make_step`). ``axis_name``: the
    workers' axis, the one a user's module's ``nn.BatchNorm(axis_name=...)``
    synchronises over; ``train_argument`` declares such a module's train
    flag (`models.train_keyword`).
    """
    check_setting(observer, bn_statistics, batchnorm)
    check_workers(workers)
    if observer == "peer" and workers < 2:
        raise AttackError("the peer observer is worker N-1, another worker than the victim: use workers >= 2.")
    dp_model = data_parallel_model(model, batchnorm, axis_name, train_argument)
    # The optimiser plays no part in the message: the round's update is never applied.
    step = train_lib.make_step(
        dp_model,
        optax.identity(),
        compressor,
        axis_name=axis_name,
        return_message=True,
        bn_statistics=bn_statistics,
        loss_fn=loss_fn,
    )
    run = jax.pmap(step, axis_name=axis_name, devices=jax.local_devices()[:workers])

    def round_(variables: dict, images, labels, comp_state=None) -> Observation:
        images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
        if images.shape[0] != workers or labels.shape != images.shape[:2]:
            raise AttackError(
                f"a round needs images [{workers} workers, B, H, W, C] and labels [{workers}, B]; got "
                f"{images.shape} and {labels.shape}."
            )
        params = variables["params"]
        if comp_state is None:
            comp_state = train_lib.replicate(compressor.init(params), workers)
        elif np.shape(comp_state.step) != (workers,):
            raise AttackError(
                f"comp_state must be stacked over the {workers} workers of the run (leading axis "
                f"{workers}); got step of shape {np.shape(comp_state.step)}."
            )
        shared_params, batch_stats, opt_state = train_lib.replicate(
            (params, variables.get("batch_stats", {}), optax.identity().init(params)), workers
        )
        # Host copies: pmap places each worker's slice itself, wherever the arrays were committed before.
        state = jax.device_get(train_lib.TrainState(shared_params, batch_stats, opt_state, comp_state))
        _, _, msg = run(state, images, labels)
        # as_sent: PowerSGD's warm-up message becomes the Dense or LowRank that travelled at this step.
        sent = compress_lib.as_sent(compress_lib.worker_message(msg["grads"], 0))
        wire = compress_lib.message_cost(sent)
        if observer == "worker":
            return Observation(sent, compress_lib.worker_message(msg["bn"], 0), wire)
        update = compress_lib.worker_message(msg["update"], 0)
        if observer == "peer":
            own = compress_lib.decompress(compress_lib.as_sent(compress_lib.worker_message(msg["grads"], workers - 1)))
            update = jax.tree.map(lambda u, o: workers * u - o, update, own)
        return Observation(jax.tree.map(compress_lib.Dense, update), {}, wire)

    return round_


def other_worker_ids(victim_ids: np.ndarray, pool_size: int, workers: int, seed: int) -> np.ndarray:
    """Ids of the other workers' images in one round: [workers - 1, B], seeded, never a victim image.

    The draw depends only on (seed, the victim batch's ids), so a round is
    the same whichever other batches are attacked beside it.
    """
    victim_ids = np.asarray(victim_ids)
    b = len(victim_ids)
    if workers * b > pool_size:
        raise AttackError(
            f"{workers} workers x B={b} images need {workers * b} training images; the pool has "
            f"{pool_size}. Use fewer workers or a smaller victim batch."
        )
    rng = np.random.default_rng([seed, *victim_ids.tolist()])
    candidates = rng.permutation(pool_size)
    candidates = candidates[~np.isin(candidates, victim_ids)]
    return candidates[: (workers - 1) * b].reshape(workers - 1, b)


def stack_messages(observations: list[Observation]) -> Observation:
    """Observations of several rounds stacked on a leading axis (for batched attacks)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *observations)
