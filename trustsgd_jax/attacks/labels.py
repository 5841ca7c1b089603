"""Label inference from what a worker sends."""

from __future__ import annotations

import jax
import numpy as np

from trustsgd_jax import compress as compress_lib
from trustsgd_jax.attacks.errors import AttackError


def infer_labels_idlg(msg, num_classes: int, batch_size: int = 1) -> np.ndarray:
    """Labels from the sign of the head's weight gradient (iDLG, Zhao et al. 2020).

    With non-negative penultimate features h (ReLU), the head-kernel gradient
    column of class c is h (p_c - y_c): negative only for the true label. For
    B > 1 the B most negative columns are returned (assumes distinct labels).
    The sign argument holds for softmax cross-entropy only (`train.cross_entropy`).
    """
    seen = compress_lib.decompress(msg)
    heads = [
        (path, g)
        for path, g in jax.tree_util.tree_leaves_with_path(seen)
        if g.ndim == 2 and g.shape[-1] == num_classes and "kernel" in jax.tree_util.keystr(path)
    ]
    if len(heads) != 1:
        raise AttackError(f"iDLG needs exactly one 2-D head kernel with {num_classes} outputs; found {len(heads)}.")
    col = np.asarray(heads[0][1]).sum(0)
    return np.sort(np.argsort(col)[:batch_size]).astype(np.int32)
