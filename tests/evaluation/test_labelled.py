"""Labelled datasets: seeded splits, ImageFolder (local and S3), WebDataset shards, and bad input."""
import gzip
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_curation.labelled import DatasetError, load_labelled


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(root, per_class=4, classes=("cat", "dog", "fox")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)))


def test_builtin_split_is_seeded_stratified_and_disjoint():
    a = load_labelled("builtin:lfw", seed=0)
    b = load_labelled("builtin:lfw", seed=0)
    c = load_labelled("builtin:lfw", seed=1)
    assert a.classes == ["face", "non-face"]
    assert (len(a.train), len(a.test)) == (160, 40)
    assert np.bincount(a.test.labels).tolist() == [20, 20]
    assert all(np.array_equal(x, y) for x, y in zip(a.test.images, b.test.images, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.test.images, c.test.images, strict=True))
    train_keys = {im.tobytes() for im in a.train.images}
    assert not any(im.tobytes() in train_keys for im in a.test.images)


def test_builtin_subsample_and_unknown_name():
    d = load_labelled("builtin:digits", max_train=100, max_test=30)
    assert (len(d.train), len(d.test)) == (100, 30) and d.train.images[0].shape == (8, 8)
    with pytest.raises(DatasetError, match="unknown built-in dataset 'builtin:cifar'"):
        load_labelled("builtin:cifar")


def test_image_folder_with_mixed_sizes_modes_and_bad_files(tmp_path):
    root = tmp_path / "pets"
    write_image_folder(root)
    rng = np.random.default_rng(1)
    (root / "cat" / "grey.png").write_bytes(png_bytes(rng.integers(0, 256, (30, 20), dtype=np.uint8)))
    (root / "dog" / "rgba.png").write_bytes(png_bytes(rng.integers(0, 256, (9, 15, 3), dtype=np.uint8), "RGBA"))
    (root / "dog" / "palette.png").write_bytes(png_bytes(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8), "P"))
    (root / "fox" / "deep.png").write_bytes(png_bytes(rng.integers(0, 65535, (7, 7), dtype=np.uint16)))
    (root / "fox" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "fox" / "notes.txt").write_text("hello")
    (root / "loose.png").write_bytes(png_bytes(rng.integers(0, 256, (5, 5), dtype=np.uint8)))
    (root / "owl").mkdir()
    (root / "owl" / "only.png").write_bytes(png_bytes(rng.integers(0, 256, (5, 5), dtype=np.uint8)))
    d = load_labelled(str(root), test_fraction=0.25)
    assert d.classes == ["cat", "dog", "fox", "owl"]
    assert d.skipped == {"not an image file": 1, "image outside a class folder": 1,
                         "class with a single image": 1, "undecodable image": 1}
    images = d.train.images + d.test.images
    assert len(images) == 3 * 4 + 4  # the broken jpeg and the single owl are gone
    assert all(im.dtype == np.uint8 and (im.ndim == 2 or im.shape[2] == 3) for im in images)
    assert {im.shape for im in images} >= {(12, 12, 3), (30, 20), (9, 15, 3), (10, 10, 3), (7, 7)}
    deep = next(im for im in images if im.shape == (7, 7))
    assert deep.max() == 255  # 16-bit grey is stretched to 8 bits, not clipped to white
    assert 3 not in d.train.labels and 3 not in d.test.labels


def test_image_folder_with_its_own_train_and_test_folders(tmp_path):
    write_image_folder(tmp_path / "train", per_class=3)
    write_image_folder(tmp_path / "val", per_class=2)
    d = load_labelled(str(tmp_path))
    assert (len(d.train), len(d.test)) == (9, 6)
    assert np.bincount(d.test.labels).tolist() == [2, 2, 2]


def test_missing_and_empty_datasets_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match=f"dataset {tmp_path / 'nope'}: no such folder"):
        load_labelled(str(tmp_path / "nope"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images in class sub-folders"):
        load_labelled(str(tmp_path / "empty"))
    (tmp_path / "one" / "a").mkdir(parents=True)
    (tmp_path / "one" / "a" / "x.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DatasetError, match="no decodable images left"):
        load_labelled(str(tmp_path / "one"))
    with pytest.raises(DatasetError, match="shard .*missing.tar does not exist"):
        load_labelled(str(tmp_path / "missing.tar"))


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_with_cls(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(2):
        samples = [(f"s{shard}_{i:03d}", {"png": png_bytes(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)),
                                          "cls": str(7 * (i % 2)).encode()}) for i in range(10)]
        samples.append((f"s{shard}_nocls", {"png": png_bytes(np.zeros((6, 6), np.uint8))}))
        write_shard(folder / f"shard-{shard:03d}.tar", samples)
    by_folder = load_labelled(str(folder))
    by_pattern = load_labelled(str(folder / "shard-{000..001}.tar"))
    assert by_folder.classes == ["0", "7"]
    assert len(by_folder.train) + len(by_folder.test) == 20
    assert by_folder.skipped == {"sample without an integer cls": 2}
    assert np.array_equal(by_folder.test.labels, by_pattern.test.labels)
    one = load_labelled(str(folder / "shard-000.tar"))
    assert len(one.train) + len(one.test) == 10


def test_gzipped_webdataset_shards_and_upper_case_extensions(tmp_path):
    rng = np.random.default_rng(5)
    samples = [(f"k{i:03d}", {"PNG": png_bytes(rng.integers(0, 256, (6, 6), dtype=np.uint8)),
                              "cls": str(i % 2).encode()}) for i in range(8)]
    write_shard(tmp_path / "plain.tar", samples)
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "shard-000.TGZ").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    for spec in (str(folder), str(folder / "shard-000.TGZ")):
        d = load_labelled(spec)
        assert d.classes == ["0", "1"] and len(d.train) + len(d.test) == 8 and not d.skipped


def test_image_folder_on_s3(s3):
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        for i in range(5):
            s3.storage.write_bytes(s3.uri(f"ds/{c}/{i}.png"),
                                   png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    s3.storage.write_bytes(s3.uri("ds/b/bad.png"), b"\x89PNG truncated")
    d = load_labelled(s3.uri("ds"), storage=s3.storage)
    assert d.classes == ["a", "b"]
    assert len(d.train) + len(d.test) == 10 and d.skipped == {"undecodable image": 1}
    with pytest.raises(DatasetError, match="no such folder"):
        load_labelled(s3.uri("nothing-here"), storage=s3.storage)


def test_webdataset_shards_on_s3(s3, tmp_path):
    rng = np.random.default_rng(4)
    samples = [(f"k{i:03d}", {"png": png_bytes(rng.integers(0, 256, (6, 6), dtype=np.uint8)),
                              "cls": str(i % 3).encode()}) for i in range(12)]
    write_shard(tmp_path / "a.tar", samples)
    s3.storage.put_file(tmp_path / "a.tar", s3.uri("wds/shard-000.tar"))
    d = load_labelled(s3.uri("wds"), storage=s3.storage)
    assert d.classes == ["0", "1", "2"] and len(d.train) + len(d.test) == 12
