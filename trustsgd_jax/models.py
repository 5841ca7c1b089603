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

The adapters at the end (`for_data_parallel`, `for_attack`, `for_inference`)
are the one place that turns a model into the form a training round, an
attack or inference runs. They take the project's models (fields ``norm``,
``axis_name``, ``conv_impl``) and any other Flax module whose ``__call__(x)``
returns logits [B, classes], with or without a ``train`` argument
(`OwnModule`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
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
    (see ``attacks.factored.Factored``).
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


# How `adapt` runs a model (recorded by `attacks.audit`): one of the project's models, or a user's module wrapped.
PROJECT_MODEL = "project-model"
WRAPPED_USER_MODULE = "wrapped-user-module"


def is_project_model(model: nn.Module) -> bool:
    """Whether `model` is one of this package's models (`MODELS`), whose fields the adapters set."""
    return isinstance(model, tuple(MODELS.values()))


def train_keyword(model: nn.Module, declared: bool | str | None = None) -> str | None:
    """The keyword of ``model.__call__`` that takes the train flag, or None where it takes none.

    ``declared``: None detects it (``train`` if ``__call__`` has a parameter
    of that name); False: the module takes none; True: ``train``; a string:
    that keyword (e.g. ``"training"``), which ``__call__`` must accept. A
    one-line ValueError otherwise.
    """
    params = inspect.signature(type(model).__call__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if declared is None:
        return "train" if "train" in params else None
    if declared is False:
        return None
    name = "train" if declared is True else declared
    if not isinstance(name, str) or not (name in params or takes_any):
        raise ValueError(
            f"{type(model).__name__}.__call__ takes no argument {name!r} (declared as its train flag); its "
            f"parameters are {list(params)[1:]}."
        )
    return name


class OwnModule(nn.Module):
    """A user's Flax module as rounds and attacks call it, ``__call__(x, train=False)``, with the user's variables.

    ``module`` is the user's module; its ``__call__(x)`` returns logits [B,
    classes]. ``train_keyword``: the keyword of that ``__call__`` which takes
    the train flag (`train_keyword`), or None: then ``train`` is not passed
    on and the module runs as written. The module shares this wrapper's scope
    (``nn.share_scope``), so the parameter tree is the user's own and the
    user's ``variables`` apply unchanged (tested).

    ``alone_axis``: the axis name the module's own ``nn.BatchNorm(axis_name=...)``
    reduces over, for the attacker, which applies the module outside any
    data-parallel round: `apply` then binds that axis to a single member
    (``jax.vmap`` of size 1), so train-mode BatchNorm normalises by the batch
    it is given, as the project's models do with ``axis_name=None``. None in
    the round, where ``pmap`` binds the axis to the workers.
    """

    module: nn.Module
    train_keyword: str | None = None
    alone_axis: str | None = None

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, x, train: bool = False):
        if self.train_keyword is None:
            return self.module(x)
        return self.module(x, **{self.train_keyword: train})

    @nn.nowrap
    def apply(self, variables, *args, **kwargs):
        if self.alone_axis is None:
            return super().apply(variables, *args, **kwargs)
        apply = super().apply

        def one(variables, *args):
            return apply(variables, *args, **kwargs)

        out = jax.vmap(one, in_axes=None, axis_name=self.alone_axis, axis_size=1)(variables, *args)
        return jax.tree.map(lambda t: t[0], out)


def adapt(model: nn.Module, train_argument: bool | str | None = None) -> nn.Module:
    """`model` as the adapters take it: the project's models and `OwnModule`s as they are, any other module wrapped.

    ``train_argument`` declares a user's module's train flag (`train_keyword`;
    None detects it). The project's models always take ``train``.
    """
    if is_project_model(model) or isinstance(model, OwnModule):
        if train_argument not in (None, True, "train"):
            raise ValueError(f"{type(model).__name__} takes its train flag as 'train'; got {train_argument!r}.")
        return model
    return OwnModule(model, train_keyword(model, train_argument))


def adapter(model: nn.Module) -> str:
    """How `adapt` runs `model`: `PROJECT_MODEL` or `WRAPPED_USER_MODULE`."""
    return PROJECT_MODEL if is_project_model(model) else WRAPPED_USER_MODULE


def for_data_parallel(
    model: nn.Module, bn: BatchNormSetting, axis_name: str, train_argument: bool | str | None = None
) -> nn.Module:
    """`model` as a data-parallel training step runs it over the workers' axis `axis_name`.

    The project's models: native convolutions, and BatchNorm synchronised
    over `axis_name` (``bn.sync == "sync"``, `SyncBatchNorm`, whose traffic
    the step can observe) or each worker's own (``"local"``); models without
    BatchNorm are unchanged by ``bn``. A user's module runs as built
    (`adapt`): its ``nn.BatchNorm`` is local, or synchronised where the user
    built it with ``axis_name=axis_name``. Only ``bn.sync`` is read here; the
    statistics are the step's (`train.make_step`).
    """
    if not is_project_model(model):
        return adapt(model, train_argument).clone(alone_axis=None)
    changes: dict[str, Any] = {"axis_name": axis_name, "conv_impl": "xla"}
    if model.norm in ("batch", "batch_local"):
        changes["norm"] = "batch" if bn.sync == "sync" else "batch_local"
    return model.clone(**changes)


MATMUL_DTYPES = ("float32", "bfloat16")


def for_attack(
    model: nn.Module,
    matmul_dtype: str = "float32",
    alone_axis: str | None = None,
    train_argument: bool | str | None = None,
) -> nn.Module:
    """`model` as an attacker applies it, outside any round: no data-parallel axis, the same parameters.

    The project's models: im2col convolutions (`PatchesConv`; XLA:CPU runs
    native weight-gradient convolutions inside the attack's loop through a
    slow emitter), ``matmul_dtype="bfloat16"`` for bf16 matmul inputs with
    fp32 accumulation, and no axis: BatchNorm in train mode normalises by the
    batch it is given. A user's module runs as built (`adapt`), fp32 only;
    ``alone_axis`` names the axis its own ``nn.BatchNorm`` reduces over, if
    any (`OwnModule`). A one-line ValueError for what cannot apply.
    """
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"unknown matmul_dtype {matmul_dtype!r}; use one of {MATMUL_DTYPES}.")
    if not is_project_model(model):
        if matmul_dtype != "float32":
            raise ValueError(
                f"matmul_dtype={matmul_dtype!r} needs one of the project's models (it swaps their convolutions); "
                "a user's module runs as built, in float32."
            )
        return adapt(model, train_argument).clone(alone_axis=alone_axis)
    changes: dict[str, Any] = {"conv_impl": "patches" if matmul_dtype == "float32" else "patches_bf16"}
    if model.axis_name is not None:
        changes["axis_name"] = None
    return model.clone(**changes)


def for_inference(model: nn.Module) -> nn.Module:
    """`model` to run inference with: the project's models with native convolutions (the im2col form holds kh*kw
    copies of every activation and inference needs no weight gradients); any other module unchanged."""
    if is_project_model(model) and model.conv_impl != "xla":
        return model.clone(conv_impl="xla")
    return model
