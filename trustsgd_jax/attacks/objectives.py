"""What a gradient-inversion attacker matches: gradients of dummy images, views of a message, the losses.

For dummy images x (normalised space) with labels y, every matching loss is
built on the cosine distance of Geiping et al. (NeurIPS 2020)::

    1 - <f(x), f*>_w / (||f(x)||_w ||f*||_w)

taken over *all* tensors concatenated (optional per-tensor weights w,
`tensor_weights`), where f(x) is the dummy gradient seen through a view of
the message and f* the message in that view. The objectives
(`matching_loss`) differ in the view: ``observed`` (the paper's attacker)
compares the whole gradient with the decompressed message; the
compression-aware objectives compare what the compressor actually sent,
following the principle that a defence is judged by the best attack that
knows it (Athalye, Carlini and Wagner 2018; Aerni et al. 2024).
`consistency_loss` scores a finished reconstruction by the message it would
send, without any ground truth. The dummy gradients come from
`attacks.gradients` (the victim's step as the attacker recomputes it), their
algebra from `attacks.factored`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from trustsgd_jax import compress as compress_lib
from trustsgd_jax import train as train_lib
from trustsgd_jax.attacks.errors import AttackError
from trustsgd_jax.attacks.factored import (
    Factored,
    LowRankTarget,
    dot_and_sqnorm,
    entries,
    gram_shape,
    low_rank_target,
    numerical_rank,
    sqnorm,
    t_times,
    thin_products_operand,
    times,
)
from trustsgd_jax.attacks.gradients import factored_param_grads, param_grads, wire_bn_param_grads

OBJECTIVES = ("observed", "factors", "factors_residual", "sent_coordinates", "cosine_support")
# Suffix of an objective that also uses synchronised BatchNorm's traffic (`WithBatchNorm`, `wire_bn_param_grads`).
WITH_BN = "+bn"
# Weight of the batch moments' mismatch in the +bn objectives (`wire_bn_param_grads`) against the cosine's 0..2.
BN_MISMATCH_WEIGHT = 1.0
LAYER_WEIGHTS = ("equal", "linear")
# Objectives that take the dummy gradient by plain autodiff. On the factored route they measured 0.68x and 0.42x
# observed on ResNet-18 (README), hardly faster, because Top-K's support constraint forms every entry anyway; and the
# route's different float rounding changed which candidate `strongest` picks on a test image (a chaotic signed-Adam
# trajectory). Keeping them here keeps their reconstructions as before; `dummy_features` accepts either route.
SPARSE_OBJECTIVES = ("sent_coordinates", "cosine_support")


class WithBatchNorm(NamedTuple):
    """A gradient message and the synchronised-BatchNorm traffic of the same step, as worker 0's link carries both.

    ``bn`` is one worker's `train.make_step` ``bn`` (`train.bn_traffic`):
    per layer the statistics it sent and received and their cotangents. Every
    objective takes the gradient part only; the ``+bn`` objectives (`WITH_BN`)
    also use the traffic.
    """

    grads: Any
    bn: dict


def gradient_message(msg):
    """The gradient message of `msg` (itself, or a `WithBatchNorm`'s ``grads``)."""
    return msg.grads if isinstance(msg, WithBatchNorm) else msg


def split_objective(name: str) -> tuple[str, bool]:
    """``"factors+bn"`` -> ("factors", True); an unknown base gets a one-line error naming the choices."""
    base, with_bn = (name[: -len(WITH_BN)], True) if name.endswith(WITH_BN) else (name, False)
    if base not in OBJECTIVES:
        raise AttackError(f"unknown objective {name!r}; use one of {OBJECTIVES}, each optionally with {WITH_BN!r}.")
    return base, with_bn


def takes_thin_targets(name: str) -> bool:
    """Whether objective `name` can hold dense deep-layer targets thin (`low_rank_target`).

    Only objectives on the factored route can: a thin target is contracted with
    the dummy gradient's factors. The sparse ones (`SPARSE_OBJECTIVES`) take
    the plain autodiff gradient, so a thin target there would only be
    expanded again. The ``+bn`` objectives are on the factored route, but
    their forward pass is the wire's (`wire_bn_param_grads`), which
    `dense_target_ranks` does not run; they keep dense targets, untested
    otherwise (only their SGD messages would have any).
    """
    base, with_bn = split_objective(name)
    return not with_bn and base not in SPARSE_OBJECTIVES


def cosine_distance(a: list, b: list, weights) -> jax.Array:
    """1 - cosine similarity of two lists of arrays, taken over all of them concatenated.

    Entries of `a` may be `Factored` weight gradients, entries of `b` `LowRankTarget`s.
    """
    pairs = [dot_and_sqnorm(x, y) for x, y in zip(a, b, strict=True)]
    dot = sum(w * d for w, (d, _) in zip(weights, pairs, strict=True))
    na = sum(w * n for w, (_, n) in zip(weights, pairs, strict=True))
    nb = sum(w * sqnorm(y) for w, y in zip(weights, b, strict=True))
    # The floor only matters where the dummy gradient vanishes exactly (sqrt'(0) = inf).
    return 1.0 - dot / (jnp.sqrt(jnp.maximum(na, 1e-30)) * jnp.sqrt(nb))


def total_variation(x) -> jax.Array:
    """Anisotropic TV of NHWC images: mean |x[h+1]-x[h]| + mean |x[w+1]-x[w]|."""
    return jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) + jnp.mean(jnp.abs(x[:, :, 1:] - x[:, :, :-1]))


def forward_order(model: nn.Module, variables: dict, image_shape) -> list[int]:
    """Per parameter leaf (``jax.tree.leaves`` order), its rank in the order the forward pass first uses it.

    Flax sorts parameter names, so leaf order is alphabetical (``fc`` before
    ``stem_conv`` on ResNet-18); this traces one forward pass and ranks each
    parameter by the first top-level operation that reads it. Ties (one
    operation reading several parameters) keep leaf order.
    """
    leaves, treedef = jax.tree.flatten(variables["params"])

    def forward(*leaves):
        params = jax.tree.unflatten(treedef, leaves)
        return model.apply({**variables, "params": params}, jnp.zeros((1, *image_shape), jnp.float32), train=False)

    jaxpr = jax.make_jaxpr(forward)(*leaves).jaxpr
    position = {id(v): j for j, v in enumerate(jaxpr.invars)}
    uses = [len(jaxpr.eqns)] * len(jaxpr.invars)
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:  # literals among them are never parameters
            j = position.get(id(v))
            if j is not None and uses[j] > i:
                uses[j] = i
    order = sorted(range(len(uses)), key=lambda j: (uses[j], j))
    rank = [0] * len(uses)
    for r, j in enumerate(order):
        rank[j] = r
    return rank


def tensor_weights(n: int, kind: str, depth_rank: list[int] | None = None) -> list[float]:
    """Per-tensor weights of the cosine, in leaf order.

    ``equal``: all 1. ``linear`` (Geiping et al.'s ``linear`` weighting):
    (n - d) / n for the tensor the forward pass uses d-th (`forward_order`),
    so the input layer weighs 1 and the last 1/n. Without `depth_rank` the
    leaf order stands in for depth.
    """
    if kind == "equal":
        return [1.0] * n
    if kind == "linear":
        rank = list(range(n)) if depth_rank is None else depth_rank
        if sorted(rank) != list(range(n)):
            raise AttackError(f"depth_rank must be a permutation of range({n}), got {rank}.")
        return [float(n - d) / n for d in rank]
    raise AttackError(f"unknown layer_weights {kind!r}; use one of {LAYER_WEIGHTS}.")


def message_leaves(msg) -> list:
    """The per-tensor messages of a message tree (or of a `WithBatchNorm`'s gradient part), in parameter leaf order."""
    return jax.tree.leaves(gradient_message(msg), is_leaf=compress_lib.is_message)


def _sent_coordinates(m) -> bool:
    return isinstance(m, compress_lib.Sparse)


def _top_k(m) -> bool:
    return isinstance(m, compress_lib.Sparse) and m.indices_on_wire


def applicable_objectives(msg) -> list[str]:
    """The objectives that can attack this message: ``observed`` and those of its compressor family.

    With synchronised BatchNorm's traffic beside the message (`WithBatchNorm`), each also with ``+bn``.
    """
    leaves = message_leaves(msg)
    out = ["observed"]
    if any(isinstance(m, compress_lib.LowRank) for m in leaves):
        out += ["factors", "factors_residual"]
    if any(_sent_coordinates(m) for m in leaves):
        out.append("sent_coordinates")
    if any(_top_k(m) for m in leaves):
        out.append("cosine_support")
    if isinstance(msg, WithBatchNorm) and msg.bn:
        out += [name + WITH_BN for name in out]
    return out


def adaptive_objective(msg) -> str | None:
    """The consistent compression-aware objective of the message's family (None: nothing to adapt to)."""
    leaves = message_leaves(msg)
    if any(isinstance(m, compress_lib.LowRank) for m in leaves):
        return "factors"
    if any(_sent_coordinates(m) for m in leaves):
        return "sent_coordinates"
    return None


def _view(m, objective: str) -> str:
    """How an objective compares one tensor: 'factors', 'gather' (sent coordinates) or 'dense'."""
    if objective in ("factors", "factors_residual") and isinstance(m, compress_lib.LowRank):
        return "factors"
    if objective == "sent_coordinates" and _sent_coordinates(m):
        return "gather"
    return "dense"


def target_features(msg, objective: str, *, factored: bool = False) -> list:
    """What the attacker matches: per tensor, the observed array in the objective's view.

    With ``factored=True`` a PowerSGD tensor in the dense view comes as the
    `LowRankTarget` (Q, P_hat) instead of its decompression P_hat Q^T, for
    `cosine_distance`; the values are the same.
    """
    out: list[Any] = []
    for m in message_leaves(msg):
        view = _view(m, objective)
        if view == "gather":
            out.append(m.values)
        elif view == "factors":
            out.append(jnp.concatenate([m.q.reshape(-1), m.p.reshape(-1)]))
        elif factored and isinstance(m, compress_lib.LowRank):
            out.append(LowRankTarget(m.q, m.p_hat))
        else:
            out.append(m.dense())
    return out


# Extra columns of the range finder (`low_rank_target`): they capture directions just below the tolerance too.
RANGE_OVERSAMPLING = 8


def dense_target_ranks(model: nn.Module, variables: dict, messages: list, x_shape, train: bool) -> tuple:
    """Per parameter tensor, the rank at which `matching_loss` holds a dense target as U V^T, or None.

    A dense (uncompressed) message of a convolution is the sum of per-example
    gradients P_i^T D_i, so its rank is at most the rows behind it (B x H x W
    positions per image): 16 per image in ResNet-18's last stage at 32x32,
    against 512 columns. Where the dummy's `Factored` gradient is on the Gram
    route, <G, T> = <D, P T> costs rows x K x C per iteration; with
    T = U V^T of rank r it is <D V, P U>, rows x (K + C) x r. The rank is
    measured on these concrete messages (the largest over them, singular
    values above `RANK_TOLERANCE` of the largest), plus `RANGE_OVERSAMPLING`,
    whoever the observer; a tensor whose rank would not save half the cost,
    or that is not finite, stays dense. The ranks hold for these messages
    only: an attack compiled with them projects any other message onto that
    rank. ``x_shape`` is one attack's dummy batch [B, H, W, C].
    """
    x = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
    y = jax.ShapeDtypeStruct(tuple(x_shape[:1]), jnp.int32)
    shapes = jax.eval_shape(lambda x, y: factored_param_grads(model, variables, x, y, train), x, y)
    leaves = [message_leaves(m) for m in messages]
    out: list[int | None] = []
    for i, g in enumerate(shapes):
        rank = None
        if isinstance(g, Factored) and all(isinstance(ms[i], compress_lib.Dense) for ms in leaves):
            rows, k, c = math.prod(g.patches.shape[:-1]), g.patches.shape[-1], g.cotangent.shape[-1]
            if gram_shape(rows, k, c):
                ranks = [numerical_rank(ms[i].value.reshape(k, c)) for ms in leaves]
                known = [r for r in ranks if r is not None]
                if len(known) == len(ranks):
                    r = min(max(known) + RANGE_OVERSAMPLING, k, c)
                    rank = r if 2 * r * (k + c) <= k * c else None
        out.append(rank)
    return tuple(out)


def _grad_list(grads) -> list:
    """A gradient as a list in parameter leaf order: a pytree of arrays, or `factored_param_grads`' list."""
    return grads if isinstance(grads, list) else jax.tree.leaves(grads)


def thin_operands(grads, msg, objective: str) -> list:
    """`grads` as a list with each tensor of the ``factors`` view made ready for thin products once
    (`thin_products_operand`), so that every term of a loss shares those products and their derivatives."""
    return [
        thin_products_operand(g) if _view(m, objective) == "factors" else g
        for g, m in zip(_grad_list(grads), message_leaves(msg), strict=True)
    ]


def dummy_features(grads, msg, objective: str) -> list:
    """The dummy gradient passed through the same view of each tensor as `target_features`.

    `grads` is a gradient pytree or the list of `factored_param_grads`: the
    views of a `Factored` tensor are thin products of its factors
    (M^T P_hat = G P_hat = P^T (D P_hat), M Q_prev = G^T Q_prev =
    D^T (P Q_prev), a sent entry G[i, j] = P[:, i] . D[:, j]); a tensor in
    the dense view stays as it came.
    """
    out = []
    for g, m in zip(_grad_list(grads), message_leaves(msg), strict=True):
        view = _view(m, objective)
        if view == "gather":
            out.append(entries(g, m.indices))
        elif view == "factors":
            g = thin_products_operand(g)
            out.append(jnp.concatenate([times(g, m.p_hat).reshape(-1), t_times(g, m.q_prev).reshape(-1)]))
        else:
            out.append(g)
    return out


def topk_support_penalty(grads, msg, dummy_feats, target_feats) -> jax.Array:
    """What Top-K's selection reveals: every unsent entry is at most the smallest sent one.

    With the dummy gradient scaled so that its features have the norm of the
    target's, the sum over unsent entries of relu(|g_i| - tau)^2, tau the
    smallest sent magnitude of that tensor, relative to the sent energy. Zero
    at the true input at the first step; with error memory (step t > 0) the
    sent entries are those of g + e, so it is approximate there. The
    rectifier needs every entry, so a `Factored` tensor is formed here (once
    per Top-K tensor, as the explicit route of the observed cosine does).
    """
    sparse = [(g, m) for g, m in zip(_grad_list(grads), message_leaves(msg), strict=True) if _top_k(m)]
    if not sparse:
        return jnp.zeros(())
    sent = sum(sqnorm(t) for t in target_feats)
    scale = jnp.sqrt(sent / jnp.maximum(sum(sqnorm(d) for d in dummy_feats), 1e-30))
    total = jnp.zeros(())
    for g, m in sparse:
        tau = jnp.min(jnp.abs(m.values))
        dense = g.dense(m.shape) if isinstance(g, Factored) else g
        magnitude = jnp.abs(dense.reshape(-1)) * scale
        every, sent_ones = jax.nn.relu(magnitude - tau), jax.nn.relu(magnitude[m.indices] - tau)
        # The sum over unsent entries as (all entries) - (the k sent ones; Top-K's indices are distinct): no
        # scatter into a copy of G's 11.2M entries (ResNet-18) and none in the derivative. Value and input gradient
        # of `sent_coordinates` took 192 instead of 215 ms here (interleaved, 2-core CPU, 2026-12-03).
        total = total + jnp.sum(jnp.square(every)) - jnp.sum(jnp.square(sent_ones))
    return total / sent


def powersgd_residual(grads, msg, dummy_feats) -> jax.Array:
    """Energy of the dummy gradient outside span(P_hat), relative to its whole energy, over PowerSGD's matrices.

    ||(I - P_hat P_hat^T) M(x)||^2 / ||M(x)||^2. The observed cosine
    penalises this energy implicitly (the decompressed message P_hat Q^T has
    none); the factor match alone ignores it. It is not zero at the true
    input (the victim's gradient is not rank r), so adding it trades
    consistency for that information. With A = M^T P_hat = G P_hat (thin),
    the numerator is ||M||^2 - 2 ||A||^2 + <P_hat^T P_hat, A^T A>, which
    holds whether or not P_hat's columns are orthonormal.

    A is read from the tensor's ``factors`` features (`dummy_features`,
    shaped like the sent Q), and `grads` should be those features' operands
    (`thin_operands`): products computed twice are also differentiated
    twice, which XLA does not merge (1.4 of 7.7 GFLOP per ResNet-18
    iteration before this was shared).
    """
    outside, total = jnp.zeros(()), jnp.zeros(())
    for g, m, f in zip(_grad_list(grads), message_leaves(msg), dummy_feats, strict=True):
        if isinstance(m, compress_lib.LowRank):
            a = f[: m.q.size].reshape(m.q.shape)
            norm = sqnorm(g)
            outside = outside + norm - 2 * jnp.sum(jnp.square(a)) + jnp.sum((m.p_hat.T @ m.p_hat) * (a.T @ a))
            total = total + norm
    return outside / jnp.maximum(total, 1e-30)


@dataclasses.dataclass(frozen=True)
class Matching:
    """An attacker's matching loss split where the attack loop wants it (a callable `jax.jit` accepts).

    ``prepare(msg) -> target``: the message in the objective's view, once per
    attack (outside the optimisation loop). ``loss(x, msg, target, y)``: the
    matching loss of dummy images x. ``__call__(x, msg, y)`` does both.
    """

    prepare: Callable
    loss: Callable

    def __call__(self, x, msg, y):
        return self.loss(x, msg, self.prepare(msg), y)


def matching_loss(
    model: nn.Module,
    variables: dict,
    objective: str,
    weights,
    train: bool,
    target_ranks: tuple | None = None,
    loss_fn: train_lib.LossFn = train_lib.cross_entropy,
) -> Matching:
    """The attacker's matching loss for dummy images x against a message (`Matching`).

    Objectives (`OBJECTIVES`):

    * ``observed``: 1 - cos(g(x), decompress(msg)) over all tensors.
    * ``factors``: PowerSGD's sent factors, M(x)^T P_hat vs Q and M(x) Q_prev
      vs P, tensors sent in full compared in full. Zero at the true input
      whenever the message is a deterministic function of the victim's
      gradient: at step 0, or with ``error_feedback=False``; with error
      memory M = g + e and e is unknown. It uses P_hat and Q_prev, which
      every worker receives, and nothing else of other workers.
    * ``factors_residual``: ``factors`` + `powersgd_residual`.
    * ``sent_coordinates``: Top-K or Random-K: the dummy gradient at the sent
      (Top-K) or shared (Random-K) indices vs the sent values, plus for Top-K
      `topk_support_penalty`. Zero at the true input at step 0.
    * ``cosine_support``: the whole-gradient cosine against the sparse
      message plus `topk_support_penalty` (rewards a dummy gradient whose
      mass sits on the sent support; not zero at the true input).

    Every objective takes the dummy gradient from `factored_param_grads`
    (convolution kernels as `Factored`) and its view from thin products of
    the factors (`dummy_features`); a decompressed PowerSGD target stays
    factored (`LowRankTarget`), and so does a dense one of a deep
    convolution given its rank (``target_ranks``, `dense_target_ranks`; the
    factors are found in ``prepare``, `low_rank_target`). The same values as the plain autodiff
    gradient (tested), at a fraction of the cost.

    QSGD and sign compression send a quantised copy of every entry; their
    rounding has no useful derivative, so only ``observed`` (the decoded
    message) applies to them. With synchronised BatchNorm in train mode the
    victim's gradient also depends on the other workers' batches, which the
    attacker does not have, so the objectives above are not zero there; each
    with ``+bn`` takes the gradient from that BatchNorm's traffic instead
    (`wire_bn_param_grads`, exact given the link) and adds the mismatch of
    the sent batch moments, which makes it zero at the true input again.

    The dummy gradient is that of the victim's loss, ``loss_fn`` (per-example
    losses; their batch mean, as `train.make_step` takes it): the objectives
    are consistent only when it is the loss the victim trained with.
    """
    name = objective
    objective, with_bn = split_objective(name)

    def prepare(msg):
        if with_bn and not (isinstance(msg, WithBatchNorm) and msg.bn):
            raise AttackError(f"objective {name!r} needs the message's BatchNorm traffic (objectives.WithBatchNorm).")
        target = target_features(msg, objective, factored=True)
        if target_ranks is None or not takes_thin_targets(name):
            return target
        return [
            low_rank_target(t, r) if r is not None and isinstance(m, compress_lib.Dense) else t
            for t, m, r in zip(target, message_leaves(msg), target_ranks, strict=True)
        ]

    def loss(x, msg, target, y):
        mismatch = jnp.zeros(())
        if with_bn:
            factored = objective not in SPARSE_OBJECTIVES  # the plain route for those: see SPARSE_OBJECTIVES
            grads, mismatch = wire_bn_param_grads(model, variables, x, y, msg.bn, factored=factored, loss_fn=loss_fn)
        elif objective in SPARSE_OBJECTIVES:
            grads = param_grads(model, variables, x, y, train, loss_fn)  # the plain route: see SPARSE_OBJECTIVES
        else:
            grads = factored_param_grads(model, variables, x, y, train, loss_fn)
        grads = thin_operands(grads, msg, objective)
        d = dummy_features(grads, msg, objective)
        out = cosine_distance(d, target, weights) + BN_MISMATCH_WEIGHT * mismatch
        if objective in ("sent_coordinates", "cosine_support"):
            out = out + topk_support_penalty(grads, msg, d, target)
        if objective == "factors_residual":
            out = out + powersgd_residual(grads, msg, d)
        return out

    return Matching(prepare, loss)


def simulated_message_features(grads, msg) -> tuple[list, list]:
    """(features of the compressor applied to `grads`, the same features of the sent message), per tensor.

    The compressor's view of a candidate reconstruction's gradient, with what
    the protocol makes public (P_hat, Q_prev, the shared Random-K indices,
    Top-K's k): Top-K keeps the k largest entries of the candidate's own
    gradient; PowerSGD projects on P_hat and Q_prev; Random-K gathers the
    shared indices; QSGD compares the decoded message with its expectation
    (the gradient itself); sign compression with the scaled sign.
    """
    sim, sent = [], []
    for g, m in zip(jax.tree.leaves(grads), message_leaves(msg), strict=True):
        flat = g.reshape(-1)
        if isinstance(m, compress_lib.LowRank):
            mat = compress_lib.to_matrix(g)
            sim.append(jnp.concatenate([(mat.T @ m.p_hat).reshape(-1), (mat @ m.q_prev).reshape(-1)]))
            sent.append(jnp.concatenate([m.q.reshape(-1), m.p.reshape(-1)]))
        elif _top_k(m):
            idx = jax.lax.top_k(jnp.abs(flat), m.values.shape[0])[1]
            sim.append(jnp.zeros_like(flat).at[idx].set(flat[idx]))
            sent.append(m.dense().reshape(-1))
        elif isinstance(m, compress_lib.Sparse):
            sim.append(flat[m.indices])
            sent.append(m.values)
        elif isinstance(m, compress_lib.Signs):
            sim.append(jnp.mean(jnp.abs(flat)) * jnp.where(flat >= 0, 1.0, -1.0))
            sent.append(m.dense().reshape(-1))
        else:
            sim.append(flat)
            sent.append(m.dense().reshape(-1))
    return sim, sent


def consistency_loss(
    model: nn.Module, variables: dict, train: bool, loss_fn: train_lib.LossFn = train_lib.cross_entropy
):
    """``loss(x, msg, y)``: how far the message a candidate x would send is from the message seen.

    1 - cosine between `simulated_message_features` of g(x) and of the sent
    message, over all tensors with equal weights. With synchronised
    BatchNorm's traffic (`WithBatchNorm`), g(x) is `wire_bn_param_grads`' and
    the moments' mismatch is added. g(x) is the gradient of ``loss_fn``, the
    victim's loss. It never looks at an original image, so `strongest` can
    select by it.
    """

    def loss(x, msg, y):
        mismatch = jnp.zeros(())
        if isinstance(msg, WithBatchNorm) and msg.bn:
            # The step's own computation, known from the link (wire_bn_param_grads): the closest re-run of it.
            grads, mismatch = wire_bn_param_grads(model, variables, x, y, msg.bn, loss_fn=loss_fn)
        else:
            grads = param_grads(model, variables, x, y, train, loss_fn)
        sim, sent = simulated_message_features(grads, msg)
        return cosine_distance(sim, sent, [1.0] * len(sim)) + BN_MISMATCH_WEIGHT * mismatch

    return loss
