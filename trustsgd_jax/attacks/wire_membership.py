r"""The wire MIA: membership inference from one worker's compressed messages over a training run.

Threat model. An honest-but-curious observer of worker 0's link (a parameter
server, the aggregator, a tap) records, at every step t = 0 .. T-1 of
data-parallel training:

* m_t, the gradient message worker 0 sent (`compress.as_sent` of its
  ``grads`` message): PowerSGD's P_0 and Q_0 with the public P_hat and Q_prev,
  Top-K's values and indices, a dense gradient at SGD;
* theta_t, the model the step started from (parameters and running
  BatchNorm averages), which every worker holds;
* with synchronised BatchNorm, the batch statistics the step normalised with:
  worker 0's own contribution travels uncompressed beside its message
  (`train.make_step`'s ``bn``), and their all-reduce, which every worker
  receives, comes back over the same link.

For a candidate sample (x, y) it asks: was x in worker 0's data? This is the
membership counterpart of gradient inversion, and the gradient-matching
white-box attack of Nasr, Shokri and Houmansadr (S&P 2019), who use per-step
gradients of the target sample as attack features, and of Melis, Song, De
Cristofaro and Shmatikov (S&P 2019), who infer membership from the updates
of one federated participant, taken to what a compressor leaves on the wire.

Per-step similarity. Worker 0's gradient at step t is the mean over its batch
B_t of the per-sample gradients, g_t = (1/|B_t|) sum_{i in B_t} g_t(x_i) (up
to BatchNorm's coupling, below). A member x in B_t contributes g_t(x) / |B_t|
to it, so the candidate's own gradient at theta_t,

    g_t(x) = d/dtheta CE(f(x; theta_t), y),

is more aligned with m_t when x is in B_t. With V_t a linear view of a
gradient, the similarity at step t is the cosine over all tensors
concatenated (equal weights)

    c_t(x) = <V_t(g_t(x)), V_t(m_t)> / (||V_t(g_t(x))|| ||V_t(m_t)||)

(0 where either norm is 0). Two views (``view``), each using only what the
observer holds:

* ``observed``: V_t(m_t) = decompress(m_t), the gradient the observer
  attributes to worker 0 (for PowerSGD P_hat Q_0^T, for Top-K the sent
  values scattered into zeros), against the candidate's whole gradient.
  It uses m_t and theta_t only.
* ``compressor``: the compressor's own view of the candidate's gradient
  against what was sent, as `objectives.dummy_features` /
  `objectives.target_features` define it. PowerSGD (`compress.LowRank`):
  [M(x)^T P_hat, M(x) Q_prev] against the sent [Q_0, P_0], M the matrix view
  (`compress.to_matrix`), P_hat and Q_prev public. Top-K and Random-K
  (`compress.Sparse`): the candidate's gradient at the sent (or shared)
  coordinates against the sent values; the coordinates of the other entries
  play no part. Dense, quantised and sign messages: the decoded message
  against the whole gradient, so at SGD the two views coincide. It uses m_t,
  theta_t and the public P_hat, Q_prev and indices.

Both views are linear in the gradient, so a member's share of m_t enters
the numerator whatever the compressor kept of it. With error feedback the
message is that of g_t + e_t, where the private memory e_t holds what earlier
steps did not send, so a member of B_s also leaves a trace in m_t for t > s.

Aggregation over steps (``aggregate``), from the [T, N] similarities of N
candidates:

* ``mean``: (1/T) sum_t c_t(x), the issue's statistic, which also collects
  the traces error feedback spreads over later steps. A candidate that
  trained at one step of T gets its signal diluted by T.
* ``max``: max_t u_t(x), u_t(x) the percentile of c_t(x) among the N
  candidates at step t (rank / N, ties averaged), ties of the maximum broken
  by the mean percentile (the default). The membership question has an
  unknown step (x is in B_t for one t of T, or in none), and without error
  memory a member's gradient enters one message of T, which the mean
  dilutes T times; the maximum over locations of per-step statistics put on
  one scale is the scan (generalised likelihood ratio) statistic for a
  signal at one unknown location. Percentiles make the steps comparable without a model of
  their spread: steps whose message aligns with every sample (early
  training) do not dominate, and each step's few members (|B_t| of N) barely
  move its ranks. It makes a candidate's score depend on the other
  candidates scored with it, as any population-normalised score does, and
  it weakens as T grows (the maximum of T null percentiles rises).

BatchNorm (``bn``). Training normalises with the statistics of the global
batch (all workers, synchronised BatchNorm), which a lone candidate cannot
reproduce: a single-sample forward in train mode normalises by that image's
own spatial statistics, a different function of theta_t. Modes:

* ``step`` (default): eval mode with the running averages replaced by the
  mean and variance the step itself normalised with, recovered from the
  wire: per layer, mean = (1/W) sum_w mu_w and var = max(0, (1/W) sum_w
  s_w - mean^2), mu_w and s_w worker w's batch mean and mean of squares
  (Flax's synchronised BatchNorm computes exactly these, with
  ``use_fast_variance``). The candidate then passes through the very
  function the step applied to the batch. What remains is the path through
  the statistics, a term of order 1/(W |B_t|) that no single sample owns.
  Needs synchronised BatchNorm (its statistics travel); models without
  BatchNorm need nothing.
* ``running``: eval mode with theta_t's running averages (the literature's
  setting; far from the batch statistics early in training, when the
  averages are still near their initial values).
* ``sample``: train mode on the candidate alone (its own spatial statistics).

Cost: one per-sample gradient per candidate and step (vmapped over a chunk of
candidates, one compiled program per message structure and chunk shape),
with convolutions as im2col matmuls (`models.PatchesConv`), which vmap into
batched matmuls. The recording keeps, per step, theta_t, worker 0's message
and the BatchNorm statistics (about two parameter-sized copies per step at
SGD, less with compression), on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from trustsgd_jax import compress as compress_lib
from trustsgd_jax import train as train_lib
from trustsgd_jax.attacks import objectives
from trustsgd_jax.attacks.membership import MembershipError

VIEWS = ("observed", "compressor")
BN_MODES = ("step", "running", "sample")
AGGREGATES = ("mean", "max")


@dataclasses.dataclass(frozen=True)
class WireStep:
    """What the observer kept of one training step (host arrays)."""

    step: int
    variables: dict  # {"params", "batch_stats"?}: the model the step started from
    message: Any  # worker 0's ``grads`` message as it travelled (`compress.as_sent`)
    bn_stats: dict | None  # the step's BatchNorm statistics in ``batch_stats`` layout; None if none travelled
    member_ids: np.ndarray  # [per-worker batch] indices into the training images: worker 0's batch


@dataclasses.dataclass(frozen=True)
class WireRecording:
    """Worker 0's side of a recorded run: one `WireStep` per step, in order."""

    compressor: str
    workers: int
    image_shape: tuple[int, ...]  # of the training images, which candidates must share
    steps: tuple[WireStep, ...]

    @property
    def member_ids(self) -> np.ndarray:
        """Sorted unique indices (into the training images) of every sample worker 0 trained on."""
        if not self.steps:
            return np.zeros((0,), np.int64)
        return np.unique(np.concatenate([s.member_ids for s in self.steps]))


def record_run(
    model: nn.Module,
    compressor: compress_lib.Compressor,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    global_batch: int,
    workers: int,
    seed: int = 0,
    optimizer: optax.GradientTransformation | None = None,
) -> WireRecording:
    """Trains `model` with `train.fit` on `workers` local devices and keeps what the observer of worker 0 sees.

    Per step (`WireStep`): the model the step started from, worker 0's
    ``grads`` message as it travelled, the step's synchronised BatchNorm
    statistics (`train.sync_bn_statistics`) and worker 0's batch (indices into `x`).
    Everything else of the step (other workers' messages, the update) is
    dropped as it arrives.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2 or y.shape != (len(x),):
        raise MembershipError(f"record_run needs images [N, ...] and labels [N]; got {x.shape} and {y.shape}.")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise MembershipError(f"record_run: steps must be an integer >= 1, got {steps!r}.")
    if not 1 <= workers <= jax.local_device_count():
        raise MembershipError(
            f"record_run: workers={workers} needs that many local devices (there are {jax.local_device_count()}); "
            "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count before JAX starts."
        )
    kept: list[WireStep] = []

    def observe(sm: train_lib.StepMessage) -> None:
        message = compress_lib.as_sent(jax.device_get(compress_lib.worker_message(sm.message["grads"], 0)))
        variables = jax.device_get(sm.variables)
        traffic = jax.device_get(compress_lib.worker_message(sm.message["bn"], 0))
        bn = train_lib.sync_bn_statistics(variables.get("batch_stats", {}), traffic)
        kept.append(WireStep(sm.step, variables, message, bn, np.asarray(sm.batch_ids[0]).copy()))

    train_lib.fit(
        model,
        compressor,
        x,
        y,
        steps=steps,
        global_batch=global_batch,
        optimizer=optimizer,
        seed=seed,
        progress=False,
        devices=jax.local_devices()[:workers],
        on_message=observe,
    )
    return WireRecording(compressor.name, workers, tuple(x.shape[1:]), tuple(kept))


def scoring_model(model: nn.Module) -> nn.Module:
    """`model` as the observer applies it to one candidate: no cross-device BatchNorm, im2col convolutions.

    Same parameters (`models.PatchesConv` has `nn.Conv`'s), same function.
    """
    changes: dict[str, Any] = {}
    if hasattr(model, "axis_name"):
        changes["axis_name"] = None
    if getattr(model, "conv_impl", None) == "xla":
        changes["conv_impl"] = "patches"
    return model.clone(**changes) if changes else model


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise MembershipError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}.")


def _scoring_variables(step: WireStep, bn: str) -> tuple[dict, bool]:
    """(variables, train flag) to compute a candidate's gradient at `step` in BatchNorm mode `bn`."""
    variables = dict(step.variables)
    if not variables.get("batch_stats"):
        variables.pop("batch_stats", None)
        return variables, bn == "sample"
    if bn == "step":
        if step.bn_stats is None:
            raise MembershipError(
                f"bn='step' needs the step's BatchNorm statistics, which did not travel at step {step.step} "
                "(BatchNorm local to each worker?): use bn='running' or bn='sample'."
            )
        variables["batch_stats"] = step.bn_stats
    return variables, bn == "sample"


def _cosine(a: list, b: list) -> jax.Array:
    dot = sum(jnp.vdot(u, v) for u, v in zip(a, b, strict=True))
    na = sum(jnp.sum(jnp.square(u)) for u in a)
    nb = sum(jnp.sum(jnp.square(v)) for v in b)
    den = jnp.sqrt(na) * jnp.sqrt(nb)
    return jnp.where(den > 0, dot / jnp.where(den > 0, den, 1.0), 0.0)


def _views(grads, message, views: tuple[str, ...]) -> list[jax.Array]:
    out = []
    for view in views:
        if view == "observed":
            out.append(_cosine(jax.tree.leaves(grads), objectives.target_features(message, "observed")))
        else:
            objective = objectives.adaptive_objective(message) or "observed"
            out.append(
                _cosine(
                    objectives.dummy_features(grads, message, objective),
                    objectives.target_features(message, objective),
                )
            )
    return out


@functools.partial(jax.jit, static_argnames=("model", "train", "views"))
def _chunk_similarities(model, variables, message, xs, ys, train: bool, views: tuple[str, ...]):
    """[chunk, len(views)] cosines of each candidate's gradient with the message, one step."""

    def one(x, y):
        grads = objectives.param_grads(model, variables, x[None], y[None], train=train)
        return jnp.stack(_views(grads, message, views))

    return jax.vmap(one)(xs, ys)


def _check_candidates(recording: WireRecording, x, y) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(recording, WireRecording):
        raise MembershipError(f"expected a WireRecording (from record_run), got {type(recording).__name__}.")
    if not recording.steps:
        raise MembershipError("the recording holds no steps: record at least one step (record_run(..., steps>=1)).")
    x, y = np.asarray(x, np.float32), np.asarray(y)
    if x.ndim < 2 or y.shape != (len(x),) or not len(x):
        raise MembershipError(f"candidates need images [N, ...] and labels [N], N >= 1; got {x.shape} and {y.shape}.")
    if tuple(x.shape[1:]) != tuple(recording.image_shape):
        raise MembershipError(
            f"candidate images have shape {x.shape[1:]}, the recorded run trained on {recording.image_shape}."
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise MembershipError(f"candidate labels must be integers, got dtype {y.dtype}.")
    return x, y.astype(np.int32)


def wire_similarities(
    model: nn.Module,
    recording: WireRecording,
    candidates_x: np.ndarray,
    candidates_y: np.ndarray,
    *,
    views: tuple[str, ...] = VIEWS,
    bn: str = "step",
    chunk: int = 128,
) -> dict[str, np.ndarray]:
    """Per view, the [T, N] cosines c_t(x) of the N candidates with worker 0's message at each step.

    One per-sample gradient per candidate and step serves every view in
    `views` (see the module docstring for the views and ``bn``). Candidates
    are scored `chunk` at a time; the last chunk is padded to the same shape.
    """
    views = tuple(views)
    if not views:
        raise MembershipError(f"give at least one view of {VIEWS}.")
    for v in views:
        _check_choice(v, VIEWS, "view")
    _check_choice(bn, BN_MODES, "BatchNorm mode (bn)")
    if chunk < 1:
        raise MembershipError(f"chunk must be >= 1, got {chunk}.")
    x, y = _check_candidates(recording, candidates_x, candidates_y)
    run = scoring_model(model)
    n = len(x)
    size = min(chunk, n)
    pad = -n % size
    xp = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
    yp = np.concatenate([y, np.repeat(y[-1:], pad, 0)]) if pad else y
    out = np.zeros((len(views), len(recording.steps), n), np.float32)
    for t, step in enumerate(recording.steps):
        variables, train = _scoring_variables(step, bn)
        message = jax.tree.map(jnp.asarray, step.message)
        sims = [
            np.asarray(_chunk_similarities(run, variables, message, xp[i : i + size], yp[i : i + size], train, views))
            for i in range(0, len(xp), size)
        ]
        out[:, t] = np.concatenate(sims)[:n].T
    return {v: out[i] for i, v in enumerate(views)}


def aggregate(similarities: np.ndarray, how: str = "max") -> np.ndarray:
    """[N] membership scores (higher = member) from [T, N] per-step similarities (module docstring)."""
    _check_choice(how, AGGREGATES, "aggregate")
    c = np.asarray(similarities, np.float64)
    if c.ndim != 2 or 0 in c.shape:
        raise MembershipError(f"similarities must be [steps, candidates] with both >= 1, got shape {c.shape}.")
    if how == "mean":
        return c.mean(0)
    # Percentile of each candidate among the candidates at each step (average ranks for ties), in (0, 1].
    u = stats.rankdata(c, method="average", axis=1) / c.shape[1]
    # Max first, the mean breaks its ties: distinct maxima differ by >= 1 / (2N) >= the tie-breaker (= only at the top).
    return u.max(0) + u.mean(0) / (2 * c.shape[1])


def wire_scores(
    model: nn.Module,
    recording: WireRecording,
    candidates_x: np.ndarray,
    candidates_y: np.ndarray,
    *,
    view: str = "observed",
    bn: str = "step",
    how: str = "max",
    chunk: int = 128,
) -> np.ndarray:
    """[N] wire-MIA scores of the candidates (higher = in worker 0's data): `aggregate` of `wire_similarities`.

    Defaults: the ``observed`` view, BatchNorm with the step's own statistics
    (``bn="step"``) and the ``max`` aggregation (module docstring).
    """
    _check_choice(view, VIEWS, "view")
    _check_choice(how, AGGREGATES, "aggregate")
    sims = wire_similarities(model, recording, candidates_x, candidates_y, views=(view,), bn=bn, chunk=chunk)
    return aggregate(sims[view], how)
