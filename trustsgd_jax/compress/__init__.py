"""Gradient compressors for data-parallel SGD, applied before the collective.

Each constructor returns a `Compressor`, an optax-style NamedTuple of pure
functions::

    c = compress.powersgd(rank=4)        # or topk(ratio=...), none(), ...
    state = c.init(params)               # per-worker: error memory, warm-start Q, step
    avg, state, msg = c.reduce(grads, state, axis_name="batch")  # inside pmap/shard_map
    seen = c.decompress(msg)             # the gradient an observer attributes to this worker
    wire_cost(c, params)                 # 32-bit words / bytes one worker sends per step

``avg`` is the averaged update every worker applies. ``msg`` is what an
honest-but-curious aggregator receives from this worker (plus what it can
compute from all workers' messages, e.g. PowerSGD's orthonormalised P). All
collectives are written against ``axis_name`` (``psum``/``all_gather``), so the
same function runs under ``jax.pmap`` and ``jax.shard_map``; ``axis_name=None``
means a single worker.

Robustness: a gradient with NaN/Inf on *any* worker makes every worker skip
the step: ``avg`` is zero, the error memory and warm-start state are kept as
they were (never poisoned), and ``state.nonfinite`` counts the skipped steps,
so a trainer can stop with a clear error.

The same compressors as an optax transformation (`as_optax`), first in a
chain, for a user's own pmapped or shard_mapped step::

    tx = optax.chain(compress.as_optax(compress.powersgd(4), axis_name="batch"), optax.sgd(0.1))
    updates, opt_state = tx.update(grads, opt_state)   # the compressed all-reduce runs here
    compress.last_message(opt_state)                    # what this worker last sent, for auditing

PowerSGD's dense warm-up (``powersgd(..., start_iter=K)``, PyTorch's
``start_powerSGD_iter``) sends the full gradients for the first K steps;
`DenseThenLowRank` messages record which form travelled, and
`wire_cost(c, params, step=...)` / `training_words` count the dense steps.

Where each name lives (imports run down this list; write ``compress.NAME``)::

    messages.py    Dense Sparse LowRank Quantized Signs DenseThenLowRank MESSAGE_TYPES is_message
                   as_sent decompress worker_message WireCost message_cost
                   matrix_shape to_matrix from_matrix (the matrix view LowRank decompresses through)
    base.py        Compressor CompressorState none wire_cost training_words, and the helpers compressors
                   are written with (collectives, NaN/Inf guard, error memory)
    sparse.py      topk randomk TOPK_SELECTIONS
    quantize.py    qsgd signsgd
    low_rank.py    powersgd powersgd_pytorch PYTORCH_POWERSGD_DEFAULTS powersgd_plan
                   orthonormal_columns DEPENDENT_RESIDUE
    levels.py      powersgd_words topk_level_k topk_level (Top-K as large as PowerSGD rank r)
    spec.py        Spec SPEC_HELP SPEC_KINDS parse_spec from_spec
    optax_face.py  CompressionState as_optax last_message compressor_state
"""

from trustsgd_jax.compress.base import Compressor, CompressorState, none, training_words, wire_cost
from trustsgd_jax.compress.levels import powersgd_words, topk_level, topk_level_k
from trustsgd_jax.compress.low_rank import (
    DEPENDENT_RESIDUE,
    PYTORCH_POWERSGD_DEFAULTS,
    orthonormal_columns,
    powersgd,
    powersgd_plan,
    powersgd_pytorch,
)
from trustsgd_jax.compress.messages import (
    MESSAGE_TYPES,
    Dense,
    DenseThenLowRank,
    LowRank,
    Quantized,
    Signs,
    Sparse,
    WireCost,
    as_sent,
    decompress,
    from_matrix,
    is_message,
    matrix_shape,
    message_cost,
    to_matrix,
    worker_message,
)

# The alias compress.py exported, kept for code that annotates with compress.PyTree; not advertised in __all__.
from trustsgd_jax.compress.messages import PyTree as PyTree
from trustsgd_jax.compress.optax_face import CompressionState, as_optax, compressor_state, last_message
from trustsgd_jax.compress.quantize import qsgd, signsgd
from trustsgd_jax.compress.sparse import TOPK_SELECTIONS, randomk, topk
from trustsgd_jax.compress.spec import SPEC_HELP, SPEC_KINDS, Spec, from_spec, parse_spec

__all__ = [
    # messages.py
    "Dense",
    "Sparse",
    "LowRank",
    "Quantized",
    "Signs",
    "DenseThenLowRank",
    "MESSAGE_TYPES",
    "is_message",
    "as_sent",
    "decompress",
    "worker_message",
    "WireCost",
    "message_cost",
    "matrix_shape",
    "to_matrix",
    "from_matrix",
    # base.py
    "Compressor",
    "CompressorState",
    "none",
    "wire_cost",
    "training_words",
    # sparse.py
    "topk",
    "randomk",
    "TOPK_SELECTIONS",
    # quantize.py
    "qsgd",
    "signsgd",
    # low_rank.py
    "powersgd",
    "powersgd_pytorch",
    "PYTORCH_POWERSGD_DEFAULTS",
    "powersgd_plan",
    "orthonormal_columns",
    "DEPENDENT_RESIDUE",
    # levels.py
    "powersgd_words",
    "topk_level_k",
    "topk_level",
    # spec.py
    "Spec",
    "SPEC_HELP",
    "SPEC_KINDS",
    "parse_spec",
    "from_spec",
    # optax_face.py
    "CompressionState",
    "as_optax",
    "last_message",
    "compressor_state",
]
