"""The factored gradient algebra: a convolution's weight gradient kept as P^T D, and targets kept as U V^T.

A gradient-inversion attacker differentiates its matching loss through the
dummy gradient, once per iteration. For a convolution the weight gradient
is G = P^T D (input patches P, output cotangent D); where the rows of P and
D are few (the deep layers) every quantity the cosine and the compressors'
views need is cheaper from the factors than from G (`Factored`), and a
target known as a product stays one (`LowRankTarget`). `factored_grads`
takes the factors from a model's probes; `attacks.objectives` builds the
matching losses on them. Values equal those of plain autodiff (tested).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from trustsgd_jax import compress as compress_lib


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
    entry) and sent entries are taken from the formed G (`entries`).
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


def kernel_layout(g) -> jax.Array:
    """A plain gradient tensor as the [K, C_out] matrix G (the transpose of `compress.to_matrix`)."""
    return g.reshape(-1, g.shape[-1])


def thin_products_operand(g):
    """A gradient ready for thin products G v and G^T u: `Factored` on the Gram route, formed G elsewhere.

    Where the rows N*H*W are many (the early layers), products through P
    (P^T (D v)) contract P's long leading axis, whose derivative XLA:CPU
    lays out with a physical transpose of P per product: forming G = P^T D
    once (one matmul, the observed attacker's explicit route) and
    multiplying the small G is faster there. On the Gram route P is small.
    """
    if isinstance(g, Factored) and not gram_route(g):
        p, d = g.flat()
        return p.T @ d
    return g


def times(g, v) -> jax.Array:
    """G v for a gradient (plain or `Factored`) and v [C_out, r]: [K, r]."""
    if isinstance(g, Factored):
        p, d = g.flat()
        return p.T @ (d @ v)
    return kernel_layout(g) @ v


def t_times(g, u) -> jax.Array:
    """G^T u for a gradient (plain or `Factored`) and u [K, r]: [C_out, r]."""
    if isinstance(g, Factored):
        p, d = g.flat()
        return d.T @ (p @ u)
    return kernel_layout(g).T @ u


def entries(g, indices) -> jax.Array:
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


def gram_route(g: Factored) -> bool:
    """Whether ||P^T D||^2 is cheaper as <P P^T, D D^T>: rows^2 (K + C) < rows K C."""
    p, d = g.flat()
    return gram_shape(p.shape[0], p.shape[1], d.shape[1])


def sqnorm(g) -> jax.Array:
    """||g||^2 of a gradient, a `Factored` one or a `LowRankTarget`."""
    if isinstance(g, LowRankTarget):
        return jnp.sum((g.u.T @ g.u) * (g.v.T @ g.v))
    if isinstance(g, Factored):
        if gram_route(g):
            p, d = g.flat()
            return jnp.sum((p @ p.T) * (d @ d.T))
        p, d = g.flat()
        return jnp.sum(jnp.square(p.T @ d))
    return jnp.sum(jnp.square(g))


def dot_and_sqnorm(g, t):
    """(<g, t>, ||g||^2) for a gradient tensor or a `Factored` one, against a tensor or a `LowRankTarget`."""
    if isinstance(g, Factored) and not gram_route(g):
        p, d = g.flat()
        g = p.T @ d  # the explicit route: forming G is cheaper than the Gram matrices
    if isinstance(t, LowRankTarget):
        return jnp.sum(t_times(g, t.u) * t.v), sqnorm(g)
    if isinstance(g, Factored):
        p, d = g.flat()
        return jnp.sum(d * (p @ t.reshape(p.shape[1], d.shape[1]))), sqnorm(g)
    return jnp.vdot(g, t.reshape(g.shape)), jnp.sum(jnp.square(g))


# Singular values below this fraction of the largest count as float noise in `dense_target_ranks`. Measured on
# ResNet-18 at B = 1 (32x32): the smallest genuine one is about 1e-3 of the largest in eval mode and 1e-7 in train
# mode (where it is BatchNorm's removed mean direction, at the float floor itself), float noise about 1e-8.
RANK_TOLERANCE = 1e-5


def gram_shape(rows: int, k: int, c: int) -> bool:
    return rows * (k + c) < k * c


def numerical_rank(t: np.ndarray) -> int | None:
    """Singular values above `RANK_TOLERANCE` of the largest (from the C x C Gram matrix); None if not finite."""
    t = np.asarray(t, np.float64)
    if not np.isfinite(t).all():
        return None
    sv = np.sqrt(np.maximum(np.linalg.eigvalsh(t.T @ t), 0.0))
    return int(np.sum(sv > RANK_TOLERANCE * sv.max())) if sv.max() > 0 else 0


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


def factored_grads(params, loss) -> tuple[list, jax.Array]:
    """(gradient as a list in ``jax.tree.leaves`` order, mismatch) of a loss, convolution kernels as `Factored`.

    ``loss(params, extra, mutable) -> (value, (mismatch, state))`` is a
    training loss as the attacker recomputes it (`attacks.gradients`):
    ``extra`` further variable collections, ``mutable`` the collections to
    return in ``state``. Kernels of `models.PatchesConv` layers are not
    differentiated: asked for the ``factors`` collection, their layers sow
    their patches P and expose a zero output probe (``perturbations``), whose
    gradient is the cotangent D. Every other tensor (and every tensor of a
    model without such layers, a user's module say) comes by plain autodiff.
    """
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
