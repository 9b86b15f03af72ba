"""Data sets that need no download: generated or shipped by a package.

Each loader returns float32 inputs and int64 labels as tensors, and leaves every
global random state as it found it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import numbers
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from geocomplexity.state import rngs_kept

__all__ = [
    "DATASETS",
    "Split",
    "cifar10_with_fingerprint",
    "load",
    "load_cifar10",
    "load_digits",
    "load_mnist1d",
    "random_crop_flip",
]

DATASETS = ("mnist1d", "digits")


@dataclass(frozen=True)
class Split:
    """Train and test tensors of a classification data set.

    Attributes:
        x_train: ``(N, d)`` float32 inputs.
        y_train: ``(N,)`` int64 labels.
        x_test: ``(M, d)`` float32 inputs.
        y_test: ``(M,)`` int64 labels.
        num_classes: number of classes.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> Split:
    """MNIST-1D (Greydanus 2020), generated offline: 40-d signals, 10 classes.

    ``mnist1d.data.make_dataset`` seeds numpy's and Python's global generators;
    both are saved and restored here, so loading leaves no trace. Loads in
    several threads take turns; a thread that draws from those generators
    while another loads still shares them.

    Args:
        num_samples: total samples before the 80/20 train/test split,
            rounded down to a multiple of 10 (MNIST-1D draws the classes in
            turn, so every class has the same count).
        seed: the generator's seed (42 is the published data set's).

    Returns:
        A :class:`Split` with 4000/1000 samples for the defaults.

    Raises:
        ImportError: the optional ``mnist1d`` package is missing.
        ValueError: ``num_samples`` below 10 (one per class).
    """
    if not isinstance(num_samples, numbers.Integral) or num_samples < 10:
        raise ValueError(
            f"num_samples must be an integer >= 10 (MNIST-1D is drawn class by "
            f"class, 10 classes), got {num_samples!r}"
        )

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError(
            "MNIST-1D needs the mnist1d package: pip install 'geocomplexity[data]'"
        ) from err
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    # rngs_kept puts the global generators back and holds the library's one
    # lock for them: make_dataset seeds them and draws from them, so two
    # loads at once drew from one stream by turns (neither got the seed's
    # data set) and restored each other's snapshots
    with rngs_kept():
        d = make_dataset(args)
    return Split(
        torch.as_tensor(d["x"], dtype=torch.float32),
        torch.as_tensor(d["y"], dtype=torch.int64),
        torch.as_tensor(d["x_test"], dtype=torch.float32),
        torch.as_tensor(d["y_test"], dtype=torch.int64),
        num_classes=10,
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 8×8 digits, shipped with the package: 1797 images.

    Flattened to 64-d vectors scaled to [0, 1] and split at random (fixed by
    ``seed``).

    Returns:
        A :class:`Split` (1438 train, 359 test for the defaults).

    Raises:
        ImportError: scikit-learn is missing.
        ValueError: ``test_fraction`` not strictly between 0 and 1.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(
            f"test_fraction must be strictly between 0 and 1 (both splits "
            f"non-empty), got {test_fraction!r}"
        )
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError(
            "digits needs scikit-learn: pip install 'geocomplexity[data]'"
        ) from err
    d = sk_load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(x))
    if not 0 < n_test < len(x):
        raise ValueError(
            f"test_fraction={test_fraction!r} leaves {n_test} of {len(x)} images "
            f"for the test set; both splits must be non-empty"
        )
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test], num_classes=10)


def load(name: str) -> Split:
    """A data set by name, cached in the process: ``"mnist1d"`` or ``"digits"``.

    Each call returns tensors of its own: the cache's were handed out before,
    so a caller that standardised ``x_train`` in place changed the data of
    every later ``load`` in the process (the next experiment of a sweep).

    Returns:
        Its :class:`Split`.

    Raises:
        ValueError: unknown name.
    """
    cached = _load_cached(name)
    return dataclasses.replace(
        cached,
        **{
            f.name: getattr(cached, f.name).clone()
            for f in dataclasses.fields(cached)
            if isinstance(getattr(cached, f.name), Tensor)
        },
    )


@functools.lru_cache(maxsize=4)
def _load_cached(name: str) -> Split:
    if name == "mnist1d":
        return load_mnist1d()
    if name == "digits":
        return load_digits()
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


#: The only globals a CIFAR-10 batch may name: numpy's array reconstruction
#: (under its numpy 1 and numpy 2 module paths; ``_frombuffer`` is how numpy
#: pickles an array under protocol 5, as a batch re-saved from Python 3.8 on
#: is) and the bytes decoder of pickle protocol 2. Dicts, lists, tuples, ints
#: and bytes need no global.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A CIFAR-10 batch named a global outside :data:`_CIFAR_GLOBALS`."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers, bytes and numpy arrays, and nothing else.

    A pickle can run any function it names; a planted CIFAR-10 file naming,
    say, ``os.system`` raises here instead of running it.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise _RefusedGlobal(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only "
                "plain containers, bytes and numpy arrays"
            )
        return super().find_class(module, name)


def _value_range(a: Any) -> str:
    """`` from MIN to MAX`` of a numeric array; empty for class names, objects."""
    import numpy as np

    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        return ""
    return f" from {a.min()} to {a.max()}"


#: What a CIFAR-10 folder must be, and how to make one.
_CIFAR_FOLDER = (
    "give the python version's folder, cifar-10-batches-py, holding "
    "data_batch_1 ... data_batch_5 and test_batch (extract "
    "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
    "with `tar xzf cifar-10-python.tar.gz`; nothing is downloaded here)"
)


def _cifar_hint(where: Path) -> str:
    """Why ``where`` holds no batches, where that is recognisable.

    The archive itself, the archive left unextracted in the folder, or the
    binary version's folder (``data_batch_1.bin`` ...); empty otherwise.
    """
    if where.is_file() and where.name.endswith((".tar.gz", ".tgz", ".tar")):
        return f" ({where.name} is the archive: extract it)"
    if where.is_dir():
        if (where / "cifar-10-python.tar.gz").is_file():
            return " (cifar-10-python.tar.gz is there: extract it)"
        if (where / "data_batch_1.bin").is_file():
            return " (data_batch_1.bin is there: that is the binary version)"
    return ""


def _cifar_batch(path: Path, digest: Any = None) -> tuple[Tensor, Tensor]:
    """One batch's ``(N, 3, 32, 32)`` images in [0, 1] and ``N`` labels.

    With ``digest`` (a :mod:`hashlib` object), its count, pixels (as uint8)
    and labels (as little-endian int64) are fed to it: the data, not the
    pickle's bytes, so a batch re-saved with another protocol or str keys
    hashes alike.
    """
    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing{_cifar_hint(path.parent)}: {_CIFAR_FOLDER}"
        )
    # read outside the try: a file that cannot be read (permission denied, an
    # I/O error) raises its own OSError, not "not a CIFAR-10 batch"
    raw = path.read_bytes()
    try:
        d = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _RefusedGlobal:
        raise
    except Exception as err:  # truncated, empty, not a pickle: the bytes decide
        raise ValueError(
            f"{path} is not a CIFAR-10 batch: its pickle does not load "
            f"({type(err).__name__}: {err}); a truncated download? extract "
            "cifar-10-python.tar.gz again"
        ) from err
    if isinstance(d, dict):
        # the published batches (Python 2 pickles) have bytes keys; one loaded
        # with encoding="latin1", the common recipe, and re-saved has str keys
        d = {k.encode() if isinstance(k, str) else k: v for k, v in d.items()}
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{path} is not a CIFAR-10 batch (no data/labels)")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"])
    if (
        data.ndim != 2
        or data.shape[1] != 3072
        or labels.ndim != 1
        or len(labels) != len(data)
        or len(data) == 0
    ):
        raise ValueError(
            f"{path}: expected data of shape (N, 3072) and N labels, got "
            f"{data.shape} and {labels.shape}"
        )
    # what would pass the shapes and fail (or quietly mislead) every run later:
    # labels outside the 10 classes, fractional labels, pixels outside 0-255
    if not np.issubdtype(labels.dtype, np.integer) or not (
        labels.min() >= 0 and labels.max() <= 9
    ):
        raise ValueError(
            f"{path}: expected integer labels 0-9, got {labels.dtype}"
            f"{_value_range(labels)}"
        )
    if not np.issubdtype(data.dtype, np.integer) or not (
        data.min() >= 0 and data.max() <= 255
    ):
        raise ValueError(
            f"{path}: expected pixels as integers 0-255, got {data.dtype}"
            f"{_value_range(data)}"
        )
    if digest is not None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(np.ascontiguousarray(data, dtype=np.uint8).data)
        digest.update(np.ascontiguousarray(labels, dtype="<i8").data)
    x = torch.as_tensor(data.reshape(-1, 3, 32, 32), dtype=torch.float32) / 255.0
    return x, torch.as_tensor(labels, dtype=torch.int64)


def load_cifar10(data_dir: str | Path) -> Split:
    """CIFAR-10 from the standard python-version folder, never downloaded.

    Reads ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` with a
    restricted unpickler, scales pixels to [0, 1] and standardises each channel
    with the training set's mean and standard deviation.

    Args:
        data_dir: the ``cifar-10-batches-py`` folder (or a folder containing it).

    Returns:
        A :class:`Split` of ``(N, 3, 32, 32)`` images (50000/10000 for the real
        data set).

    Raises:
        FileNotFoundError: the folder or a batch is missing.
        ValueError: a batch is malformed.
    """
    return cifar10_with_fingerprint(data_dir, fingerprint=False)[0]


def cifar10_with_fingerprint(
    data_dir: str | Path, fingerprint: bool = True
) -> tuple[Split, str | None]:
    """:func:`load_cifar10` and a short fingerprint of the data it read.

    The fingerprint, ``"50000+10000 images, sha256 <16 hex digits>"``, hashes
    each batch's image count, uint8 pixels and labels in the order read (the
    pixels before scaling: the training set's channel statistics are a
    reduction whose last bits vary with threads and machines). The same data
    anywhere, or re-pickled, has the same fingerprint; a sweep compares it to
    tell runs made on other data (~0.1 s on the full data set).

    Returns:
        The split, and the fingerprint (``None`` without ``fingerprint``).

    Raises:
        FileNotFoundError: the folder or a batch is missing.
        ValueError: a batch is malformed.
    """
    digest = hashlib.sha256() if fingerprint else None
    root = Path(data_dir).expanduser()  # "~/data" from Python or a config
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise FileNotFoundError(
            f"no CIFAR-10 folder at {root}{_cifar_hint(root)}: {_CIFAR_FOLDER}"
        )
    parts = [_cifar_batch(root / f"data_batch_{i}", digest) for i in range(1, 6)]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    xt, yt = _cifar_batch(root / "test_batch", digest)
    mean = x.mean((0, 2, 3), keepdim=True)
    std = x.std((0, 2, 3), keepdim=True).clamp_min(1e-8)
    split = Split((x - mean) / std, y, (xt - mean) / std, yt, num_classes=10)
    if digest is None:
        return split, None
    return split, f"{len(x)}+{len(xt)} images, sha256 {digest.hexdigest()[:16]}"


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """The standard CIFAR augmentation: random crops and horizontal flips.

    Each image is zero-padded by ``padding`` pixels, cropped back to its size
    at a random offset, and flipped left-right with probability ½.

    Randomness comes from ``generator`` (a CPU generator; the offsets move to the
    images' device), so a training run that uses it stays reproducible.

    Args:
        x: ``(B, C, H, W)`` images.
        generator: the source of randomness.
        padding: pixels of zeros on each side before cropping back to ``H × W``.

    Returns:
        ``(B, C, H, W)`` augmented images.
    """
    b, _, h, w = x.shape
    shift = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    shift, flip = shift.to(x.device), flip.to(x.device)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = shift[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = shift[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = torch.arange(b, device=x.device)[:, None, None]
    # (B, H, W, C) by advanced indexing, then back to channels first
    crops = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()
