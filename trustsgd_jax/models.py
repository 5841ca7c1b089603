"""Flax models of the study: ResNet-18 (CIFAR form) and a small ConvNet for CPU runs.

Normalisation is a choice because it changes what crosses the wire:

* ``batch``: BatchNorm synchronised over the data-parallel axis (``axis_name``),
  as in the paper's DDP setting. Every forward pass in training all-reduces
  each layer's batch mean and mean of squares: a second, *uncompressed*
  channel between workers, and the backward pass all-reduces their
  cotangents (`SyncBatchNorm`). Both are sown or probed, so the train step
  can count them in the wire accounting and hand them to the observer.
* ``batch_local``: BatchNorm on each worker's shard only (no communication).
* ``group``: GroupNorm (no batch statistics at all).
* ``none``: no normalisation.

In eval mode (``train=False``) BatchNorm uses its running averages, which is
how attacks apply the model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("batch", "batch_local", "group", "none")
CONV_IMPLS = ("xla", "patches", "patches_bf16")
# A data-parallel round's normalisation, as the user names it (`BatchNormSetting`).
MODEL_NORMS = ("batch", "group", "none")
BATCHNORM_SYNC = ("local", "sync")
BN_STATISTICS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class BatchNormSetting:
    """How one data-parallel round normalises: the one typed value behind every BatchNorm option.

    * ``norm``: the model's normalisation, ``batch`` (BatchNorm), ``group``
      (GroupNorm) or ``none``: the controls without batch statistics.
    * ``sync``: BatchNorm's synchronisation, ``local`` (PyTorch DDP's
      default: each worker normalises by its own batch, and DDP broadcasts
      worker 0's running buffers every step) or ``sync`` (SyncBatchNorm:
      statistics all-reduced, an uncompressed second channel).
    * ``statistics``: ``train`` (batch statistics: what training sends) or
      ``eval`` (running averages: Geiping et al.'s setting, the literature's).

    Validated once, here; a bad value is a one-line ValueError naming the choices.
    """

    norm: str = "batch"
    sync: str = "local"
    statistics: str = "train"

    def __post_init__(self) -> None:
        for field, value, choices in (
            ("norm", self.norm, MODEL_NORMS),
            ("sync", self.sync, BATCHNORM_SYNC),
            ("statistics", self.statistics, BN_STATISTICS),
        ):
            if value not in choices:
                raise ValueError(f"unknown BatchNorm {field} {value!r}; use one of {', '.join(choices)}.")

    @property
    def has_batch_statistics(self) -> bool:
        """Whether the round's message depends on batch statistics (BatchNorm in train mode)."""
        return self.norm == "batch" and self.statistics == "train"


def im2col(x, kernel_size, strides, padding):
    """[N, H, W, C] -> patches [N, H', W', kh*kw*C] in the (kh, kw, C) order of a flax kernel.

    Gathered by strided slices: pure data movement, whose adjoint is a pad.
    """
    kh, kw = kernel_size
    sh, sw = strides
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    h, w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    cols = [x[:, i : i + (h - 1) * sh + 1 : sh, j : j + (w - 1) * sw + 1 : sw, :] for i in range(kh) for j in range(kw)]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


class PatchesConv(nn.Module):
    """``nn.Conv`` (same parameters, names and initialisers) as im2col + matmul.

    Why: gradient inversion differentiates the weight gradient once more.
    XLA:CPU runs native weight-gradient convolutions inside a ``while`` loop
    (the attack's ``lax.scan`` chunks) through its slow generic emitter (the
    README's benchmarks give the figures), and under ``vmap``
    over attacks they become grouped convolutions, slower still. As matmuls
    over patches, every convolution and every derivative of it runs in the
    fast dot kernels. Undilated, ungrouped convolutions only.

    When the ``"factors"`` collection is mutable (the attack asks for it) the
    layer also sows its patches P and adds a zero ``"perturbations"`` probe to
    its output z = P W, so ``jax.grad`` w.r.t. the probe gives D = dL/dz. The
    weight gradient is then P^T D, which the attack never needs to form
    (see ``attacks.gradinv.Factored``).
    """

    features: int
    kernel_size: Sequence[int]
    strides: Any = 1
    padding: Any = "SAME"
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    # None: fp32 matmuls. jnp.bfloat16: bf16 inputs, fp32 accumulation and output (CPUs with AMX/AVX512-BF16 and
    # GPUs run these several times faster); parameters, activations and the sown patches stay fp32.
    dot_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        strides = (self.strides, self.strides) if isinstance(self.strides, int) else tuple(self.strides)
        padding = self.padding
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
        patches = im2col(x, (kh, kw), strides, padding)
        w = kernel.reshape(-1, self.features)
        if self.dot_dtype is None:
            y = jnp.einsum("nhwk,ko->nhwo", patches, w)
        else:
            y = jnp.einsum(
                "nhwk,ko->nhwo",
                patches.astype(self.dot_dtype),
                w.astype(self.dot_dtype),
                preferred_element_type=jnp.float32,
            )
        if self.is_mutable_collection("factors") and not self.is_initializing():
            self.sow("factors", "patches", patches)
            y = self.perturb("out", y)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,))
        return y


def _conv(impl: str):
    if impl == "patches":
        return PatchesConv
    if impl == "patches_bf16":
        return functools.partial(PatchesConv, dot_dtype=jnp.bfloat16)
    if impl == "xla":
        return nn.Conv
    raise ValueError(f"unknown conv_impl {impl!r}; use one of {CONV_IMPLS}.")


class SyncBatchNorm(nn.Module):
    """``nn.BatchNorm(axis_name=...)`` in train mode, written out so that its two all-reduces can be observed.

    The same computation as Flax's (``use_fast_variance``): per channel, the
    worker's batch mean and mean of squares s_w = [mean(x), mean(x^2)], their
    all-reduce s = (1/N) sum_w s_w, var = max(0, s[1] - s[0]^2), then
    (x - s[0]) rsqrt(var + eps) scale + bias, and the running averages
    updated with momentum. The same parameter and buffer names, so a model
    switches between this and ``nn.BatchNorm`` freely.

    What crosses the wire, per layer and step (all sown into ``wire`` or
    exposed as probes in ``perturbations``, for `train.make_step` to count and
    hand to the observer): forward, s_w sent and s received; backward (the
    transpose of the pmean), dL_w/ds sent (the cotangent of the probe
    ``global``) and (1/N) sum_w dL_w/ds received (the cotangent of the probe
    ``local``). Without a ``perturbations`` collection the probes are absent.
    """

    axis_name: str
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,))
        axes = tuple(range(x.ndim - 1))
        local = jnp.stack([jnp.mean(x, axes), jnp.mean(jnp.square(x), axes)])
        self.sow("wire", "bn_mean", local[0])
        self.sow("wire", "bn_mean_sq", local[1])
        local = self.perturb("local", local)
        reduced = jax.lax.pmean(local, self.axis_name)
        self.sow("wire", "bn_received", reduced)
        reduced = self.perturb("global", reduced)
        mean, var = reduced[0], jnp.maximum(0.0, reduced[1] - jnp.square(reduced[0]))
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


class Norm(nn.Module):
    kind: str = "batch"
    axis_name: str | None = None  # only used by kind == "batch"

    @nn.compact
    def __call__(self, x, train: bool):
        if self.kind in ("batch", "batch_local"):
            if train and self.kind == "batch" and self.axis_name is not None:
                return SyncBatchNorm(self.axis_name, name="BatchNorm_0")(x)
            if self.is_mutable_collection("moments") and not self.is_initializing():
                # The attacker's own batch statistics, for objectives that match the wire's (`objectives`).
                axes = tuple(range(x.ndim - 1))
                self.sow("moments", "local", jnp.stack([jnp.mean(x, axes), jnp.mean(jnp.square(x), axes)]))
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="BatchNorm_0")(x)
        if self.kind == "group":
            return nn.GroupNorm(num_groups=min(32, x.shape[-1]))(x)
        if self.kind == "none":
            return x
        raise ValueError(f"unknown norm {self.kind!r}; use one of {NORMS}.")


class ConvNet(nn.Module):
    """Three 3x3 convolutions (the last two strided) and a linear head: ~0.1M parameters at width 32."""

    num_classes: int = 10
    width: int = 32
    norm: str = "batch"
    axis_name: str | None = None
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, (features, stride) in enumerate(((self.width, 1), (2 * self.width, 2), (2 * self.width, 2))):
            x = _conv(self.conv_impl)(
                features, (3, 3), strides=stride, padding=1, use_bias=self.norm == "none", name=f"Conv_{i}"
            )(x)
            x = Norm(self.norm, self.axis_name, name=f"norm{i}")(x, train)
            x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
    features: int
    stride: int
    norm: str
    axis_name: str | None
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda f, k, s, name: _conv(self.conv_impl)(
            f, (k, k), strides=s, padding=k // 2, use_bias=False, name=name
        )
        y = conv(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(Norm(self.norm, self.axis_name, name="norm1")(y, train))
        y = conv(self.features, 3, 1, "conv2")(y)
        y = Norm(self.norm, self.axis_name, name="norm2")(y, train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, self.stride, "shortcut_conv")(x)
            x = Norm(self.norm, self.axis_name, name="shortcut_norm")(x, train)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 in its CIFAR form (He et al. 2016; 3x3 stem, no max-pool), any HxWxC input."""

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    norm: str = "batch"
    axis_name: str | None = None
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _conv(self.conv_impl)(self.width, (3, 3), padding=1, use_bias=False, name="stem_conv")(x)
        x = nn.relu(Norm(self.norm, self.axis_name, name="stem_norm")(x, train))
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(
                    self.width * 2**i, stride, self.norm, self.axis_name, self.conv_impl, name=f"layer{i + 1}_{j}"
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


MODELS = {"convnet": ConvNet, "resnet18": ResNet18}


def make_model(name: str, num_classes: int, norm: str = "batch", axis_name: str | None = None, **kw: Any) -> nn.Module:
    """Builds a model by name; `axis_name` is the data-parallel axis synchronised BatchNorm reduces over."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODELS)}.")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}.")
    return MODELS[name](num_classes=num_classes, norm=norm, axis_name=axis_name, **kw)


def init_variables(model: nn.Module, rng, image_shape) -> dict:
    """Initial variables ({'params', 'batch_stats'?}) for inputs of shape (H, W, C)."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return dict(variables)
