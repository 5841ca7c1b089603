"""The victim's gradient as a gradient-inversion attacker recomputes it, for dummy images x with labels y.

The attacker applies the model as the victim's step did (`param_grads`):
with ``train=True`` BatchNorm normalises by the statistics of the dummy
batch itself, which is exactly what a worker with local BatchNorm computes;
with synchronised BatchNorm the victim's statistics also contain the other
workers' batches, which the attacker does not have (`wire_bn_param_grads`
takes them from the link instead). With ``train=False`` it uses the running
averages (Geiping et al.'s setting). The loss is the victim's: the batch
mean of ``loss_fn(logits, labels)``, per-example losses (`train.make_step`;
softmax cross-entropy by default). `factored_param_grads` gives the same
gradient with convolution kernels as factors (`attacks.factored`).
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from trustsgd_jax import train as train_lib
from trustsgd_jax.attacks.errors import AttackError
from trustsgd_jax.attacks.factored import factored_grads, sqnorm


def _apply(model: nn.Module, variables: dict, images, train: bool, mutable: list[str]):
    """Logits and mutated collections; in train mode BatchNorm uses the batch's own statistics."""
    if train:
        return model.apply(variables, images, train=True, mutable=[*mutable, "batch_stats"])
    return model.apply(variables, images, train=False, mutable=mutable)


def _step_loss(
    model: nn.Module, variables: dict, images, labels, bn: dict | None, train: bool, loss_fn: train_lib.LossFn
):
    """The victim's training loss as the attacker recomputes it, as a function of the parameters.

    ``f(params, extra, mutable) -> (value, (mismatch, state))``: ``extra``
    are further variable collections (the factored route's probes),
    ``mutable`` collections to return in ``state``. Without BatchNorm traffic
    (``bn=None``) the value is the batch mean of ``loss_fn`` (the victim's
    per-example loss, `train.make_step`) in the given BatchNorm mode and the
    mismatch 0; with it, see `wire_bn_param_grads`. Every gradient of this
    module is taken from here, so the plain and the factored routes
    differentiate one function.
    """
    if bn is None:

        def plain(params, extra, mutable):
            logits, state = _apply(model, {**variables, **extra, "params": params}, images, train, mutable)
            return loss_fn(logits, labels).mean(), (jnp.zeros(()), state)

        return plain
    stats = train_lib.sync_bn_statistics(variables["batch_stats"], bn)
    if stats is None:
        raise AttackError("the +bn objectives need synchronised BatchNorm's traffic (train mode, batchnorm='sync').")

    def through_the_wire(params, extra, mutable):
        logits, state = model.apply(
            {**variables, **extra, "params": params, "batch_stats": stats},
            images,
            train=False,
            mutable=[*mutable, "moments"],
        )
        pairs = _moment_paths(state["moments"], bn)
        through_stats = sum(jnp.sum(t["grad_received"] * s) for s, t in pairs)
        mismatch = sum(sqnorm(s - t["sent"]) / jnp.maximum(sqnorm(t["sent"]), 1e-30) for s, t in pairs) / len(pairs)
        return loss_fn(logits, labels).mean() + through_stats, (mismatch, state)

    return through_the_wire


def param_grads(
    model: nn.Module,
    variables: dict,
    images,
    labels,
    train: bool = False,
    loss_fn: train_lib.LossFn = train_lib.cross_entropy,
):
    """Gradient of the batch mean of ``loss_fn`` w.r.t. the parameters (BatchNorm mode: see the module docstring)."""
    loss = _step_loss(model, variables, images, labels, None, train, loss_fn)
    return jax.grad(lambda params: loss(params, {}, [])[0])(variables["params"])


def _moment_paths(model_moments: dict, bn: dict):
    """Pairs (the dummy batch's [mean, mean of squares] [2, C], that layer's traffic) per synchronised layer."""
    traffic = flax.traverse_util.flatten_dict(flax.core.unfreeze(bn))
    pairs = []
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(model_moments)).items():
        layer = (*path[:-1], "BatchNorm_0")  # models.Norm sows at its own level; nn.BatchNorm_0 below it
        seen = {k[-1]: v for k, v in traffic.items() if k[:-1] == layer}
        if set(seen) != {"sent", "received", "grad_sent", "grad_received"}:
            raise AttackError(f"BatchNorm traffic of layer {'/'.join(layer)} is missing (a round of another model?).")
        pairs.append((value[0], seen))
    return pairs


def wire_bn_param_grads(
    model: nn.Module,
    variables: dict,
    images,
    labels,
    bn: dict,
    factored: bool = False,
    loss_fn: train_lib.LossFn = train_lib.cross_entropy,
):
    """(gradient, statistics mismatch) of dummy images as a synchronised-BatchNorm train step computes it.

    Worker 0's gradient in such a step is exact given the traffic of its
    link (`WithBatchNorm.bn`), whatever the other workers' batches:

    * forward: each layer normalises by the all-reduced statistics it
      received, so eval mode with those as running averages
      (`train.sync_bn_statistics`) is the step's forward pass;
    * backward: the statistics also depend on the parameters through the
      worker's own batch moments s_l(x) = [mean, mean of squares]; that path
      contributes (ds_l/dtheta)^T r_l, r_l the cotangent the backward
      all-reduce returned (``grad_received``). So the gradient is that of
      L(x) + sum_l <r_l, s_l(x)> with the statistics held fixed (L the
      batch mean of ``loss_fn``).

    The mismatch is the mean over layers of ||s_l(x) - sent_l||^2 /
    ||sent_l||^2 against the moments the victim sent (``sent``). Both are
    zero at the true batch. Huang et al. (NeurIPS 2021) found known
    BatchNorm statistics behind much reported attack success; synchronised
    BatchNorm puts them on the wire. Not used yet: ``grad_sent``, worker 0's
    own dL_0/d(statistics), a further constraint on x of the same kind.

    With ``factored=True`` the gradient comes as `factored_param_grads`'
    list (convolution kernels as `Factored`), else as a parameter pytree.
    """
    loss = _step_loss(model, variables, images, labels, bn, False, loss_fn)
    if factored:
        return factored_grads(variables["params"], loss)
    grads, (mismatch, _) = jax.grad(lambda params: loss(params, {}, []), has_aux=True)(variables["params"])
    return grads, mismatch


def factored_param_grads(
    model: nn.Module,
    variables: dict,
    images,
    labels,
    train: bool = False,
    loss_fn: train_lib.LossFn = train_lib.cross_entropy,
) -> list:
    """`param_grads` as a list in ``jax.tree.leaves`` order, convolution kernels as `Factored` (`factored_grads`).

    Kernels of `models.PatchesConv` layers are not differentiated: their
    layers sow their patches and expose a zero output probe, and the gradient
    w.r.t. the probes gives the cotangents. Other tensors (and every tensor of
    a model with native convolutions) come as plain arrays.
    """
    return factored_grads(variables["params"], _step_loss(model, variables, images, labels, None, train, loss_fn))[0]
