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
send, without any ground truth.

The attacker applies the model as the victim's step did (`param_grads`):
with ``train=True`` BatchNorm normalises by the statistics of the dummy
batch itself, which is exactly what a worker with local BatchNorm computes;
with synchronised BatchNorm the victim's statistics also contain the other
workers' batches, which the attacker does not have. With ``train=False`` it
uses the running averages (Geiping et al.'s setting).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trustsgd_jax import compress as compress_lib
from trustsgd_jax import train as train_lib

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


class AttackError(ValueError):
    """A bad argument to an attack; the message names the valid choices or the fix."""


class WithBatchNorm(NamedTuple):
    """A gradient message and the synchronised-BatchNorm traffic of the same step, as worker 0's link carries both.

    ``bn`` is one worker's `train.make_step` ``bn`` (`train._bn_traffic`):
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


class Factored(NamedTuple):
    """A convolution's weight gradient kept as its two factors: G = P^T D.

    P [N, H, W, K] are the layer's input patches (K = kh*kw*C_in) and D
    [N, H, W, C_out] the loss gradient w.r.t. its output; G [K, C_out] is the
    kernel flattened to ``kernel.reshape(-1, C_out)``. The cosine and the
    PowerSGD views need only <G, T> = <D, P T>, ||G||^2 = <P P^T, D D^T>,
    G v = P^T (D v) and G^T u = D^T (P u) for thin u, v, or T = U V^T. For
    the deep layers, where the N*H*W rows are few, those cost far less than
    forming G (the Gram trick of "ghost" per-example norms, Goodfellow 2015;
    Li et al. 2022), and the attack's second derivative never writes a
    weight-sized tensor per attack. Where the rows are many, G is formed
    once (one matmul). Top-K's support constraint (a rectifier over every
    entry) and sent entries are taken from the formed G (`_entries`).
    """

    patches: jax.Array
    cotangent: jax.Array

    def flat(self) -> tuple[jax.Array, jax.Array]:
        """(P [rows, K], D [rows, C])."""
        k, c = self.patches.shape[-1], self.cotangent.shape[-1]
        return self.patches.reshape(-1, k), self.cotangent.reshape(-1, c)

    def dense(self, shape) -> jax.Array:
        p, d = self.flat()
        return (p.T @ d).reshape(shape)


class LowRankTarget(NamedTuple):
    """A target tensor known as a product, T = U V^T in the kernel layout (U [K, r], V [C_out, r]).

    What the observer of PowerSGD decompresses: from_matrix(P_hat Q^T) is
    U = Q, V = P_hat. Matching against the factors costs r/(K C_out) of the
    dense product per row, and the weight-sized T is never written.
    """

    u: jax.Array
    v: jax.Array


def _kernel_layout(g) -> jax.Array:
    """A plain gradient tensor as the [K, C_out] matrix G (the transpose of `compress.to_matrix`)."""
    return g.reshape(-1, g.shape[-1])


def _thin_products_operand(g):
    """A gradient ready for thin products G v and G^T u: `Factored` on the Gram route, formed G elsewhere.

    Where the rows N*H*W are many (the early layers), products through P
    (P^T (D v)) contract P's long leading axis, whose derivative XLA:CPU
    lays out with a physical transpose of P per product: forming G = P^T D
    once (one matmul, the observed attacker's explicit route) and
    multiplying the small G is faster there. On the Gram route P is small.
    """
    if isinstance(g, Factored) and not _gram_route(g):
        p, d = g.flat()
        return p.T @ d
    return g


def _times(g, v) -> jax.Array:
    """G v for a gradient (plain or `Factored`) and v [C_out, r]: [K, r]."""
    if isinstance(g, Factored):
        p, d = g.flat()
        return p.T @ (d @ v)
    return _kernel_layout(g) @ v


def _t_times(g, u) -> jax.Array:
    """G^T u for a gradient (plain or `Factored`) and u [K, r]: [C_out, r]."""
    if isinstance(g, Factored):
        p, d = g.flat()
        return d.T @ (p @ u)
    return _kernel_layout(g).T @ u


def _entries(g, indices) -> jax.Array:
    """The entries of a gradient (plain or `Factored`) at flat indices of its tensor.

    A `Factored` tensor is formed (one matmul) and gathered from: the entries
    G[i, j] = P[:, i] . D[:, j] taken straight from the factors need a
    gather of rows x k values, whose derivative is a scatter-add of as many;
    from the formed G it is k values (and Top-K's support constraint forms
    G anyway).
    """
    if isinstance(g, Factored):
        p, d = g.flat()
        g = p.T @ d
    return g.reshape(-1)[indices]


def _gram_route(g: Factored) -> bool:
    """Whether ||P^T D||^2 is cheaper as <P P^T, D D^T>: rows^2 (K + C) < rows K C."""
    p, d = g.flat()
    return _gram_shape(p.shape[0], p.shape[1], d.shape[1])


def sqnorm(g) -> jax.Array:
    """||g||^2 of a gradient, a `Factored` one or a `LowRankTarget`."""
    if isinstance(g, LowRankTarget):
        return jnp.sum((g.u.T @ g.u) * (g.v.T @ g.v))
    if isinstance(g, Factored):
        if _gram_route(g):
            p, d = g.flat()
            return jnp.sum((p @ p.T) * (d @ d.T))
        p, d = g.flat()
        return jnp.sum(jnp.square(p.T @ d))
    return jnp.sum(jnp.square(g))


def _dot_and_sqnorm(g, t):
    """(<g, t>, ||g||^2) for a gradient tensor or a `Factored` one, against a tensor or a `LowRankTarget`."""
    if isinstance(g, Factored) and not _gram_route(g):
        p, d = g.flat()
        g = p.T @ d  # the explicit route: forming G is cheaper than the Gram matrices
    if isinstance(t, LowRankTarget):
        return jnp.sum(_t_times(g, t.u) * t.v), sqnorm(g)
    if isinstance(g, Factored):
        p, d = g.flat()
        return jnp.sum(d * (p @ t.reshape(p.shape[1], d.shape[1]))), sqnorm(g)
    return jnp.vdot(g, t.reshape(g.shape)), jnp.sum(jnp.square(g))


def cosine_distance(a: list, b: list, weights) -> jax.Array:
    """1 - cosine similarity of two lists of arrays, taken over all of them concatenated.

    Entries of `a` may be `Factored` weight gradients, entries of `b` `LowRankTarget`s.
    """
    pairs = [_dot_and_sqnorm(x, y) for x, y in zip(a, b, strict=True)]
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


def _apply(model: nn.Module, variables: dict, images, train: bool, mutable: list[str]):
    """Logits and mutated collections; in train mode BatchNorm uses the batch's own statistics."""
    if train:
        return model.apply(variables, images, train=True, mutable=[*mutable, "batch_stats"])
    return model.apply(variables, images, train=False, mutable=mutable)


def _step_loss(model: nn.Module, variables: dict, images, labels, bn: dict | None, train: bool):
    """The victim's training loss as the attacker recomputes it, as a function of the parameters.

    ``f(params, extra, mutable) -> (value, (mismatch, state))``: ``extra``
    are further variable collections (the factored route's probes),
    ``mutable`` collections to return in ``state``. Without BatchNorm traffic
    (``bn=None``) the value is the mean cross-entropy in the given BatchNorm
    mode and the mismatch 0; with it, see `wire_bn_param_grads`. Every
    gradient of this module is taken from here, so the plain and the
    factored routes differentiate one function.
    """
    if bn is None:

        def plain(params, extra, mutable):
            logits, state = _apply(model, {**variables, **extra, "params": params}, images, train, mutable)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (jnp.zeros(()), state)

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
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + through_stats, (mismatch, state)

    return through_the_wire


def param_grads(model: nn.Module, variables: dict, images, labels, train: bool = False):
    """Gradient of the mean cross-entropy w.r.t. the parameters (BatchNorm mode: see the module docstring)."""
    loss = _step_loss(model, variables, images, labels, None, train)
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


def wire_bn_param_grads(model: nn.Module, variables: dict, images, labels, bn: dict, factored: bool = False):
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
      CE(x) + sum_l <r_l, s_l(x)> with the statistics held fixed.

    The mismatch is the mean over layers of ||s_l(x) - sent_l||^2 /
    ||sent_l||^2 against the moments the victim sent (``sent``). Both are
    zero at the true batch. Huang et al. (NeurIPS 2021) found known
    BatchNorm statistics behind much reported attack success; synchronised
    BatchNorm puts them on the wire. Not used yet: ``grad_sent``, worker 0's
    own dL_0/d(statistics), a further constraint on x of the same kind.

    With ``factored=True`` the gradient comes as `factored_param_grads`'
    list (convolution kernels as `Factored`), else as a parameter pytree.
    """
    loss = _step_loss(model, variables, images, labels, bn, False)
    if factored:
        return _factored_grads(model, variables, loss)
    grads, (mismatch, _) = jax.grad(lambda params: loss(params, {}, []), has_aux=True)(variables["params"])
    return grads, mismatch


def _factored_grads(model: nn.Module, variables: dict, loss) -> tuple[list, jax.Array]:
    """(`factored_param_grads`' list, mismatch) of a `_step_loss`."""
    params = variables["params"]
    shapes = jax.eval_shape(lambda: loss(params, {}, ["factors", "perturbations"])[1][1])
    if "factors" not in shapes:
        grads, (mismatch, _) = jax.grad(lambda p: loss(p, {}, []), has_aux=True)(params)
        return jax.tree.leaves(grads), mismatch
    factored = {k[:-1] for k in flax.traverse_util.flatten_dict(shapes["factors"])}
    flat = flax.traverse_util.flatten_dict(params)
    kernels = {k: v for k, v in flat.items() if k[-1] == "kernel" and k[:-1] in factored}
    others = {k: v for k, v in flat.items() if k not in kernels}
    probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])

    def of_others_and_probes(others, probes):
        p = flax.traverse_util.unflatten_dict({**kernels, **others})
        value, (mismatch, state) = loss(p, {"perturbations": probes}, ["factors"])
        return value, (mismatch, state["factors"])

    (g_others, g_probes), (mismatch, factors) = jax.grad(of_others_and_probes, argnums=(0, 1), has_aux=True)(
        others, probes
    )
    patches = flax.traverse_util.flatten_dict(factors)
    cotangents = flax.traverse_util.flatten_dict(g_probes)
    out: list[Any] = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        k = tuple(p.key for p in path)
        if k in kernels:
            out.append(Factored(patches[k[:-1] + ("patches",)][0], cotangents[k[:-1] + ("out",)]))
        else:
            out.append(g_others[k])
    return out, mismatch


def factored_param_grads(model: nn.Module, variables: dict, images, labels, train: bool = False) -> list:
    """`param_grads` as a list in ``jax.tree.leaves`` order, convolution kernels as `Factored`.

    Kernels of `models.PatchesConv` layers are not differentiated: their
    layers sow their patches and expose a zero output probe, and the gradient
    w.r.t. the probes gives the cotangents. Other tensors (and every tensor of
    a model with native convolutions) come as plain arrays.
    """
    return _factored_grads(model, variables, _step_loss(model, variables, images, labels, None, train))[0]


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


# Singular values below this fraction of the largest count as float noise in `dense_target_ranks`. Measured on
# ResNet-18 at B = 1 (32x32): the smallest genuine one is about 1e-3 of the largest in eval mode and 1e-7 in train
# mode (where it is BatchNorm's removed mean direction, at the float floor itself), float noise about 1e-8.
RANK_TOLERANCE = 1e-5
# Extra columns of the range finder (`low_rank_target`): they capture directions just below the tolerance too.
RANGE_OVERSAMPLING = 8


def _gram_shape(rows: int, k: int, c: int) -> bool:
    return rows * (k + c) < k * c


def _numerical_rank(t: np.ndarray) -> int | None:
    """Singular values above `RANK_TOLERANCE` of the largest (from the C x C Gram matrix); None if not finite."""
    t = np.asarray(t, np.float64)
    if not np.isfinite(t).all():
        return None
    sv = np.sqrt(np.maximum(np.linalg.eigvalsh(t.T @ t), 0.0))
    return int(np.sum(sv > RANK_TOLERANCE * sv.max())) if sv.max() > 0 else 0


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
            if _gram_shape(rows, k, c):
                ranks = [_numerical_rank(ms[i].value.reshape(k, c)) for ms in leaves]
                known = [r for r in ranks if r is not None]
                if len(known) == len(ranks):
                    r = min(max(known) + RANGE_OVERSAMPLING, k, c)
                    rank = r if 2 * r * (k + c) <= k * c else None
        out.append(rank)
    return tuple(out)


def low_rank_target(t, rank: int) -> LowRankTarget:
    """A dense kernel-layout target T [..., C_out] as U V^T = U U^T T, U [K, rank] orthonormal.

    U is an orthonormal basis of the range of T Omega for a fixed Gaussian
    Omega [C_out, rank] (a randomised range finder, Halko, Martinsson and
    Tropp 2011), V = T^T U. U U^T T is T when T's rank is at most `rank`, and
    otherwise drops only the part of T outside span(U): with the oversampled
    rank of `dense_target_ranks`, a tail below `RANK_TOLERANCE`. It costs two
    thin products and a thin orthonormalisation (`compress.orthonormal_columns`;
    LAPACK's batched QR can deadlock batched attacks on CPU), at full fp32
    precision (no TF32 on GPUs): an SVD in XLA:CPU took longer than the
    iterations it saved.
    """
    m = t.reshape(-1, t.shape[-1])
    omega = jax.random.normal(jax.random.key(0), (m.shape[1], rank), m.dtype)
    u = compress_lib.orthonormal_columns(jnp.matmul(m, omega, precision=jax.lax.Precision.HIGHEST))
    return LowRankTarget(u, jnp.matmul(m.T, u, precision=jax.lax.Precision.HIGHEST))


def _grad_list(grads) -> list:
    """A gradient as a list in parameter leaf order: a pytree of arrays, or `factored_param_grads`' list."""
    return grads if isinstance(grads, list) else jax.tree.leaves(grads)


def thin_operands(grads, msg, objective: str) -> list:
    """`grads` as a list with each tensor of the ``factors`` view made ready for thin products once
    (`_thin_products_operand`), so that every term of a loss shares those products and their derivatives."""
    return [
        _thin_products_operand(g) if _view(m, objective) == "factors" else g
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
            out.append(_entries(g, m.indices))
        elif view == "factors":
            g = _thin_products_operand(g)
            out.append(jnp.concatenate([_times(g, m.p_hat).reshape(-1), _t_times(g, m.q_prev).reshape(-1)]))
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
    model: nn.Module, variables: dict, objective: str, weights, train: bool, target_ranks: tuple | None = None
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
            grads, mismatch = wire_bn_param_grads(model, variables, x, y, msg.bn, factored=factored)
        elif objective in SPARSE_OBJECTIVES:
            grads = param_grads(model, variables, x, y, train)  # the plain route: see SPARSE_OBJECTIVES
        else:
            grads = factored_param_grads(model, variables, x, y, train)
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


def consistency_loss(model: nn.Module, variables: dict, train: bool):
    """``loss(x, msg, y)``: how far the message a candidate x would send is from the message seen.

    1 - cosine between `simulated_message_features` of g(x) and of the sent
    message, over all tensors with equal weights. With synchronised
    BatchNorm's traffic (`WithBatchNorm`), g(x) is `wire_bn_param_grads`' and
    the moments' mismatch is added. It never looks at an original image, so
    `strongest` can select by it.
    """

    def loss(x, msg, y):
        mismatch = jnp.zeros(())
        if isinstance(msg, WithBatchNorm) and msg.bn:
            # The step's own computation, known from the link (wire_bn_param_grads): the closest re-run of it.
            grads, mismatch = wire_bn_param_grads(model, variables, x, y, msg.bn)
        else:
            grads = param_grads(model, variables, x, y, train)
        sim, sent = simulated_message_features(grads, msg)
        return cosine_distance(sim, sent, [1.0] * len(sim)) + BN_MISMATCH_WEIGHT * mismatch

    return loss
