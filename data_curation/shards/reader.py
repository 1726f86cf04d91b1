"""The streaming reader for training and evaluation: seeded epochs, rank/worker splits, exact resume.

``ShardDataset`` is a torch IterableDataset over a shard folder (local or s3://). What each
reader yields is fixed by (seed, epoch) and the layout in :mod:`.order`; ``start`` (the
global count of samples already consumed this epoch) resumes exactly where an unbroken
run would be. Samples are fetched by their index offsets, a block of neighbours per read,
so a resume seeks straight to its first sample instead of decoding what it skips. Within
a reader, samples are shuffled in blocks of ``shuffle_block`` (the in-memory buffer).

Every sample is checked before use: the CRC-32 of its bytes (both headers, the image, the
JSON) is the one in the index, and its members are regular files named ``KEY.EXT`` for the
indexed key, whose form (no folders, no dots, no odd characters) is checked when the index
is loaded. A bad or truncated sample is skipped, counted in ``counts`` by reason, logged,
and its position stays consumed. Samples are checked up to 256 at a time before the
first of them is decoded: in one tight loop the checks cost about half what they cost
between decodes, which leave the CPU caches cold.

In training, with B samples per rank and step::

    dataset = ShardDataset(f"{run_dir}/shard", storage, seed=seed, rank=rank, world_size=world,
                           batch_size=B, transform=augment)
    loader = DataLoader(dataset, batch_size=B, num_workers=W, collate_fn=collate)
    for epoch in range(first_epoch, epochs):
        dataset.set_epoch(epoch, start=step_in_epoch * B * world if epoch == first_epoch else 0)
        for batch in loader: ...

Every rank gets ``len(dataset)`` samples per epoch, so no rank runs dry before the others.
Leave ``persistent_workers`` off: workers copy the dataset, epoch and start included, when
an epoch's iteration begins.
"""
from __future__ import annotations

import io
import json
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data_curation.shards.index import read_index, read_shard_list
from data_curation.shards.members import BLOCK, SAFE_EXT, SAFE_KEY, holds_member
from data_curation.shards.order import StreamLayout, block_order, shard_order
from data_curation.storage import Storage, StorageError

log = logging.getLogger(__name__)
_CHECK_BATCH = 256  # samples checked together; also the most a resume checks before its first sample


@dataclass(frozen=True)
class ShardTable:
    """The index as compact arrays: rows are samples, grouped by shard in shard-list order."""

    shard_uris: list[str]
    shard_names: list[str]
    shard_counts: np.ndarray  # (S,) samples per shard
    shard_first_row: np.ndarray  # (S,) row of each shard's first sample
    row_shard: np.ndarray  # (N,) shard number of each row
    keys: list[str]
    offsets: np.ndarray  # (N,) byte offset of each sample's first member header
    sizes: np.ndarray  # (N,) bytes from that offset to the end of the sample's last member
    image_exts: list[str]
    crc32: np.ndarray  # (N,) CRC-32 of each sample's ``sizes`` bytes at ``offsets``
    members: np.ndarray  # (N, 4) image data offset and size, JSON data offset and size, from ``offsets``

    @property
    def num_samples(self) -> int:
        return len(self.keys)


def load_shard_table(shard_dir: str, storage: Storage) -> ShardTable:
    entries = read_shard_list(shard_dir, storage)
    index = read_index(shard_dir, storage)
    counts = np.array([e["nsamples"] for e in entries], dtype=np.int64)
    names = [e["url"].rsplit("/", 1)[-1] for e in entries]
    expected = np.repeat(np.array(names, dtype=object), counts)
    if "crc32" not in index.column_names:
        raise ValueError(f"{shard_dir}: index.parquet has no crc32 column (written by an older vfm); "
                         "rerun the shard stage")
    if index.num_rows != counts.sum() or not np.array_equal(np.array(index["shard"].to_pylist(), dtype=object),
                                                            expected):
        raise ValueError(f"{shard_dir}: index.parquet does not match shards.json; rerun the shard stage")
    for column, pattern in (("key", SAFE_KEY), ("image_ext", SAFE_EXT)):
        unsafe = pc.invert(pc.match_substring_regex(index[column], pattern).fill_null(False))
        if pc.any(unsafe).as_py():
            bad = index[column].filter(unsafe)[0].as_py()
            raise ValueError(f"{shard_dir}: index.parquet holds an unsafe {column} {bad!r}; "
                             "keys are [A-Za-z0-9_-] and extensions [a-z0-9]")
    offsets = index["offset"].to_numpy()
    members = np.stack([index["image_offset"].to_numpy() - offsets, index["image_size"].to_numpy(),
                        index["json_offset"].to_numpy() - offsets, index["json_size"].to_numpy()], axis=1)
    return ShardTable(
        shard_uris=[e["uri"] for e in entries], shard_names=names, shard_counts=counts,
        shard_first_row=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts,
        row_shard=np.repeat(np.arange(len(entries)), counts), keys=index["key"].to_pylist(),
        offsets=offsets, sizes=index["size"].to_numpy(), image_exts=index["image_ext"].to_pylist(),
        crc32=index["crc32"].to_numpy(), members=members)


def decode_rgb(data: bytes | memoryview) -> Image.Image:
    """The image as an RGB PIL image (fully decoded, so errors surface here)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class ShardDataset(IterableDataset):
    """Samples of a shard folder as dicts: ``__key__``, ``__position__`` (global stream position),
    ``image`` (RGB PIL image, the raw bytes with ``decode=False``, or ``transform(image)``) and
    ``json`` (the sample's metadata).

    In a DataLoader, pass its ``batch_size`` here too: the DataLoader takes whole batches from
    its workers in turn, and the dataset must know that to place each sample in the global
    stream. ``counts`` (samples yielded, bad samples by reason) is kept per process, so in
    DataLoader workers it lives in the workers; bad samples are logged there too.
    """

    def __init__(self, shard_dir: str, storage: Storage | None = None, *, seed: int = 0, epoch: int = 0,
                 start: int = 0, rank: int = 0, world_size: int = 1, batch_size: int = 1,
                 shuffle: bool = True, shuffle_block: int = 256, drop_uneven: bool = False,
                 decode: bool = True, transform: Callable[[Image.Image], Any] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if shuffle_block < 1:
            raise ValueError(f"shuffle_block must be >= 1, got {shuffle_block}")
        self.storage = storage or Storage()
        self.table = load_shard_table(shard_dir, self.storage)
        self.seed, self.epoch, self.start = seed, epoch, start
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.shuffle, self.shuffle_block, self.drop_uneven = shuffle, shuffle_block, drop_uneven
        self.decode, self.transform = decode, transform
        self.counts: Counter = Counter()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Read ``epoch`` next, from global position ``start`` (the samples of it already consumed)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        """Samples this rank reads per epoch (the same on every rank)."""
        return StreamLayout(self.world_size, drop_uneven=self.drop_uneven).rank_length(self.table.num_samples)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.stream(worker, num_workers)

    # -- the stream of one reader ------------------------------------------------------
    def stream(self, worker: int = 0, num_workers: int = 1) -> Iterator[dict]:
        """The samples of reader (rank, ``worker``) from the resume point to the end of the epoch."""
        layout = StreamLayout(self.world_size, num_workers, self.batch_size, self.drop_uneven)
        table = self.table
        worker = layout.role(self.start, self.rank, worker)
        first, count = layout.reader_range(table.num_samples, self.rank, worker)
        done = min(layout.consumed(self.start, self.rank, worker), count)
        order = shard_order(len(table.shard_counts), self.seed, self.epoch, self.shuffle)
        ends = np.cumsum(table.shard_counts[order])
        block = self.shuffle_block
        files: dict[int, Any] = {}
        try:
            for block_start in range(done - done % block, count, block):
                length = min(block, count - block_start)
                rows = self._epoch_rows(first + block_start + np.arange(length), order, ends)
                within = block_order(self.seed, self.epoch, first + block_start, length) if block > 1 \
                    else np.arange(length)
                skip = max(0, done - block_start)
                picked = rows[within[skip:]]
                spans = self._fetch(np.unique(picked), files)
                for at in range(0, len(picked), _CHECK_BATCH):
                    checked = [self._check(row, spans.get(row)) for row in picked[at:at + _CHECK_BATCH].tolist()]
                    for j, parts in enumerate(checked, start=block_start + skip + at):
                        sample = None if parts is None else \
                            self._sample(*parts, layout.global_position(self.rank, worker, j))
                        if sample is not None:
                            yield sample
        finally:
            for f in files.values():
                f.close()

    def _epoch_rows(self, positions: np.ndarray, order: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Index rows at epoch-sequence ``positions`` (past the end they wrap: the padding)."""
        positions = positions % self.table.num_samples
        slot = np.searchsorted(ends, positions, side="right")
        shard = order[slot]
        return self.table.shard_first_row[shard] + positions - (ends[slot] - self.table.shard_counts[shard])

    def _fetch(self, rows: np.ndarray, files: dict[int, Any]) -> dict[int, memoryview | None]:
        """The bytes of each sample in ``rows`` (sorted), one read per run of neighbouring samples."""
        table, spans = self.table, {}
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []
        for run in runs:
            for shard in np.unique(table.row_shard[run]):
                part = run[table.row_shard[run] == shard]
                lo, hi = int(table.offsets[part[0]]), int(table.offsets[part[-1]] + table.sizes[part[-1]])
                data = self._read(int(shard), lo, hi - lo, files)
                view = None if data is None else memoryview(data)
                for row, offset in zip(part.tolist(), table.offsets[part].tolist(), strict=True):
                    spans[row] = None if view is None else view[offset - lo:]
        return spans

    def _read(self, shard: int, offset: int, size: int, files: dict[int, Any]) -> bytes | None:
        """``size`` bytes at ``offset`` of a shard; fewer if the shard is truncated, None if unreadable."""
        try:
            if shard not in files:
                for f in files.values():
                    f.close()
                files.clear()
                files[shard] = self.storage.open(self.table.shard_uris[shard], "rb")
            f = files[shard]
            f.seek(offset)
            return f.read(size)
        except (OSError, StorageError) as exc:
            log.warning("cannot read shard %s: %s", self.table.shard_uris[shard], exc)
            return None

    def _check(self, row: int, span: memoryview | None) -> tuple[int, str, memoryview, dict] | None:
        """(row, key, image bytes, metadata) of a sample that passes every check, else None (counted)."""
        table = self.table
        if span is None:
            return self._skip("unreadable", row, "the shard cannot be read")
        size = int(table.sizes[row])
        if len(span) < size:
            return self._skip("truncated", row, "the shard ends before this sample")
        if zlib.crc32(span[:size]) != table.crc32[row]:
            return self._skip("bad_checksum", row, "the sample's CRC-32 differs from the index")
        image_at, image_size, meta_at, meta_size = table.members[row].tolist()
        key = table.keys[row]
        if not (BLOCK <= image_at and image_at + image_size + BLOCK <= meta_at and meta_at + meta_size <= size
                and holds_member(span, 0, f"{key}.{table.image_exts[row]}".encode())
                and holds_member(span, meta_at - BLOCK, f"{key}.json".encode())):
            return self._skip("bad_member", row, f"the members are not {key}.{table.image_exts[row]} "
                              f"and {key}.json at the indexed offsets")
        try:
            meta = json.loads(str(span[meta_at:meta_at + meta_size], "utf-8"))
        except ValueError as exc:
            return self._skip("bad_json", row, str(exc))
        return row, key, span[image_at:image_at + image_size], meta

    def _sample(self, row: int, key: str, image: memoryview, meta: dict, position: int) -> dict | None:
        if not self.decode:
            image = bytes(image)
        else:
            try:
                decoded = decode_rgb(image)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                return self._skip("bad_image", row, str(exc))
            image = self.transform(decoded) if self.transform else decoded
        self.counts["samples"] += 1
        return {"__key__": key, "__position__": position, "image": image, "json": meta}

    def _skip(self, reason: str, row: int, detail: str) -> None:
        """Count and log a bad sample; its position stays consumed."""
        self.counts[reason] += 1
        shard = self.table.shard_names[self.table.row_shard[row]]
        log.warning("skipping sample %s of %s (%s): %s", self.table.keys[row], shard, reason, detail)
        return None
