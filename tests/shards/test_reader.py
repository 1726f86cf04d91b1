"""The streaming reader: every sample once per epoch over ranks and workers, exact resume, bad shards."""
from __future__ import annotations

import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data_curation.shards.build import ShardSpec, build_shards
from data_curation.shards.index import INDEX_FILE, INDEX_SCHEMA, read_index
from data_curation.shards.plan import ShardLimits
from data_curation.shards.reader import ShardDataset
from data_curation.storage import Storage

torch.set_num_threads(1)
LAYOUT = {"world_size": 2, "batch_size": 4}


def _all_readers(shard_dir: str, num_workers: int = 2, **kwargs) -> list[dict]:
    """What every (rank, worker) reader yields, sorted into global stream order."""
    kwargs = {**LAYOUT, "shuffle_block": 8, "decode": False, **kwargs}
    samples = []
    for rank in range(kwargs["world_size"]):
        dataset = ShardDataset(shard_dir, rank=rank, **kwargs)
        for worker in range(num_workers):
            samples += list(dataset.stream(worker, num_workers))
    return sorted(samples, key=lambda s: s["__position__"])


def test_two_ranks_two_workers_read_every_sample_once(built_once):
    samples = _all_readers(built_once.shard_dir, seed=5, epoch=0)
    assert Counter(s["__key__"] for s in samples) == Counter(built_once.pool.selected)
    assert [s["__position__"] for s in samples] == list(range(len(samples)))
    for s in samples[:20]:
        assert s["image"] == built_once.pool.source[s["__key__"]] or s["json"]["uri"].endswith(".bmp")
        assert s["json"]["id"] == s["__key__"]


def test_decoded_images_are_rgb(built_once):
    dataset = ShardDataset(built_once.shard_dir, shuffle_block=4)
    sample = next(iter(dataset))
    assert isinstance(sample["image"], Image.Image) and sample["image"].mode == "RGB"
    assert sample["image"].size == (24, 24)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch(built_once):
    keys = lambda **kw: [s["__key__"] for s in _all_readers(built_once.shard_dir, **kw)]  # noqa: E731
    assert keys(seed=1, epoch=0) == keys(seed=1, epoch=0)
    assert keys(seed=1, epoch=0) != keys(seed=1, epoch=1)
    assert keys(seed=1, epoch=0) != keys(seed=2, epoch=0)


@pytest.mark.parametrize("start", [1, 7, 33, 101, 178])
def test_resume_equals_the_tail_of_an_unbroken_stream(built_once, start):
    full = _all_readers(built_once.shard_dir, seed=4, epoch=2)
    resumed = _all_readers(built_once.shard_dir, seed=4, epoch=2, start=start)
    assert [(s["__position__"], s["__key__"]) for s in resumed] == \
           [(s["__position__"], s["__key__"]) for s in full[start:]]


def test_resume_reads_only_from_the_index_offset(built_once, monkeypatch):
    """Resuming near the end reads a few samples' bytes, not the shards before them."""
    read_bytes = Counter()
    dataset = ShardDataset(built_once.shard_dir, shuffle_block=8, decode=False, start=170)
    original = dataset._read

    def counting_read(shard, offset, size, files):
        read_bytes["bytes"] += size
        return original(shard, offset, size, files)

    monkeypatch.setattr(dataset, "_read", counting_read)
    tail = list(dataset)
    assert len(tail) == 10
    assert read_bytes["bytes"] < 16 * 4096  # two blocks of 8 small samples at most


def test_torch_dataloader_workers_follow_the_global_stream(built_once):
    """A real DataLoader with 2 worker processes yields this rank's part of the stream in order."""
    rank = 1
    dataset = ShardDataset(built_once.shard_dir, rank=rank, seed=9, epoch=3, shuffle_block=8, decode=False,
                           **LAYOUT)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=lambda batch: batch)
    got = [(s["__position__"], s["__key__"]) for batch in loader for s in batch]
    expected = [(s["__position__"], s["__key__"])
                for s in _all_readers(built_once.shard_dir, seed=9, epoch=3) if s["__position__"] % 2 == rank]
    assert got == expected
    assert [p for p, _ in got] == [rank + 2 * q for q in range(len(dataset))]


def test_a_dataloader_resumed_at_a_step_continues_the_unbroken_run(built_once):
    """Resuming at an odd step (its next batch belongs to worker 1) still gives the unbroken order."""
    def positions(start: int) -> list[int]:
        dataset = ShardDataset(built_once.shard_dir, rank=0, seed=9, epoch=1, start=start, shuffle_block=8,
                               decode=False, **LAYOUT)
        loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=lambda batch: batch)
        return [s["__position__"] for batch in loader for s in batch]

    step = 3
    assert positions(step * 4 * 2) == positions(0)[step * 4:]


def test_more_ranks_than_shards_all_read_the_same_count(tmp_path, pool):
    spec = ShardSpec(prefix="big", limits=ShardLimits(samples=100, max_bytes=1 << 20, seed=0))
    shard_dir = str(tmp_path / "shard")
    build_shards(pool.manifest_uri, shard_dir, str(tmp_path / "work"), spec, log=lambda _: None)
    total = len(pool.selected)  # 180 samples in 2 shards, read by 8 ranks
    per_rank = []
    for rank in range(8):
        dataset = ShardDataset(shard_dir, rank=rank, world_size=8, shuffle_block=4, decode=False)
        per_rank.append([s["__key__"] for s in dataset])
        assert len(per_rank[-1]) == len(dataset) == -(-total // 8)
    counts = Counter(k for keys in per_rank for k in keys)
    assert set(counts) == pool.selected and sum(counts.values()) - total == 8 * len(per_rank[0]) - total
    dropped = [len(list(ShardDataset(shard_dir, rank=r, world_size=7, drop_uneven=True, decode=False)))
               for r in range(7)]
    assert dropped == [total // 7] * 7


def test_truncated_shard_skips_and_counts_its_lost_samples(built):
    shard = sorted(Path(built.shard_dir, "shards").iterdir())[2]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    dataset = ShardDataset(built.shard_dir, shuffle_block=8, decode=False)
    samples = list(dataset)
    lost = dataset.counts["truncated"]
    assert 0 < lost < 30 and len(samples) == len(built.pool.selected) - lost
    assert dataset.counts["samples"] == len(samples)


def _rewrite_index(shard_dir: str, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), Path(shard_dir, INDEX_FILE))


def test_corrupt_image_and_unsafe_member_name_are_skipped(built):
    """A broken image fails the CRC; a forged member name fails even with a CRC made to match."""
    index = read_index(built.shard_dir, Storage()).to_pylist()
    first, second = index[0], index[1]
    path = Path(built.shard_dir, "shards", first["shard"])
    data = bytearray(path.read_bytes())
    evil = tarfile.TarInfo(f"../{first['key']}.{first['image_ext']}")
    evil.size = first["image_size"]
    data[first["offset"]:first["offset"] + 512] = evil.tobuf(format=tarfile.USTAR_FORMAT)
    first["crc32"] = zlib.crc32(data[first["offset"]:first["offset"] + first["size"]])
    data[second["image_offset"] + 2:second["image_offset"] + 40] = bytes(38)  # breaks the image, and its CRC
    path.write_bytes(bytes(data))
    _rewrite_index(built.shard_dir, index)
    dataset = ShardDataset(built.shard_dir, shuffle=False, shuffle_block=1)
    keys = [s["__key__"] for s in dataset]
    assert (dataset.counts["bad_member"], dataset.counts["bad_checksum"]) == (1, 1)
    assert first["key"] not in keys and second["key"] not in keys
    assert len(keys) == len(built.pool.selected) - 2


@pytest.mark.parametrize("column, value", [("key", "../etc/passwd"), ("key", "a.b"), ("image_ext", "j/pg")])
def test_an_index_with_an_unsafe_key_or_extension_is_refused(built, column, value):
    index = read_index(built.shard_dir, Storage()).to_pylist()
    index[3][column] = value
    _rewrite_index(built.shard_dir, index)
    with pytest.raises(ValueError, match=f"unsafe {column}"):
        ShardDataset(built.shard_dir)


def test_a_missing_shard_is_counted_unreadable_and_the_rest_is_read(built):
    shard = sorted(Path(built.shard_dir, "shards").iterdir())[1]
    shard.unlink()
    dataset = ShardDataset(built.shard_dir, shuffle_block=8, decode=False)
    samples = list(dataset)
    assert dataset.counts["unreadable"] == 30 and len(samples) == len(built.pool.selected) - 30


def test_flipped_bytes_that_still_parse_are_caught_by_the_crc(built):
    """A changed JSON digit and a changed header mtime leave every member readable; the CRC sees both."""
    index = read_index(built.shard_dir, Storage()).to_pylist()
    first, second = index[0], index[1]
    path = Path(built.shard_dir, "shards", first["shard"])
    data = bytearray(path.read_bytes())
    meta = bytes(data[first["json_offset"]:first["json_offset"] + first["json_size"]])
    digit = meta.index(b'"width":') + len(b'"width":')
    data[first["json_offset"] + digit] = ord("9") if meta[digit] != ord("9") else ord("8")
    data[second["offset"] + 136] = ord("1")  # the first digit of the image header's mtime
    path.write_bytes(bytes(data))
    dataset = ShardDataset(built.shard_dir, shuffle=False, shuffle_block=1, decode=False)
    keys = [s["__key__"] for s in dataset]
    assert dataset.counts["bad_checksum"] == 2 and dataset.counts["bad_member"] == 0
    assert first["key"] not in keys and second["key"] not in keys
