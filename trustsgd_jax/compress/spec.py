"""Compressor specs: the ``"kind:arg"`` strings of flags, records and reports (``"powersgd:4"``, ``"none"``).

`parse_spec` is the one parser of these strings; `from_spec` builds the compressor a spec names.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from trustsgd_jax.compress.base import Compressor, none
from trustsgd_jax.compress.levels import topk_level
from trustsgd_jax.compress.low_rank import powersgd
from trustsgd_jax.compress.messages import PyTree
from trustsgd_jax.compress.quantize import qsgd, signsgd
from trustsgd_jax.compress.sparse import randomk, topk

SPEC_HELP = (
    "none | powersgd:RANK | topk:RATIO | topk_level:RANK | randomk:RATIO | qsgd:LEVELS | signsgd "
    "(e.g. 'powersgd:4', 'topk:0.01', 'topk_level:4')"
)


class Spec(NamedTuple):
    """A parsed compressor spec: ``kind`` and its argument as written (None where the kind takes none).

    ``str(spec)`` writes it back (``"powersgd:4"``, ``"none"``); `parse_spec`
    is the one parser of the ``"kind:arg"`` strings (flags, records, reports).
    """

    kind: str
    arg: str | None = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"

    @property
    def number(self) -> float:
        """The argument as a number (rank, level, ratio, levels); 0 for kinds without one."""
        return 0.0 if self.arg is None else float(self.arg)


SPEC_KINDS = ("none", "sgd", "signsgd", "powersgd", "topk", "topk_level", "randomk", "qsgd")
_NO_ARG = ("none", "sgd", "signsgd")
_INT_ARG = ("powersgd", "topk_level", "qsgd")


def parse_spec(spec: str) -> Spec:
    """`Spec` of a compressor spec string such as ``powersgd:4``; a one-line ValueError naming `SPEC_HELP` if bad."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*(?::\s*([0-9.eE+-]+))?\s*", spec or "")
    if not m:
        raise ValueError(f"cannot parse compressor spec {spec!r}; expected {SPEC_HELP}.")
    kind, arg = m.group(1), m.group(2)
    if kind not in SPEC_KINDS:
        raise ValueError(f"unknown compressor spec {spec!r}; expected {SPEC_HELP}.")
    if kind in _NO_ARG:
        if arg is not None:
            raise ValueError(f"compressor spec {spec!r} takes no argument; expected {SPEC_HELP}.")
        return Spec(kind)
    if arg is None:
        raise ValueError(f"compressor spec {spec!r} needs an argument; expected {SPEC_HELP}.")
    try:
        (int if kind in _INT_ARG else float)(arg)
    except ValueError:
        raise ValueError(f"bad argument {arg!r} in compressor spec {spec!r}; expected {SPEC_HELP}.") from None
    return Spec(kind, arg)


def from_spec(spec: str | Spec, params: PyTree | None = None, seed: int = 0, start_iter: int = 0) -> Compressor:
    """Builds a compressor from a spec such as ``powersgd:4`` (see ``SPEC_HELP``), a string or a `Spec`.

    ``start_iter`` is `powersgd`'s dense warm-up (PyTorch's
    ``start_powerSGD_iter``); other compressors have none, and a nonzero
    value with them is an error rather than silently ignored.
    """
    kind, arg = parse_spec(str(spec))
    if kind == "powersgd":
        return powersgd(rank=int(arg), seed=seed, start_iter=start_iter)  # type: ignore[arg-type]
    if start_iter != 0:
        raise ValueError(
            f"start_iter={start_iter!r} applies to powersgd specs only (PyTorch's start_powerSGD_iter); "
            f"{str(spec)!r} has no dense warm-up: pass start_iter=0."
        )
    if kind in ("none", "sgd"):
        return none()
    if kind == "signsgd":
        return signsgd()
    if kind == "topk":
        return topk(ratio=float(arg))  # type: ignore[arg-type]
    if kind == "randomk":
        return randomk(ratio=float(arg), seed=seed)  # type: ignore[arg-type]
    if kind == "qsgd":
        return qsgd(levels=int(arg), seed=seed)  # type: ignore[arg-type]
    if params is None:
        raise ValueError("topk_level needs the model's params to size k: from_spec(spec, params).")
    return topk_level(params, rank=int(arg))  # type: ignore[arg-type]
