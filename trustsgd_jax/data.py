"""Real image datasets of the study (MNIST, CIFAR-10, CIFAR-100) as uint8 arrays.

Three sources, in the order `source="auto"` tries them:

1. a directory of ``.npz`` files in the format of ``../shared/data`` (flag
   ``--data_dir`` or env ``TRUSTSGD_DATA_DIR``): ``x_train, y_train, x_test,
   y_test``, uint8, NHWC (MNIST without channel axis);
2. the real, class-stratified sample bundled in ``trustsgd_jax/sample_data``
   (always there; see its README for provenance).

``source="tfds"`` reads the full datasets through tensorflow-datasets'
``tfds.data_source`` (random access over a *prepared* ``data_dir``, needs
``array_record`` but not TensorFlow). Downloading is never attempted at run
time: prepare the dataset once where a network exists (``tfds build mnist``)
and point ``tfds_data_dir`` (or ``TFDS_DATA_DIR``) at it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile
from typing import NamedTuple

import numpy as np

DATASETS = ("mnist", "cifar10", "cifar100")
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100}
# Channel statistics of the full training sets, the constants the gradient
# inversion literature (Geiping et al. 2020) normalises with.
MEAN = {
    "mnist": (0.1307,),
    "cifar10": (0.4914672374725342, 0.4822617471218109, 0.4467701315879822),
    "cifar100": (0.5071598291397095, 0.4866936206817627, 0.44120192527770996),
}
STD = {
    "mnist": (0.3081,),
    "cifar10": (0.24703224003314972, 0.24348513782024384, 0.26158785820007324),
    "cifar100": (0.2673342823982239, 0.2564384639263153, 0.2761504650115967),
}
IMAGE_SHAPE = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}
SAMPLE_DIR = pathlib.Path(__file__).parent / "sample_data"
DATA_DIR_ENV = "TRUSTSGD_DATA_DIR"
SOURCES = ("auto", "npz", "sample", "tfds")


class DataError(ValueError):
    """No source could provide the requested dataset; the message says why and how to fix it."""


class Dataset(NamedTuple):
    name: str
    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int32 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where the arrays came from, for provenance in result files

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.name]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def _how_to_fix(name: str) -> str:
    return (
        f"Supply data in one of these ways: pass --data_dir (or set ${DATA_DIR_ENV}) to a "
        f"directory holding '{name}.npz' with x_train/y_train/x_test/y_test uint8 arrays "
        "(the format of ../shared/data); use the bundled sample (source='sample'); or "
        f"prepare the full dataset once with network access (`tfds build {name} --file_format=array_record`, "
        "which needs TensorFlow on that machine only) and use "
        "source='tfds' with tfds_data_dir pointing at it."
    )


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}.")


def _as_nhwc(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x


def _validate(name: str, arrays: dict, where: str) -> Dataset:
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        x = _as_nhwc(np.asarray(x))
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(
                f"{where}: x_{split} must be uint8 images [N,H,W(,C)], got {x.dtype} {x.shape}. " + _how_to_fix(name)
            )
        y = np.asarray(y).astype(np.int32).reshape(-1)
        if len(y) != len(x):
            raise DataError(f"{where}: {len(x)} images but {len(y)} labels in split {split!r}.")
        if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES[name]):
            raise DataError(f"{where}: labels of split {split!r} outside [0, {NUM_CLASSES[name]}) for {name}.")
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    train_shape, test_shape = out["x_train"].shape[1:], out["x_test"].shape[1:]
    if train_shape != test_shape:
        raise DataError(
            f"{where}: x_train images have shape {train_shape} but x_test images {test_shape} (H, W, C); "
            f"both splits must hold {name} images of one shape: re-export the file with matching x_train and x_test."
        )
    return Dataset(name=name, source=where, **out)


def _load_npz(name: str, path: pathlib.Path) -> Dataset:
    try:
        # allow_pickle stays False: a data file must never execute code.
        with np.load(path, allow_pickle=False) as f:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            if missing:
                raise DataError(f"{path} lacks arrays {sorted(missing)}. " + _how_to_fix(name))
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path} is not a readable .npz file ({e}). " + _how_to_fix(name)) from e
    # The resolved path: `--data_dir=../shared/data` and its absolute form name one file, and result files compare it.
    return _validate(name, arrays, str(path.resolve()))


def _load_tfds(name: str, tfds_data_dir: str | None) -> Dataset:
    try:  # an optional dependency: only this source needs it
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"source='tfds' needs `pip install tensorflow-datasets array-record` ({e}). " + _how_to_fix(name)
        ) from e
    data_dir = tfds_data_dir or os.environ.get("TFDS_DATA_DIR")
    arrays = {}
    for split in ("train", "test"):
        try:
            src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types for "not prepared"
            raise DataError(
                f"tfds could not open a prepared {name!r} (split {split!r}) in data_dir="
                f"{data_dir or 'the default ~/tensorflow_datasets'} without downloading: {e}. " + _how_to_fix(name)
            ) from e
        examples = src[list(range(len(src)))] if len(src) else []
        arrays[f"x_{split}"] = np.stack([np.asarray(ex["image"]) for ex in examples])
        arrays[f"y_{split}"] = np.asarray([ex["label"] for ex in examples])
    return _validate(name, arrays, f"tfds:{name}@{data_dir or 'default'}")


def load(
    name: str,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | None = None,
) -> Dataset:
    """Loads `name` as uint8 NHWC arrays with int32 labels.

    Args:
      name: one of ``DATASETS``.
      source: ``auto`` (npz directory if one is given or set in the environment,
        else the bundled sample), ``npz``, ``sample`` or ``tfds``.
      data_dir: directory of ``{name}.npz`` files; defaults to ``$TRUSTSGD_DATA_DIR``.
      tfds_data_dir: a prepared TFDS data directory, for ``source='tfds'``.
    """
    _check_name(name)
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}.")
    if source == "tfds":
        return _load_tfds(name, tfds_data_dir)
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    tried = []
    if source in ("auto", "npz"):
        if data_dir:
            path = pathlib.Path(data_dir) / f"{name}.npz"
            if path.is_file():
                return _load_npz(name, path)
            tried.append(f"{path} (no such file)")
        else:
            tried.append(f"npz directory (none given: --data_dir / ${DATA_DIR_ENV} unset)")
        if source == "npz":
            raise DataError(f"no data for {name!r}; tried: {'; '.join(tried)}. " + _how_to_fix(name))
    path = SAMPLE_DIR / f"{name}.npz"
    if not path.is_file():
        tried.append(f"bundled sample {path} (missing: broken install?)")
        raise DataError(f"no data for {name!r}; tried: {'; '.join(tried)}. " + _how_to_fix(name))
    ds = _load_npz(name, path)
    return ds._replace(source=f"sample:{path.name}")


@dataclasses.dataclass(frozen=True)
class DatasetStats:
    """What an attack needs to know about a dataset: its normalisation, image shape and number of classes.

    ``mean`` and ``std`` are per channel, of pixels in [0, 1]; images are
    normalised as (x - mean) / std (`normalize`). `stats` gives them for the
    study's datasets; for your own data, build one::

        DatasetStats(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), image_shape=(32, 32, 3), num_classes=10)

    Validated once, here; a bad value is a one-line ValueError.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int]
    num_classes: int

    def __post_init__(self) -> None:
        for field in ("mean", "std"):
            object.__setattr__(self, field, tuple(float(v) for v in getattr(self, field)))
        object.__setattr__(self, "image_shape", tuple(int(v) for v in self.image_shape))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"DatasetStats.image_shape must be (H, W, C), got {self.image_shape}.")
        channels = self.image_shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"DatasetStats needs one mean and one std per channel ({channels}); got {len(self.mean)} and "
                f"{len(self.std)}."
            )
        if min(self.std) <= 0:
            raise ValueError(f"DatasetStats.std must be positive, got {self.std}.")
        if self.num_classes < 1:
            raise ValueError(f"DatasetStats.num_classes must be >= 1, got {self.num_classes}.")


def stats(name: str) -> DatasetStats:
    """The `DatasetStats` of one of the study's datasets (`DATASETS`); a one-line DataError for any other name."""
    if name not in DATASETS:
        raise DataError(
            f"no normalisation known for dataset {name!r} (only {', '.join(DATASETS)}); pass "
            "data.DatasetStats(mean=..., std=..., image_shape=..., num_classes=...) instead of a name."
        )
    return DatasetStats(MEAN[name], STD[name], IMAGE_SHAPE[name], NUM_CLASSES[name])


def as_stats(dataset: str | DatasetStats) -> DatasetStats:
    """`dataset` as `DatasetStats`: a study dataset's name (`stats`) or the stats themselves."""
    return dataset if isinstance(dataset, DatasetStats) else stats(dataset)


def normalize(x_uint8: np.ndarray, dataset: str | DatasetStats) -> np.ndarray:
    """uint8 images -> float32 (x/255 - mean) / std, NHWC; `dataset` a study dataset's name or `DatasetStats`."""
    s = as_stats(dataset)
    x = _as_nhwc(np.asarray(x_uint8)).astype(np.float32) / 255.0
    return (x - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)


def denormalize(x, dataset: str | DatasetStats):
    """Inverse of `normalize`, back to [0, 1] floats (works on numpy and jax arrays)."""
    s = as_stats(dataset)
    return x * np.asarray(s.std, np.float32) + np.asarray(s.mean, np.float32)


def pixel_bounds(dataset: str | DatasetStats) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel [lo, hi] of valid normalised pixels (images of [0, 1] mapped by `normalize`)."""
    s = as_stats(dataset)
    mean, std = np.asarray(s.mean, np.float32), np.asarray(s.std, np.float32)
    return (0.0 - mean) / std, (1.0 - mean) / std


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int):
    """Yields shuffled full batches of one epoch; the order depends only on (seed, epoch)."""
    if batch_size < 1 or batch_size > len(x):
        raise ValueError(f"batch_size {batch_size} must be in [1, {len(x)}] (the number of images).")
    perm = np.random.default_rng([seed, epoch]).permutation(len(x))
    for i in range(len(x) // batch_size):
        idx = perm[i * batch_size : (i + 1) * batch_size]
        yield x[idx], y[idx]
