"""Data sources: bundled sample, npz directory, tfds glue, normalisation, clear errors."""

import numpy as np
import pytest

from trustsgd_jax import data


@pytest.mark.parametrize(
    "name,shape,classes", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)]
)
def test_bundled_sample_is_real_stratified_data(name, shape, classes):
    ds = data.load(name, source="sample")
    assert ds.image_shape == shape and ds.x_train.dtype == np.uint8
    assert ds.source.startswith("sample:")
    counts = np.bincount(ds.y_train, minlength=classes)
    assert counts.min() == counts.max() > 0  # stratified
    assert ds.x_train.std() > 30  # natural images, not constant fill


def test_auto_prefers_a_data_dir(tmp_path, monkeypatch):
    src = data.load("mnist", source="sample")
    np.savez(
        tmp_path / "mnist.npz",
        x_train=src.x_train[:100, ..., 0],
        y_train=src.y_train[:100].astype(np.uint8),
        x_test=src.x_test[:10, ..., 0],
        y_test=src.y_test[:10].astype(np.uint8),
    )
    ds = data.load("mnist", data_dir=tmp_path)
    assert len(ds.x_train) == 100 and ds.source == str((tmp_path / "mnist.npz").resolve())
    monkeypatch.chdir(tmp_path.parent)  # a relative --data_dir names the same file, so results resume across both
    assert data.load("mnist", data_dir=tmp_path.name).source == ds.source
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert len(data.load("mnist").x_train) == 100
    # The env var points at a directory without cifar10: npz-only must fail, auto falls back to the sample.
    with pytest.raises(data.DataError, match="no such file"):
        data.load("cifar10", source="npz")
    assert data.load("cifar10").source.startswith("sample:")


def test_unknown_missing_and_corrupt_inputs_get_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match="unknown dataset 'svhn'"):
        data.load("svhn")
    with pytest.raises(data.DataError, match="unknown data source"):
        data.load("mnist", source="web")
    with pytest.raises(data.DataError, match="none given"):
        data.load("mnist", source="npz")
    (tmp_path / "mnist.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(data.DataError, match="not a readable .npz file.*--data_dir"):
        data.load("mnist", data_dir=tmp_path)
    np.savez(tmp_path / "cifar10.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(data.DataError, match="lacks arrays"):
        data.load("cifar10", data_dir=tmp_path)
    np.savez(
        tmp_path / "cifar100.npz",
        x_train=np.zeros((2, 32, 32, 3), np.float32),
        y_train=np.zeros(2),
        x_test=np.zeros((1, 32, 32, 3), np.uint8),
        y_test=np.zeros(1),
    )
    with pytest.raises(data.DataError, match="must be uint8"):
        data.load("cifar100", data_dir=tmp_path)
    # Train and test images of different shapes: refused at load, naming both arrays and their shapes.
    np.savez(
        tmp_path / "cifar100.npz",
        x_train=np.zeros((2, 28, 28), np.uint8),
        y_train=np.zeros(2),
        x_test=np.zeros((1, 32, 32, 3), np.uint8),
        y_test=np.zeros(1),
    )
    with pytest.raises(
        data.DataError,
        match=r"x_train images have shape \(28, 28, 1\) but x_test images "
        r"\(32, 32, 3\).*re-export",
    ) as e:
        data.load("cifar100", data_dir=tmp_path)
    assert "\n" not in str(e.value)  # one line


def test_pickled_npz_is_refused(tmp_path):
    np.savez(
        tmp_path / "mnist.npz",
        x_train=np.array([{"a": 1}], dtype=object),
        y_train=np.zeros(1),
        x_test=np.zeros((1, 28, 28), np.uint8),
        y_test=np.zeros(1),
    )
    with pytest.raises(data.DataError, match="not a readable .npz"):
        data.load("mnist", data_dir=tmp_path)


def test_tfds_offline_request_fails_clearly(tmp_path):
    with pytest.raises(data.DataError, match="(?s)without downloading.*tfds build mnist --file_format=array_record"):
        data.load("mnist", source="tfds", tfds_data_dir=str(tmp_path))


def test_tfds_glue_converts_records(monkeypatch):
    """tfds.data_source yields dicts of HWC uint8 'image' and int 'label'; feed it real sample images."""
    tfds = pytest.importorskip("tensorflow_datasets")
    sample = data.load("mnist", source="sample")
    calls = []

    class Source:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, idx):
            return [{"image": self.x[i], "label": np.int64(self.y[i])} for i in idx]

    def fake_data_source(name, split, data_dir, download):
        calls.append((name, split, data_dir, download))
        n = 30 if split == "train" else 7
        return Source(getattr(sample, f"x_{split}")[:n], getattr(sample, f"y_{split}")[:n])

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    ds = data.load("mnist", source="tfds", tfds_data_dir="/prepared")
    assert calls == [("mnist", "train", "/prepared", False), ("mnist", "test", "/prepared", False)]
    np.testing.assert_array_equal(ds.x_train, sample.x_train[:30])
    np.testing.assert_array_equal(ds.y_test, sample.y_test[:7])
    assert ds.source == "tfds:mnist@/prepared"


def test_normalize_roundtrip_and_bounds():
    ds = data.load("cifar10", source="sample")
    x = data.normalize(ds.x_train[:20], "cifar10")
    assert x.dtype == np.float32 and x.shape == (20, 32, 32, 3)
    np.testing.assert_allclose(data.denormalize(x, "cifar10") * 255.0, ds.x_train[:20].astype(np.float32), atol=1e-3)
    lo, hi = data.pixel_bounds("cifar10")
    assert (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all()
    assert data.normalize(data.load("mnist", source="sample").x_test[:3], "mnist").shape == (3, 28, 28, 1)


def test_batches_are_seeded_and_cover_an_epoch():
    x, y = np.arange(100), np.arange(100)
    a = [b[0] for b in data.batches(x, y, 10, seed=1, epoch=0)]
    b = [b[0] for b in data.batches(x, y, 10, seed=1, epoch=0)]
    c = [b[0] for b in data.batches(x, y, 10, seed=1, epoch=1)]
    assert all((u == v).all() for u, v in zip(a, b)) and not all((u == v).all() for u, v in zip(a, c))
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(x, y, 0, 0, 0))
