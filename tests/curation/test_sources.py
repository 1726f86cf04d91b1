import io
import tarfile

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data_curation.sources import SourceError, iter_source, iter_sources, read_many, split_tar_member_uri
from tests.curation.images import encode, rgb

PNG = encode(rgb(), "PNG")


def test_folder_listing_is_recursive_by_extension_and_by_sniffing(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.png").write_bytes(PNG)
    (tmp_path / "a" / "b" / "two.JPG").write_bytes(encode(rgb(), "JPEG"))
    (tmp_path / "noext").write_bytes(PNG)  # an image without extension: sniffed
    (tmp_path / "notes.txt").write_bytes(b"hello")  # not an image, no image extension: skipped
    (tmp_path / "fake.png").write_bytes(b"hello")  # image extension: listed (decoding rejects it)
    listed = list(iter_source(str(tmp_path)))
    names = sorted(u.rsplit("/", 1)[1] for u in listed)
    assert names == ["fake.png", "noext", "one.png", "two.JPG"]
    assert "noext" not in [u.rsplit("/", 1)[1] for u in iter_source(str(tmp_path), sniff=False)]


def test_uri_lists_in_parquet_and_csv_with_relative_entries(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(PNG)
    absolute = str(tmp_path / "img" / "x.png")
    pq.write_table(pa.table({"path": [absolute, "img/x.png"]}), tmp_path / "list.parquet")
    pacsv.write_csv(pa.table({"uri": ["img/x.png"]}), tmp_path / "list.csv")
    assert list(iter_source(str(tmp_path / "list.parquet"), uri_column="path")) == [absolute, absolute]
    assert list(iter_source(str(tmp_path / "list.csv"))) == [absolute]
    with pytest.raises(SourceError, match="no column 'uri'"):
        list(iter_source(str(tmp_path / "list.parquet")))


def test_webdataset_tar_members_are_items_and_read_back(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k1.png", PNG), ("k1.json", b"{}"), ("k2.jpg", b"xyz")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    uris = list(iter_source(str(shard)))
    assert [split_tar_member_uri(u)[1] for u in uris] == ["k1.png", "k2.jpg"]
    assert read_many(uris) == [PNG, b"xyz"]
    assert list(iter_source(str(tmp_path))) == uris  # a folder of shards expands them too


def test_missing_files_come_back_as_errors_not_raises(tmp_path):
    (tmp_path / "ok.png").write_bytes(PNG)
    out = read_many([str(tmp_path / "ok.png"), str(tmp_path / "gone.png")])
    assert out[0] == PNG and isinstance(out[1], FileNotFoundError)


def test_a_source_that_does_not_exist_names_itself(tmp_path):
    with pytest.raises(SourceError, match="nowhere does not exist"):
        list(iter_source(str(tmp_path / "nowhere")))
    (tmp_path / "one.png").write_bytes(PNG)
    with pytest.raises(SourceError, match="one.png is neither a folder"):
        list(iter_source(str(tmp_path / "one.png")))


def test_s3_prefix_source_on_the_real_server(s3):
    s3.storage.write_bytes(s3.uri("pool/a.png"), PNG)
    s3.storage.write_bytes(s3.uri("pool/sub/b.jpg"), encode(rgb(), "JPEG"))
    s3.storage.write_bytes(s3.uri("pool/sub/noext"), PNG)
    s3.storage.write_bytes(s3.uri("pool/readme.txt"), b"text")
    uris = list(iter_sources([s3.uri("pool")], s3.storage))
    assert uris == [s3.uri("pool/a.png"), s3.uri("pool/sub/b.jpg"), s3.uri("pool/sub/noext")]
    assert read_many(uris, s3.storage)[0] == PNG
