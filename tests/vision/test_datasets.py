"""Vision dataset loaders on tiny synthetic IDX / CIFAR pickle files, the bundled data and the FITS writer."""

import gzip
import pickle

import numpy as np
import pytest

from pipeline.errors import InputFileError
from pipeline.vision import datasets as D


def _write_idx(path, arr, gz=False):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    blob = header + arr.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    ytr = np.repeat(np.arange(10), 4).astype(np.uint8)
    xte = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    yte = np.arange(10, dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", xtr, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", ytr, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", xte)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", yte)
    return tmp_path, xtr, ytr, xte, yte


def test_mnist_idx_loader(mnist_dir):
    d, xtr, ytr, xte, yte = mnist_dir
    ds = D.load_dataset("mnist", mnist_dir=d, seed=1)
    assert ds.image_shape == (1, 32, 32)
    assert len(ds.train) + len(ds.valid) == 40 and len(ds.test) == 10
    assert ds.train.dtype == np.float32
    # the test split is t10k, padded by 2 px of background (-1) and scaled to [-1, 1]
    np.testing.assert_allclose(ds.test[:, 0, 2:30, 2:30], xte / 127.5 - 1, atol=1e-6)
    assert (ds.test[:, :, :2] == -1).all() and (ds.test[:, :, :, 30:] == -1).all()
    np.testing.assert_array_equal(ds.labels["test"], yte)
    # every training image is one of the IDX training images, no duplicates
    flat = {tuple(r) for r in (xtr.reshape(40, -1))}
    got = np.rint((np.concatenate([ds.train, ds.valid])[:, 0, 2:30, 2:30] + 1) * 127.5).astype(np.uint8)
    assert {tuple(r) for r in got.reshape(40, -1)} == flat


def test_idx_errors(tmp_path, mnist_dir):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(InputFileError, match="bad magic"):
        D.read_idx(bad)
    trunc = tmp_path / "trunc"
    _write_idx(trunc, np.zeros((3, 4), np.uint8))
    trunc.write_bytes(trunc.read_bytes()[:-2])
    with pytest.raises(InputFileError, match="payload"):
        D.read_idx(trunc)
    with pytest.raises(InputFileError, match="mnist_dir"):
        D.load_mnist_idx(tmp_path / "nowhere")


def _write_cifar(directory, n_batches=2, n=12, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir()
    out = {}
    for name in [f"data_batch_{i + 1}" for i in range(n_batches)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, n))
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": [int(v) for v in labels],
                         b"filenames": [b"x.png"] * n}, f)
        out[name] = (data, labels)
    return out


def test_cifar_pickle_loader(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    raw = _write_cifar(d)
    ds = D.load_dataset("cifar10", cifar10_dir=d)
    assert ds.name == "cifar10" and not ds.standin
    assert ds.image_shape == (3, 32, 32)
    assert len(ds.train) + len(ds.valid) == 24 and len(ds.test) == 12
    # CIFAR rows are channel-major (R plane, G plane, B plane)
    t = raw["test_batch"][0].reshape(12, 3, 32, 32)
    np.testing.assert_allclose(ds.test, t / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(ds.labels["test"], raw["test_batch"][1])


def test_cifar_refuses_foreign_pickle(tmp_path):
    d = tmp_path / "c"
    d.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(InputFileError, match="not allowed"):
        D.load_cifar10_dir(d)


def test_bundled_mnist():
    ds = D.load_mnist_bundled(seed=0)
    assert ds.image_shape == (1, 32, 32)
    assert len(ds.train) + len(ds.valid) + len(ds.test) == 5000
    assert ds.train.min() == -1.0 and ds.train.max() == 1.0
    # stratified: 50 test digits per class
    assert np.bincount(ds.labels["test"]).tolist() == [50] * 10


def test_standin_no_leak_and_labelled():
    ds = D.load_cifar10_standin(n_train=60, n_valid=4, n_test=12, seed=0,
                                photos=("astronaut", "coffee", "camera", "brick"), test_photos=("camera",),
                                valid_photos=("brick",))
    assert ds.standin and "STAND-IN" in ds.source and ds.name == "cifar10-standin"
    assert ds.train.shape == (60, 3, 32, 32) and ds.test.shape == (12, 3, 32, 32)
    # camera is greyscale: test crops have identical channels, train crops (colour photos) do not
    assert np.allclose(ds.test[:, 0], ds.test[:, 1])
    assert not np.allclose(ds.train[:, 0], ds.train[:, 1])
    with pytest.raises(ValueError):
        D.load_cifar10_standin(photos=("camera",), test_photos=("camera",), valid_photos=("camera",))


def test_training_fits_round_trip(tmp_path, mnist_dir):
    ds = D.load_dataset("mnist", mnist_dir=mnist_dir[0])
    path = D.write_training_fits(tmp_path / "out" / "mnist.fits", ds)
    back = D.read_training_fits(path)
    np.testing.assert_array_equal(back.train, ds.train)
    np.testing.assert_array_equal(back.test, ds.test)
    assert back.name == "mnist" and back.standin is False
    from astropy.io import fits

    with fits.open(path) as h:
        assert [x.name for x in h][:4] == ["PRIMARY", "TRAIN", "TRAIN_LABELS", "VALID"]
        assert h["TRAIN"].data.shape == (len(ds.train), 1, 32, 32)
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp file left behind
