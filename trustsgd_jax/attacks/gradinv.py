"""Gradient inversion against what one worker puts on the wire (Geiping et al., NeurIPS 2020).

The attacker is the honest-but-curious aggregator. It knows the model (its
parameters at the attacked step, applied in eval mode as the victim computes
its gradient, as in Geiping et al.'s setting), the compressor and its
configuration, the labels (``label_mode="known"``, the paper's setting) or
infers them (``"idlg"``), and it receives the victim's message. It does not
know the victim's error-feedback memory: at the first step the memory is
zero; at step t of a real run (``compressor_state`` from training) the
message carries memory the attacker cannot subtract.

Objective, for dummy images x (normalised space) with labels y::

    1 - <f(x), f*>_w / (||f(x)||_w ||f*||_w)  +  tv * TV(x)

where the cosine runs over *all* tensors concatenated (optional per-tensor
weights w), TV is the anisotropic total variation (mean absolute difference
of neighbouring pixels, both directions), and the features f depend on the
threat model:

* ``observed`` (the paper's attacker): f(x) is the dummy model's full
  parameter gradient, f* = ``decompress(message)``.
* ``adaptive`` (compression-aware; cf. Aerni et al. 2024): the attacker
  applies the same operator to its dummy gradient. Random-K: only the
  transmitted coordinates (dummy gradient gathered at the shared indices vs.
  the sent values). Top-K: the selection itself is information (the sent
  entries are the largest), so the attacker keeps the cosine over the whole
  gradient against the sparse message, which rewards a dummy gradient whose
  mass sits on the sent support, and adds what the selection implies: no
  unsent entry exceeds the smallest sent one (`topk_support_penalty`). We
  measured the variant that matches the transmitted coordinates only: it
  discards the support information and reconstructs *worse* than the
  observed attacker (SSIM 0.11 vs 0.31, ConvNet, CIFAR-10, level 1, 400
  iterations), so it is not the adaptive attacker here. PowerSGD: both
  factors the worker sends: the dummy matrix projected on the public
  orthonormal P_hat, M(x)^T P_hat, vs. the sent Q, and M(x) Q_prev (Q_prev
  public) vs. the sent P. Measured (ConvNet, 2 images, 400 iterations):
  much stronger than observed on MNIST (rank 4: SSIM 0.99 vs 0.78) but
  weaker on CIFAR-10 (0.39 vs 0.47), where the observed cosine's
  normalisation by the full dummy gradient (energy outside span(P_hat) is
  penalised) carries information the factor match drops; the reports show
  both attackers side by side.
  Tensors sent in full are compared in full. QSGD and sign compression
  transmit a quantised version of the whole tensor; their rounding is not
  differentiable, so the adaptive attacker matches the decoded message (the
  same as ``observed``).

Optimisation as in the reference implementations: Adam (lr 0.1) on the
*sign* of the input gradient, learning rate x0.1 at 3/8, 5/8 and 7/8 of the
iterations, pixels clipped to the valid normalised range after every step,
random-normal start, several restarts of which the one with the lowest final
matching loss wins. The iterations run in ``lax.scan`` chunks (a progress bar
reports between chunks) and independent attacks (images, restarts) are
batched with ``vmap`` in one program.

Speed (measured, ``experiments/bench_gradinv.py``): the attack runs this
package's models with ``conv_impl="patches"`` (`models.PatchesConv`, the
same parameters; `invert_gradients` switches them itself), because XLA:CPU
runs native weight-gradient convolutions inside the scan loop through a
slow generic emitter. For the observed attacker the
convolution kernels' gradients stay factored (`Factored`), which removes
the weight-sized tensors the second derivative would otherwise write for
each attack.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trustsgd_jax import compress as compress_lib
from trustsgd_jax import data as data_lib
from trustsgd_jax import metrics as metrics_lib

THREATS = ("observed", "adaptive")
LABEL_MODES = ("known", "idlg")


class AttackConfig(NamedTuple):
    """Knobs of the attack; defaults reproduce Geiping et al.'s CIFAR setting."""

    iterations: int = 24000
    learning_rate: float = 0.1
    tv: float = 1e-4
    restarts: int = 1
    signed: bool = True  # Adam on sign(grad x)
    boxed: bool = True  # clip pixels to the valid range after every step
    layer_weights: str = "equal"  # or "linear": weights decreasing from the first tensor to the last
    chunk: int = 100  # iterations per compiled scan chunk (progress granularity)
    parallel: int = 8  # independent attacks batched in one program
    seed: int = 0


class AttackError(ValueError):
    pass


# ---------------------------------------------------------------- the loss


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
    pairs = [_dot_and_sqnorm(x, y) for x, y in zip(a, b)]
    dot = sum(w * d for w, (d, _) in zip(weights, pairs))
    na = sum(w * n for w, (_, n) in zip(weights, pairs))
    nb = sum(w * jnp.sum(jnp.square(y)) for w, y in zip(weights, b))
    # The floor only matters where the dummy gradient vanishes exactly (sqrt'(0) = inf).
    return 1.0 - dot / (jnp.sqrt(jnp.maximum(na, 1e-30)) * jnp.sqrt(nb))


def total_variation(x) -> jax.Array:
    """Anisotropic TV of NHWC images: mean |x[h+1]-x[h]| + mean |x[w+1]-x[w]|."""
    return jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) + jnp.mean(jnp.abs(x[:, :, 1:] - x[:, :, :-1]))


def tensor_weights(n: int, kind: str) -> list[float]:
    if kind == "equal":
        return [1.0] * n
    if kind == "linear":
        return [float(i) / n for i in range(n, 0, -1)]
    raise AttackError(f"unknown layer_weights {kind!r}; use 'equal' or 'linear'.")


def param_grads(model: nn.Module, variables: dict, images, labels):
    """Gradient of the mean cross-entropy w.r.t. the parameters, model in eval mode."""

    def loss(params):
        logits = model.apply({**variables, "params": params}, images, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.grad(loss)(variables["params"])


def factored_param_grads(model: nn.Module, variables: dict, images, labels) -> list:
    """`param_grads` as a list in ``jax.tree.leaves`` order, convolution kernels as `Factored`.

    Kernels of `models.PatchesConv` layers are not differentiated: their
    layers sow their patches and expose a zero output probe, and the gradient
    w.r.t. the probes gives the cotangents. Other tensors (and every tensor of
    a model with native convolutions) come as plain arrays.
    """
    params = variables["params"]
    shapes = jax.eval_shape(lambda: model.apply(variables, images, train=False,
                                                mutable=["factors", "perturbations"])[1])
    if "factors" not in shapes:
        return jax.tree.leaves(param_grads(model, variables, images, labels))
    factored = {k[:-1] for k in flax.traverse_util.flatten_dict(shapes["factors"])}
    flat = flax.traverse_util.flatten_dict(params)
    kernels = {k: v for k, v in flat.items() if k[-1] == "kernel" and k[:-1] in factored}
    others = {k: v for k, v in flat.items() if k not in kernels}
    probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])

    def loss(others, probes):
        p = flax.traverse_util.unflatten_dict({**kernels, **others})
        logits, state = model.apply({**variables, "params": p, "perturbations": probes}, images, train=False,
                                    mutable=["factors"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state["factors"]

    (g_others, g_probes), factors = jax.grad(loss, argnums=(0, 1), has_aux=True)(others, probes)
    patches = flax.traverse_util.flatten_dict(factors)
    cotangents = flax.traverse_util.flatten_dict(g_probes)
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        k = tuple(p.key for p in path)
        if k in kernels:
            out.append(Factored(patches[k[:-1] + ("patches",)][0], cotangents[k[:-1] + ("out",)]))
        else:
            out.append(g_others[k])
    return out


def _messages(msg):
    return jax.tree.leaves(msg, is_leaf=compress_lib._is_message)


def target_features(msg, threat: str) -> list:
    """What the attacker matches: per tensor, the observed array."""
    out = []
    for m in _messages(msg):
        if threat == "adaptive" and isinstance(m, compress_lib.Sparse) and not m.indices_on_wire:
            out.append(m.values)
        elif threat == "adaptive" and isinstance(m, compress_lib.LowRank):
            out.append(jnp.concatenate([m.q.reshape(-1), m.p.reshape(-1)]))
        else:
            out.append(m.dense())
    return out


def dummy_features(grads, msg, threat: str) -> list:
    """The dummy gradient passed through the same view of each tensor as `target_features`."""
    out = []
    for g, m in zip(jax.tree.leaves(grads), _messages(msg)):
        if threat == "adaptive" and isinstance(m, compress_lib.Sparse) and not m.indices_on_wire:
            out.append(g.reshape(-1)[m.indices])
        elif threat == "adaptive" and isinstance(m, compress_lib.LowRank):
            mat = compress_lib._to_matrix(g)
            out.append(jnp.concatenate([(mat.T @ m.p_hat).reshape(-1), (mat @ m.q_prev).reshape(-1)]))
        else:
            out.append(g)
    return out


def topk_support_penalty(grads, msg, dummy_feats, target_feats) -> jax.Array:
    """What Top-K's selection reveals: every unsent entry is at most the smallest sent one.

    The adaptive attacker uses it as a penalty, zero at the true input (at
    the first step; error memory makes it approximate later): with the dummy
    gradient scaled to the norm of what was sent, sum over unsent entries of
    relu(|g_i| - tau)^2, tau the smallest sent magnitude of that tensor,
    relative to the sent energy. Without it, matching only the transmitted
    coordinates discards the support information that a cosine over the
    whole gradient (the `observed` attacker) still uses.
    """
    sparse = [(g, m) for g, m in zip(jax.tree.leaves(grads), _messages(msg))
              if isinstance(m, compress_lib.Sparse) and m.indices_on_wire]
    if not sparse:
        return jnp.zeros(())
    sent = sum(jnp.sum(jnp.square(t)) for t in target_feats)
    scale = jnp.sqrt(sent / jnp.maximum(sum(jnp.sum(jnp.square(d)) for d in dummy_feats), 1e-30))
    total = 0.0
    for g, m in sparse:
        tau = jnp.min(jnp.abs(m.values))
        unsent = jnp.abs(g.reshape(-1).at[m.indices].set(0.0)) * scale
        total = total + jnp.sum(jnp.square(jax.nn.relu(unsent - tau)))
    return total / sent


# ---------------------------------------------------------------- the victim


def victim_message(model, variables, images, labels, compressor: compress_lib.Compressor, compressor_state=None):
    """The message the victim worker sends for its batch (a single worker's reduce).

    ``compressor_state`` is the victim's state at the attacked step (error
    memory, warm-start Q) from a training run; None means the first step.
    """
    grads = param_grads(model, variables, images, labels)
    state = compressor.init(variables["params"]) if compressor_state is None else compressor_state
    return compressor.reduce(grads, state, None)[2]


def infer_labels_idlg(msg, num_classes: int, batch_size: int = 1) -> np.ndarray:
    """Labels from the sign of the head's weight gradient (iDLG, Zhao et al. 2020).

    With non-negative penultimate features h (ReLU), the head-kernel gradient
    column of class c is h (p_c - y_c): negative only for the true label. For
    B > 1 the B most negative columns are returned (assumes distinct labels).
    """
    seen = compress_lib.decompress(msg)
    heads = [(path, g) for path, g in jax.tree_util.tree_leaves_with_path(seen)
             if g.ndim == 2 and g.shape[-1] == num_classes and "kernel" in jax.tree_util.keystr(path)]
    if len(heads) != 1:
        raise AttackError(f"iDLG needs exactly one 2-D head kernel with {num_classes} outputs; found {len(heads)}.")
    col = np.asarray(heads[0][1]).sum(0)
    return np.sort(np.argsort(col)[:batch_size]).astype(np.int32)


# ---------------------------------------------------------------- the attack


def _optimizer(config: AttackConfig, iterations: int) -> optax.GradientTransformation:
    t = iterations
    schedule = optax.piecewise_constant_schedule(
        config.learning_rate, {int(t * 3 / 8): 0.1, int(t * 5 / 8): 0.1, int(t * 7 / 8): 0.1})
    parts = [optax.adam(schedule)]
    if config.signed:
        parts.insert(0, optax.stateless(lambda u, p=None: jax.tree.map(jnp.sign, u)))
    return optax.chain(*parts)


def _make_attack_fns(model, variables, threat, config, lo, hi, n_tensors, width=None):
    weights = tensor_weights(n_tensors, config.layer_weights)
    opt = _optimizer(config, config.iterations)

    def matching_loss(x, msg, y):
        if threat == "observed":  # the full gradient: convolution kernels never formed
            return cosine_distance(factored_param_grads(model, variables, x, y), target_features(msg, threat),
                                   weights)
        grads = param_grads(model, variables, x, y)
        d, t = dummy_features(grads, msg, threat), target_features(msg, threat)
        loss = cosine_distance(d, t, weights)
        if threat == "adaptive":
            loss = loss + topk_support_penalty(grads, msg, d, t)
        return loss

    def objective(x, msg, y):
        return matching_loss(x, msg, y) + config.tv * total_variation(x)

    def step(carry, _):
        x, opt_state, msg, y = carry
        loss, g = jax.value_and_grad(objective)(x, msg, y)
        updates, opt_state = opt.update(g, opt_state, x)
        x = optax.apply_updates(x, updates)
        if config.boxed:
            x = jnp.clip(x, lo, hi)
        return (x, opt_state, msg, y), loss

    def run_chunk(x, opt_state, msg, y, length):
        (x, opt_state, _, _), losses = jax.lax.scan(step, (x, opt_state, msg, y), None, length=length)
        return x, opt_state, losses[-1]

    if (config.parallel if width is None else width) == 1:
        # One attack: no vmap. A width-1 vmap still rewrites every matmul as a
        # batched one: ResNet-18 ran at 6.5 instead of 8.4 it/s (XLA:CPU).
        def one(f):
            def g(*args):
                out = f(*jax.tree.map(lambda t: t[0], args[:4]), *args[4:])
                return jax.tree.map(lambda t: t[None], out)
            return g

        return (jax.jit(one(opt.init)), jax.jit(one(run_chunk), static_argnums=4),
                jax.jit(one(matching_loss)))
    chunk = jax.jit(jax.vmap(run_chunk, in_axes=(0, 0, 0, 0, None)), static_argnums=4)
    final = jax.jit(jax.vmap(matching_loss))
    init = jax.jit(jax.vmap(opt.init))
    return init, chunk, final


@dataclasses.dataclass
class AuditResult:
    reconstructions: np.ndarray  # [N*B, H, W, C] in [0, 1], matched to the originals' order
    originals: np.ndarray  # [N*B, H, W, C] in [0, 1]
    per_image: dict  # ssim / psnr / mse arrays
    summary: dict  # mean / std of each metric
    labels_used: np.ndarray
    matching_loss: np.ndarray  # [N] best final cosine loss per attacked batch
    wire: compress_lib.WireCost
    threat: str
    iterations: int


def _validate(model, variables, images, labels, threat, label_mode, config, batch_size):
    if threat not in THREATS:
        raise AttackError(f"unknown threat model {threat!r}; use one of {THREATS}.")
    if label_mode not in LABEL_MODES:
        raise AttackError(f"unknown label_mode {label_mode!r}; use one of {LABEL_MODES}.")
    if config.iterations < 1:
        raise AttackError(f"the attack needs iterations >= 1, got {config.iterations}.")
    if config.restarts < 1 or config.chunk < 1 or config.parallel < 1:
        raise AttackError("restarts, chunk and parallel must be >= 1.")
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise AttackError(f"images must be normalised floats (data.normalize), got dtype {images.dtype}.")
    if images.ndim != 4:
        raise AttackError(f"images must be [N, H, W, C], got shape {images.shape}.")
    if batch_size < 1 or len(images) % batch_size:
        raise AttackError(f"{len(images)} images do not split into victim batches of {batch_size}.")
    try:
        out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images[:1])
    except Exception as e:  # flax/lax raise many types for a wrong input shape
        raise AttackError(f"the model does not take images of shape {images.shape[1:]} ({type(e).__name__}: "
                          f"{str(e)[:200]}); give images shaped like its training data.") from e
    num_classes = out.shape[-1]
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise AttackError(f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise AttackError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}].")
    return images.astype(np.float32), labels.astype(np.int32), num_classes


def check_message(msg, params) -> None:
    """Rejects a message that was not made for `params` (another model, another compressor tree)."""
    seen = jax.eval_shape(compress_lib.decompress, msg)
    if jax.tree.structure(seen) != jax.tree.structure(params) or any(
            s.shape != np.shape(p) for s, p in zip(jax.tree.leaves(seen), jax.tree.leaves(params))):
        raise AttackError("the message does not match the model's parameters (a message from another model?).")
    if not any(np.any(np.asarray(t)) for t in jax.tree.leaves(compress_lib.decompress(msg))):
        raise AttackError("the observed gradient is all zeros: the cosine objective is undefined. "
                          "(A step skipped for NaN/Inf, or a message from a worker with no data?)")


def invert_gradients(model, variables, messages: list, labels, image_shape, dataset: str, *,
                     threat: str = "observed", config: AttackConfig = AttackConfig(), progress: bool = True):
    """Reconstructs one batch of images per message. Returns (images [N, B, H, W, C] normalised, losses [N]).

    `messages` are single-worker messages (one per victim batch), `labels`
    [N, B] the labels the attacker uses.
    """
    for m in messages:
        check_message(m, variables["params"])
    if getattr(model, "conv_impl", None) == "xla":  # our models: the same model, fast to attack (see above)
        model = model.clone(conv_impl="patches")
    labels = np.asarray(labels, np.int32)
    n, b = labels.shape
    lo, hi = (jnp.asarray(v, jnp.float32) for v in data_lib.pixel_bounds(dataset))
    n_tensors = len(jax.tree.leaves(variables["params"]))
    width = min(config.parallel, n * config.restarts)
    init, chunk, final = _make_attack_fns(model, variables, threat, config, lo, hi, n_tensors, width)
    # Attack j = (batch j // R, restart j % R).
    jobs = [(i, r) for i in range(n) for r in range(config.restarts)]
    results_x = np.zeros((len(jobs), b, *image_shape), np.float32)
    results_loss = np.zeros((len(jobs),), np.float32)
    from tqdm.auto import tqdm

    total = len(jobs) * config.iterations
    bar = tqdm(total=total, disable=not progress, desc=f"invert ({threat})", unit="it", dynamic_ncols=True)
    for start in range(0, len(jobs), config.parallel):
        group = jobs[start:start + config.parallel]
        # Pad the last group to the compiled width (padding attacks repeat the first and are dropped).
        padded = group + [group[0]] * (width - len(group))
        msg = jax.tree.map(lambda *xs: jnp.stack(xs), *[messages[i] for i, _ in padded])
        y = jnp.asarray(np.stack([labels[i] for i, _ in padded]))
        keys = [jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), i), r) for i, r in padded]
        x = jnp.stack([jax.random.normal(k, (b, *image_shape), jnp.float32) for k in keys])
        opt_state = init(x)
        done = 0
        while done < config.iterations:
            length = min(config.chunk, config.iterations - done)
            x, opt_state, _ = chunk(x, opt_state, msg, y, length)
            jax.block_until_ready(x)
            done += length
            bar.update(length * len(group))
        losses = np.asarray(final(x, msg, y))
        results_x[start:start + len(group)] = np.asarray(x)[:len(group)]
        results_loss[start:start + len(group)] = losses[:len(group)]
    bar.close()
    results_loss = np.where(np.isfinite(results_loss), results_loss, np.inf)
    best = results_loss.reshape(n, config.restarts).argmin(1)
    idx = np.arange(n) * config.restarts + best
    return results_x[idx], results_loss[idx]


def audit(model: nn.Module, variables: dict, images, labels, compressor: compress_lib.Compressor, *,
          dataset: str, threat: str = "observed", config: AttackConfig = AttackConfig(), batch_size: int = 1,
          label_mode: str = "known", compressor_state: Any = None, progress: bool = True) -> AuditResult:
    """Attacks every victim batch of `images` (normalised, consecutive groups of `batch_size`) and scores it.

    Returns reconstructions matched to the originals (Hungarian on MSE within
    each batch), per-image SSIM / PSNR / MSE on [0, 1] images, and their
    mean / std.
    """
    images, labels, num_classes = _validate(model, variables, images, labels, threat, label_mode, config,
                                            batch_size)
    n = len(images) // batch_size
    xb = images.reshape(n, batch_size, *images.shape[1:])
    yb = labels.reshape(n, batch_size)
    make_msg = jax.jit(lambda x, y: victim_message(model, variables, x, y, compressor, compressor_state))
    messages = [make_msg(xb[i], yb[i]) for i in range(n)]
    if label_mode == "idlg":
        yb = np.stack([infer_labels_idlg(m, num_classes, batch_size) for m in messages])
    rec, losses = invert_gradients(model, variables, messages, yb, images.shape[1:], dataset, threat=threat,
                                   config=config, progress=progress)
    originals = np.clip(np.asarray(data_lib.denormalize(xb, dataset)), 0, 1)
    rec01 = np.clip(np.asarray(data_lib.denormalize(rec, dataset)), 0, 1)
    for i in range(n):
        rec01[i] = rec01[i][metrics_lib.match(originals[i], rec01[i])]
    flat_o = originals.reshape(-1, *images.shape[1:])
    flat_r = rec01.reshape(-1, *images.shape[1:])
    per_image = metrics_lib.image_scores(flat_o, flat_r)
    summary = {k: metrics_lib.summarize(v) for k, v in per_image.items()}
    return AuditResult(flat_r, flat_o, per_image, summary, np.asarray(yb).reshape(-1), losses,
                       compress_lib.message_cost(messages[0]), threat, config.iterations)
