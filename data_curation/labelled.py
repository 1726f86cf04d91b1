"""Labelled evaluation datasets with fixed, seeded train/test splits.

A dataset is named by one string:

- ``builtin:mnist5k`` / ``builtin:digits`` / ``builtin:lfw``: images that ship inside wheels
  (see :mod:`data_curation.builtin`);
- a folder, local or ``s3://``, laid out ImageFolder-style (one sub-folder per class). When
  it holds ``train/`` and ``test/`` (or ``val/``) folders, those are the splits; otherwise
  the split is drawn per class with the seed;
- WebDataset shards with a ``cls`` field: one ``.tar`` (``.tar.gz``, ``.tgz``), a brace pattern
  (``shards-{000..009}.tar``), or a folder of such files.

The split is drawn on the list of items before any image is decoded, so ``max_train`` /
``max_test`` keep large sets cheap. Bad items (undecodable files, samples without ``cls``,
classes with one image) are skipped and counted in :attr:`LabelledDataset.skipped`; a
dataset that does not exist or has nothing usable raises :class:`DatasetError` with one
line naming it.
"""
from __future__ import annotations

import io
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from data_curation.builtin import load_builtin
from data_curation.sources import has_image_extension, has_tar_extension
from data_curation.storage import Storage, StorageError

_TEST_SPLIT_NAMES = ("test", "val")


class DatasetError(ValueError):
    """A labelled dataset cannot be used; the message names it and says why, in one line."""


@dataclass
class LabelledSplit:
    images: list[np.ndarray]  # uint8, (H, W) grey or (H, W, 3) RGB; sizes may differ
    labels: np.ndarray  # (N,) int64 indices into LabelledDataset.classes

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class LabelledDataset:
    name: str
    classes: list[str]
    train: LabelledSplit
    test: LabelledSplit
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


@dataclass
class _Items:
    """Undecoded items: ``refs[i]`` is an array, a URI or raw bytes, per source."""

    refs: list[Any]
    labels: np.ndarray


def load_labelled(spec: str, storage: Storage | None = None, *, seed: int = 0,
                  test_fraction: float = 0.2, max_train: int | None = None,
                  max_test: int | None = None) -> LabelledDataset:
    """Load the dataset named by ``spec`` with a split that depends only on ``seed``."""
    storage = storage or Storage()
    skipped: Counter[str] = Counter()
    refs_are_uris = False
    if spec.startswith("builtin:"):
        classes, train, test = _builtin_items(spec, seed, test_fraction, skipped)
        decode = _decode_array
    elif _looks_like_webdataset(spec, storage):
        classes, train, test = _webdataset_items(spec, storage, seed, test_fraction, skipped)
        decode = _decode_bytes
    else:
        classes, train, test = _imagefolder_items(spec, storage, seed, test_fraction, skipped)
        decode, refs_are_uris = _decode_bytes, True
    train = _subsample(train, max_train, seed)
    test = _subsample(test, max_test, seed + 1)
    if refs_are_uris:  # read only the images the subsample kept
        train = _Items(_fetch(train.refs, storage, spec), train.labels)
        test = _Items(_fetch(test.refs, storage, spec), test.labels)
    train_split = _decode_split(train, decode, skipped)
    test_split = _decode_split(test, decode, skipped)
    if len(train_split) == 0 or len(test_split) == 0:
        raise DatasetError(f"dataset {spec}: no decodable images left in the train or test split "
                           f"(skipped: {dict(skipped) or 'none'})")
    return LabelledDataset(spec, classes, train_split, test_split, dict(skipped))


# -- sources ---------------------------------------------------------------------------
def _builtin_items(spec: str, seed: int, test_fraction: float,
                   skipped: Counter[str]) -> tuple[list[str], _Items, _Items]:
    try:
        data = load_builtin(spec)
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    train, test = _stratified_split(_Items(list(data.images), data.labels), test_fraction, seed, skipped)
    return list(data.classes), train, test


def _imagefolder_items(root: str, storage: Storage, seed: int, test_fraction: float,
                       skipped: Counter[str]) -> tuple[list[str], _Items, _Items]:
    root = root.rstrip("/")
    if not storage.exists(root):
        raise DatasetError(f"dataset {root}: no such folder")
    if not storage.isdir(root):
        raise DatasetError(f"dataset {root}: not a folder, a .tar (.tar.gz, .tgz) shard or a builtin: name")
    top = {posixpath.basename(u.rstrip("/")): u for u in storage.ls(root) if storage.isdir(u)}
    test_name = next((n for n in _TEST_SPLIT_NAMES if n in top), None)
    if "train" in top and test_name is not None:
        train_files = _class_files(top["train"], storage, skipped)
        test_files = _class_files(top[test_name], storage, skipped)
        classes = sorted(set(train_files) | set(test_files))
        train = _label_items(train_files, classes)
        test = _label_items(test_files, classes)
        if len(train.refs) == 0 or len(test.refs) == 0:
            raise DatasetError(f"dataset {root}: train/ or {test_name}/ holds no images in class folders")
        return classes, train, test
    files = _class_files(root, storage, skipped)
    if not files:
        raise DatasetError(f"dataset {root}: no images in class sub-folders (expected ROOT/CLASS/IMAGE)")
    classes = sorted(files)
    train, test = _stratified_split(_label_items(files, classes), test_fraction, seed, skipped)
    return classes, train, test


def _class_files(root: str, storage: Storage, skipped: Counter[str]) -> dict[str, list[str]]:
    """Image URIs below ``root`` grouped by their first folder (the class)."""
    prefix = root.rstrip("/") + "/"
    by_class: dict[str, list[str]] = {}
    for uri in storage.walk_files(root, skipped=lambda line: skipped.update([line])):
        rel = uri[len(prefix):] if uri.startswith(prefix) else posixpath.basename(uri)
        parts = rel.split("/")
        if not has_image_extension(rel):
            skipped["not an image file"] += 1
        elif len(parts) < 2:
            skipped["image outside a class folder"] += 1
        else:
            by_class.setdefault(parts[0], []).append(uri)
    return by_class


def _label_items(files: dict[str, list[str]], classes: list[str]) -> _Items:
    refs = [uri for name in classes for uri in files.get(name, [])]
    labels = [i for i, name in enumerate(classes) for _ in files.get(name, [])]
    return _Items(refs, np.asarray(labels, dtype=np.int64))


def _fetch(uris: list[str], storage: Storage, spec: str) -> list[bytes | None]:
    """The bytes of every URI (concurrently on S3); a file that cannot be read becomes None,
    a store that cannot be read is a DatasetError."""
    out: list[bytes | None] = []
    for data in storage.read_many(uris):
        if isinstance(data, StorageError):
            raise DatasetError(f"dataset {spec}: cannot read images: {data}") from None
        out.append(data if isinstance(data, bytes) else None)
    return out


def _looks_like_webdataset(spec: str, storage: Storage) -> bool:
    if has_tar_extension(spec) or "{" in spec:
        return True
    if storage.exists(spec) and storage.isdir(spec):
        entries = storage.ls(spec)
        return bool(entries) and all(has_tar_extension(e) or posixpath.basename(e).startswith(".")
                                     for e in entries)
    return False


def _shard_uris(spec: str, storage: Storage) -> list[str]:
    if "{" in spec:
        from braceexpand import braceexpand

        uris = list(braceexpand(spec))
    elif has_tar_extension(spec):
        uris = [spec]
    else:
        uris = [u for u in storage.ls(spec) if has_tar_extension(u)]
    missing = [u for u in uris if not storage.exists(u)]
    if missing:
        raise DatasetError(f"dataset {spec}: shard {missing[0]} does not exist"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return uris


def _webdataset_items(spec: str, storage: Storage, seed: int, test_fraction: float,
                      skipped: Counter[str]) -> tuple[list[str], _Items, _Items]:
    blobs: list[bytes] = []
    cls_values: list[int] = []
    for uri in _shard_uris(spec, storage):
        for sample in _read_shard(uri, storage, skipped):
            image_key = next((k for k in sample if has_image_extension("." + k)), None)
            if image_key is None:
                skipped["sample without an image"] += 1
                continue
            try:
                cls_values.append(int(sample["cls"].decode().strip()))
            except (KeyError, ValueError, UnicodeDecodeError):
                skipped["sample without an integer cls"] += 1
                continue
            blobs.append(sample[image_key])
    if not blobs:
        raise DatasetError(f"dataset {spec}: no samples with an image and a cls field")
    values = sorted(set(cls_values))
    index = {v: i for i, v in enumerate(values)}
    items = _Items(blobs, np.asarray([index[v] for v in cls_values], dtype=np.int64))
    train, test = _stratified_split(items, test_fraction, seed, skipped)
    return [str(v) for v in values], train, test


def _read_shard(uri: str, storage: Storage, skipped: Counter[str]):
    """Samples of one tar as {".ext": bytes} dicts, grouped by key (the name up to the first dot)."""
    current_key, sample = None, {}
    try:
        with storage.open(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                key, dot, ext = base.partition(".")
                key = posixpath.join(folder, key)
                if key != current_key and sample:
                    yield sample
                    sample = {}
                current_key = key
                data = tar.extractfile(member)
                sample[ext.lower() if dot else ""] = data.read() if data else b""
    except (tarfile.TarError, OSError):
        # A truncated or corrupt shard keeps the samples read before the damage.
        skipped["unreadable shard"] += 1
    if sample:
        yield sample


# -- split and decode ------------------------------------------------------------------
def _stratified_split(items: _Items, test_fraction: float, seed: int,
                      skipped: Counter[str]) -> tuple[_Items, _Items]:
    """Per class, a seeded ``test_fraction`` (at least one image) goes to test, the rest to train."""
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for label in np.unique(items.labels):
        members = np.flatnonzero(items.labels == label)
        if len(members) < 2:
            skipped["class with a single image"] += 1
            continue
        members = rng.permutation(members)
        n_test = min(len(members) - 1, max(1, int(round(test_fraction * len(members)))))
        test_idx.extend(members[:n_test].tolist())
        train_idx.extend(members[n_test:].tolist())
    return _take(items, sorted(train_idx)), _take(items, sorted(test_idx))


def _take(items: _Items, idx: list[int] | np.ndarray) -> _Items:
    return _Items([items.refs[i] for i in idx], items.labels[np.asarray(idx, dtype=np.int64)])


def _subsample(items: _Items, limit: int | None, seed: int) -> _Items:
    if limit is None or len(items.refs) <= limit:
        return items
    idx = np.sort(np.random.default_rng(seed).permutation(len(items.refs))[:limit])
    return _take(items, idx)


def _decode_split(items: _Items, decode, skipped: Counter[str]) -> LabelledSplit:
    images, labels = [], []
    for ref, label in zip(items.refs, items.labels, strict=True):
        image = decode(ref)
        if image is None:
            skipped["undecodable image"] += 1
            continue
        images.append(image)
        labels.append(label)
    return LabelledSplit(images, np.asarray(labels, dtype=np.int64))


def _decode_array(ref: np.ndarray) -> np.ndarray:
    return ref


def _decode_bytes(ref: bytes | None) -> np.ndarray | None:
    """Bytes to a uint8 (H, W) or (H, W, 3) array; any mode is brought to grey or RGB."""
    if not ref:
        return None
    try:
        with Image.open(io.BytesIO(ref)) as im:
            im.load()
            if im.mode.startswith(("I", "F")):  # 16/32-bit grey: stretch to 8 bits, not clip
                values = np.asarray(im, dtype=np.float64)
                top = max(float(values.max()), 1e-12)
                return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
            grey = im.mode in ("1", "L", "LA") or (im.mode == "P" and _palette_is_grey(im))
            return np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _palette_is_grey(im: Image.Image) -> bool:
    palette = im.getpalette() or []
    rgb = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))
