"""What a gradient-inversion attacker matches: gradients of dummy images, views of a message, the loss.

For dummy images x (normalised space) with labels y, the matching loss is::

    1 - <f(x), f*>_w / (||f(x)||_w ||f*||_w)

with the cosine over *all* tensors concatenated (Geiping et al., NeurIPS
2020; optional per-tensor weights w, `tensor_weights`). The features f depend
on the threat model:

* ``observed`` (the paper's attacker): f(x) is the dummy model's full
  parameter gradient, f* = ``decompress(message)``.
* ``adaptive`` (compression-aware; cf. Aerni et al. 2024): the attacker
  passes its dummy gradient through the view of the compressor that the
  message itself defines:

  * Random-K: only the transmitted coordinates (the dummy gradient gathered
    at the shared indices vs. the sent values).
  * Top-K: the cosine over the whole gradient against the sparse message
    (which rewards a dummy gradient whose mass sits on the sent support) plus
    what the selection implies: no unsent entry exceeds the smallest sent one
    (`topk_support_penalty`).
  * PowerSGD: both factors the worker sends, M(x)^T P_hat vs. the sent Q and
    M(x) Q_prev vs. the sent P. P_hat (the orthonormalised sum of *all*
    workers' P) and Q_prev are public: every worker receives them.
  * Tensors sent in full are compared in full. QSGD and sign compression
    send a quantised copy of the whole tensor; their rounding has no useful
    derivative, so the adaptive attacker matches the decoded message (the
    same as ``observed``).

The attacker applies the model as the victim's step did (`param_grads`):
with ``train=True`` BatchNorm normalises by the statistics of the dummy
batch itself, which is exactly what a worker with local BatchNorm computes;
with synchronised BatchNorm the victim's statistics also contain the other
workers' batches, which the attacker does not have. With ``train=False`` it
uses the running averages (Geiping et al.'s setting).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trustsgd_jax import compress as compress_lib

THREATS = ("observed", "adaptive")
LAYER_WEIGHTS = ("equal", "linear")


class AttackError(ValueError):
    """A bad argument to an attack; the message names the valid choices or the fix."""


class Factored(NamedTuple):
    """A convolution's weight gradient kept as its two factors: G = P^T D.

    P [N, H, W, K] are the layer's input patches (K = kh*kw*C_in) and D
    [N, H, W, C_out] the loss gradient w.r.t. its output. The matching loss
    only needs <G, T> = <D, P T> and ||G||^2 = <P P^T, D D^T>; for the deep
    layers, where the N*H*W rows are few, those cost far less than forming G
    (the Gram trick of "ghost" per-example norms, Goodfellow 2015; Li et al.
    2022), and the attack's second derivative never writes a weight-sized
    tensor per attack.
    """

    patches: jax.Array
    cotangent: jax.Array

    def dense(self, shape) -> jax.Array:
        k, c = self.patches.shape[-1], self.cotangent.shape[-1]
        return (self.patches.reshape(-1, k).T @ self.cotangent.reshape(-1, c)).reshape(shape)


def _dot_and_sqnorm(g, t):
    """(<g, t>, ||g||^2) for a gradient tensor or a `Factored` one."""
    if not isinstance(g, Factored):
        return jnp.vdot(g, t), jnp.sum(jnp.square(g))
    k, c = g.patches.shape[-1], g.cotangent.shape[-1]
    p, d = g.patches.reshape(-1, k), g.cotangent.reshape(-1, c)
    if p.shape[0] * (k + c) < k * c:  # Gram route: rows^2 (K + C) < rows K C
        return jnp.sum(d * (p @ t.reshape(k, c))), jnp.sum((p @ p.T) * (d @ d.T))
    dense = p.T @ d
    return jnp.vdot(dense, t.reshape(k, c)), jnp.sum(jnp.square(dense))


def cosine_distance(a: list, b: list, weights) -> jax.Array:
    """1 - cosine similarity of two lists of arrays, taken over all of them concatenated.

    Entries of `a` may be `Factored` weight gradients.
    """
    pairs = [_dot_and_sqnorm(x, y) for x, y in zip(a, b, strict=True)]
    dot = sum(w * d for w, (d, _) in zip(weights, pairs, strict=True))
    na = sum(w * n for w, (_, n) in zip(weights, pairs, strict=True))
    nb = sum(w * jnp.sum(jnp.square(y)) for w, y in zip(weights, b, strict=True))
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


def param_grads(model: nn.Module, variables: dict, images, labels, train: bool = False):
    """Gradient of the mean cross-entropy w.r.t. the parameters (BatchNorm mode: see the module docstring)."""

    def loss(params):
        logits, _ = _apply(model, {**variables, "params": params}, images, train, [])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.grad(loss)(variables["params"])


def factored_param_grads(model: nn.Module, variables: dict, images, labels, train: bool = False) -> list:
    """`param_grads` as a list in ``jax.tree.leaves`` order, convolution kernels as `Factored`.

    Kernels of `models.PatchesConv` layers are not differentiated: their
    layers sow their patches and expose a zero output probe, and the gradient
    w.r.t. the probes gives the cotangents. Other tensors (and every tensor of
    a model with native convolutions) come as plain arrays.
    """
    params = variables["params"]
    shapes = jax.eval_shape(lambda: _apply(model, variables, images, train, ["factors", "perturbations"])[1])
    if "factors" not in shapes:
        return jax.tree.leaves(param_grads(model, variables, images, labels, train))
    factored = {k[:-1] for k in flax.traverse_util.flatten_dict(shapes["factors"])}
    flat = flax.traverse_util.flatten_dict(params)
    kernels = {k: v for k, v in flat.items() if k[-1] == "kernel" and k[:-1] in factored}
    others = {k: v for k, v in flat.items() if k not in kernels}
    probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])

    def loss(others, probes):
        p = flax.traverse_util.unflatten_dict({**kernels, **others})
        logits, state = _apply(model, {**variables, "params": p, "perturbations": probes}, images, train, ["factors"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state["factors"]

    (g_others, g_probes), factors = jax.grad(loss, argnums=(0, 1), has_aux=True)(others, probes)
    patches = flax.traverse_util.flatten_dict(factors)
    cotangents = flax.traverse_util.flatten_dict(g_probes)
    out: list[Any] = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        k = tuple(p.key for p in path)
        if k in kernels:
            out.append(Factored(patches[k[:-1] + ("patches",)][0], cotangents[k[:-1] + ("out",)]))
        else:
            out.append(g_others[k])
    return out


def message_leaves(msg) -> list:
    """The per-tensor messages of a message tree, in parameter leaf order."""
    return jax.tree.leaves(msg, is_leaf=compress_lib.is_message)


def _adaptive_view(m) -> str | None:
    """Which compression-aware view a message affords: 'shared_indices', 'factors', or None (compare densely)."""
    if isinstance(m, compress_lib.Sparse) and not m.indices_on_wire:
        return "shared_indices"
    if isinstance(m, compress_lib.LowRank):
        return "factors"
    return None


def target_features(msg, threat: str) -> list:
    """What the attacker matches: per tensor, the observed array."""
    out = []
    for m in message_leaves(msg):
        view = _adaptive_view(m) if threat == "adaptive" else None
        if view == "shared_indices":
            out.append(m.values)
        elif view == "factors":
            out.append(jnp.concatenate([m.q.reshape(-1), m.p.reshape(-1)]))
        else:
            out.append(m.dense())
    return out


def dummy_features(grads, msg, threat: str) -> list:
    """The dummy gradient passed through the same view of each tensor as `target_features`."""
    out = []
    for g, m in zip(jax.tree.leaves(grads), message_leaves(msg), strict=True):
        view = _adaptive_view(m) if threat == "adaptive" else None
        if view == "shared_indices":
            out.append(g.reshape(-1)[m.indices])
        elif view == "factors":
            mat = compress_lib.to_matrix(g)
            out.append(jnp.concatenate([(mat.T @ m.p_hat).reshape(-1), (mat @ m.q_prev).reshape(-1)]))
        else:
            out.append(g)
    return out


def topk_support_penalty(grads, msg, dummy_feats, target_feats) -> jax.Array:
    """What Top-K's selection reveals: every unsent entry is at most the smallest sent one.

    With the dummy gradient scaled to the norm of what was sent, the sum over
    unsent entries of relu(|g_i| - tau)^2, tau the smallest sent magnitude of
    that tensor, relative to the sent energy. Zero at the true input at the
    first step; with error memory (step t > 0) the sent entries are those of
    g + e, so it is approximate there.
    """
    sparse = [
        (g, m)
        for g, m in zip(jax.tree.leaves(grads), message_leaves(msg), strict=True)
        if isinstance(m, compress_lib.Sparse) and m.indices_on_wire
    ]
    if not sparse:
        return jnp.zeros(())
    sent = sum(jnp.sum(jnp.square(t)) for t in target_feats)
    scale = jnp.sqrt(sent / jnp.maximum(sum(jnp.sum(jnp.square(d)) for d in dummy_feats), 1e-30))
    total = jnp.zeros(())
    for g, m in sparse:
        tau = jnp.min(jnp.abs(m.values))
        unsent = jnp.abs(g.reshape(-1).at[m.indices].set(0.0)) * scale
        total = total + jnp.sum(jnp.square(jax.nn.relu(unsent - tau)))
    return total / sent


def matching_loss(model: nn.Module, variables: dict, threat: str, weights, train: bool):
    """``loss(x, msg, y)``: the attacker's matching loss for dummy images x against a message.

    The observed attacker keeps convolution kernels factored (`Factored`):
    the full gradient is never formed.
    """

    def loss(x, msg, y):
        if threat == "observed":
            return cosine_distance(
                factored_param_grads(model, variables, x, y, train), target_features(msg, threat), weights
            )
        grads = param_grads(model, variables, x, y, train)
        d, t = dummy_features(grads, msg, threat), target_features(msg, threat)
        return cosine_distance(d, t, weights) + topk_support_penalty(grads, msg, d, t)

    return loss
