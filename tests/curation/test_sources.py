"""Image sources (folders, URI lists, WebDataset tars, S3 prefixes) and reading their items back."""

import io
import os
import tarfile

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data_curation.decode import DecodeLimits
from data_curation.scan import decode_rows
from data_curation.sources import (
    _SPAN_GAP,
    Listed,
    ListingCursor,
    ListingProblems,
    SourceError,
    _merged_spans,
    iter_listed,
    iter_source,
    iter_sources,
    read_many,
    split_tar_member_uri,
)
from data_curation.storage import Storage, StorageError
from tests.curation.images import encode, rgb, write_tar
from tests.s3server import storage_at

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


def test_uri_lists_in_parquet_and_csv_with_relative_entries(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(PNG)
    absolute = str(tmp_path / "img" / "x.png")
    pq.write_table(pa.table({"path": [absolute, "img/x.png"]}), tmp_path / "list.parquet")
    pacsv.write_csv(pa.table({"uri": ["img/x.png"]}), tmp_path / "list.csv")
    assert list(iter_source(str(tmp_path / "list.parquet"), uri_column="path")) == [absolute, absolute]
    assert list(iter_source(str(tmp_path / "list.csv"))) == [absolute]
    with pytest.raises(SourceError, match="no column 'uri'"):
        list(iter_source(str(tmp_path / "list.parquet")))
    # A list named as a file:// URI, or by a path relative to the working folder: the same
    # absolute URIs, which a run started from another folder (a resume) still reads.
    assert list(iter_source(f"file://{tmp_path}/list.csv")) == [absolute]
    monkeypatch.chdir(tmp_path / "img")
    assert list(iter_source("../list.csv")) == [absolute]
    assert read_many([absolute, f"file://{absolute}"]) == [PNG, PNG]
    assert Storage.join(f"file://{tmp_path}", "img", "x.png") == f"file://{absolute}"


def test_webdataset_tar_members_are_items_and_read_back(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    write_tar(shard, {"k1.png": PNG, "k1.json": b"{}", "k2.jpg": b"xyz"})
    uris = list(iter_source(str(shard)))
    assert [split_tar_member_uri(u)[1] for u in uris] == ["k1.png", "k2.jpg"]
    assert read_many(uris) == [PNG, b"xyz"]
    assert list(iter_source(str(tmp_path))) == uris  # a folder of shards expands them too


def test_gzipped_tars_are_shards_too_and_a_repeated_member_name_is_listed_once(tmp_path):
    shard = tmp_path / "shard.tgz"
    with tarfile.open(shard, "w:gz") as tar:  # k2.jpg twice, as a careless re-pack leaves it
        for name, data in (("k1.png", PNG), ("k2.jpg", b"first"), ("k3.txt", b""), ("k4.png", b"four"),
                           ("k2.jpg", b"second")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    problems = ListingProblems()
    uris = list(iter_source(str(shard), problems=problems))
    assert [split_tar_member_uri(u)[1] for u in uris] == ["k1.png", "k2.jpg", "k4.png"]
    assert read_many(uris) == [PNG, b"first", b"four"]  # a reader of the name gets the listed member
    assert problems.lines() == [f"tar {shard} repeats 1 image member names: only the first member of each name is listed"]
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "s.tar.gz").write_bytes(shard.read_bytes())
    assert [split_tar_member_uri(u) for u in iter_source(str(tmp_path / "pool"))] == [
        (str(tmp_path / "pool" / "s.tar.gz"), name) for name in ("k1.png", "k2.jpg", "k4.png")]


def test_names_that_no_uri_can_hold_are_skipped_and_reported_not_a_failed_listing(tmp_path):
    pool = os.fsencode(tmp_path / "pool")
    os.makedirs(os.path.join(pool, b"caf\xe9"))  # Latin-1 names, as old archives and zips leave them
    for name in (b"ok.png", b"caf\xe9.png", b"caf\xe9/inside.png"):
        with open(os.path.join(pool, name), "wb") as f:
            f.write(PNG)
    with tarfile.open(os.path.join(pool, b"s.tar"), "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name in ("k1.png", "caf\xe9.png", "caf\xe9-2.png", "2024-01-01T10::00.png"):
            info = tarfile.TarInfo(name)
            info.size = len(PNG)
            tar.addfile(info, io.BytesIO(PNG))
    problems = ListingProblems()
    uris = list(iter_source(str(tmp_path / "pool"), problems=problems))
    assert uris == [f"{tmp_path}/pool/ok.png", f"tar://k1.png::{tmp_path}/pool/s.tar"]
    assert problems.lines() == [
        f"tar {tmp_path}/pool/s.tar has 2 image members with a name that is not UTF-8: not listed",
        f"tar {tmp_path}/pool/s.tar has 1 image member with a name that holds '::' (a tar member URI's separator): "
        f"not listed",
        f"folder {tmp_path}/pool/caf\\xe9 has a name that is not UTF-8: not listed",
        f"file {tmp_path}/pool/caf\\xe9.png has a name that is not UTF-8: not listed"]
    assert read_many(uris) == [PNG, PNG]


def test_avif_and_jpeg2000_are_listed_by_extension_and_by_sniffing(tmp_path):
    for fmt, ext in (("AVIF", "avif"), ("JPEG2000", "jp2")):
        (tmp_path / f"named.{ext}").write_bytes(encode(rgb(), fmt))
        (tmp_path / f"nameless-{ext}").write_bytes(encode(rgb(), fmt))
    (tmp_path / "codestream").write_bytes(encode(rgb(), "JPEG2000", no_jp2=True))  # a bare J2K stream
    listed = sorted(u.rsplit("/", 1)[1] for u in iter_source(str(tmp_path)))
    assert listed == ["codestream", "named.avif", "named.jp2", "nameless-avif", "nameless-jp2"]


@pytest.mark.parametrize("remote", [False, True])
def test_tar_members_with_a_listed_span_are_read_alone(tmp_path, remote, request):
    storage, root = storage_at(request, tmp_path, "pool", remote)
    local = tmp_path / "shard.tar"
    offsets = write_tar(local, {f"k{i}.png": encode(rgb(seed=i), "PNG") for i in range(4)} | {"k4.json": b"{}"})
    shard = storage.join(root, "shard.tar")
    storage.write_bytes(shard, local.read_bytes())
    listed = list(iter_listed([shard], storage))
    assert [item.span[0] for item in listed] == offsets[:4]
    uris, spans = [item.uri for item in listed], [item.span for item in listed]
    members = [encode(rgb(seed=i), "PNG") for i in range(4)]
    assert read_many(uris, storage, spans) == read_many(uris, storage) == members
    # A garbled header before them: a pass over the tar breaks there, a member read alone does not
    data = bytearray(local.read_bytes())
    data[offsets[1] + 148:offsets[1] + 156] = b"garbage!"  # the header's checksum
    storage.write_bytes(shard, bytes(data))
    assert read_many(uris[2:], storage, spans[2:]) == members[2:]
    assert not any(isinstance(got, bytes) for got in read_many(uris[2:], storage))  # the pass ends there
    # Spans that no longer hold their members (the tar rewritten in another order): one pass over the tar
    write_tar(local, {f"k{i}.png": encode(rgb(seed=i), "PNG") for i in (3, 2, 1, 0)})
    storage.write_bytes(shard, local.read_bytes())
    assert read_many(uris, storage, spans) == members
    # Cut after its first member: spans past the end (S3 answers 416) are the tar's damage, not the store's
    write_tar(local, {f"k{i}.png": encode(rgb(seed=i), "PNG") for i in range(4)})
    storage.write_bytes(shard, local.read_bytes()[:offsets[1]])
    got = read_many(uris, storage, spans)
    assert got[0] == members[0] and not any(isinstance(g, bytes | StorageError) for g in got[1:]), got
    storage.rm(shard)
    assert all(isinstance(got, FileNotFoundError) for got in read_many(uris, storage, spans))


def test_spans_past_the_end_of_a_cut_tar_are_its_damage_not_the_stores_on_aws_like_s3(moto_bucket, tmp_path):
    """AWS S3 (and moto) answer a range past an object's end with 416 InvalidRange, which is no
    store outage: the members are read in a pass over the tar, which tells what it holds."""
    client, bucket, storage = moto_bucket
    offsets = write_tar(tmp_path / "shard.tar", {f"k{i}.png": encode(rgb(seed=i), "PNG") for i in range(3)})
    data = (tmp_path / "shard.tar").read_bytes()
    client.put_object(Bucket=bucket, Key="shard.tar", Body=data)
    listed = list(iter_listed([f"s3://{bucket}/shard.tar"], storage))
    client.put_object(Bucket=bucket, Key="shard.tar", Body=data[:offsets[1]])  # cut after its first member
    got = read_many([item.uri for item in listed[1:]], storage, [item.span for item in listed[1:]])  # a later batch
    assert all(isinstance(g, FileNotFoundError) for g in got), got  # not in the tar any more


def test_member_spans_close_together_are_read_as_one_range():
    spans = [(0, 1024), (2048, 3072), (1024, 2048), (3072 + _SPAN_GAP + 1, 4 * _SPAN_GAP), None]
    assert _merged_spans([3, 0, 1, 2], spans) == [((0, 3072), [0, 2, 1]), ((3073 + _SPAN_GAP, 4 * _SPAN_GAP), [3])]


def test_members_of_a_gzipped_tar_have_no_span(tmp_path):
    shard = tmp_path / "shard.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        info = tarfile.TarInfo("k0.png")
        info.size = len(PNG)
        tar.addfile(info, io.BytesIO(PNG))
    assert list(iter_listed([str(shard)])) == [Listed(f"tar://k0.png::{shard}", None)]


@pytest.mark.parametrize("damage, listed", [
    ("cut inside the third header", 2),
    ("cut inside the third member's data", 3),
    ("garbled third header", 2),
    ("cut at the third header", 2),
    ("empty file", 0),
    ("not a tar", 0),
])
def test_a_broken_tar_keeps_the_members_before_the_break_and_is_reported(tmp_path, damage, listed):
    shard = tmp_path / "shard.tar"
    offsets = write_tar(shard, {f"k{i}.png": PNG for i in range(4)})
    data = shard.read_bytes()
    third = offsets[2]
    data = {"cut inside the third header": data[:third + 100],
            "cut inside the third member's data": data[:third + 512 + 40],
            "garbled third header": data[:third] + b"x" * 512 + data[third + 512:],
            "cut at the third header": data[:third],
            "empty file": b"",
            "not a tar": b"this is not a tar archive\n" * 40}[damage]
    shard.write_bytes(data)
    whole = tmp_path / "whole.tar"
    write_tar(whole, {f"k{i}.png": PNG for i in range(2)})
    problems = ListingProblems()
    uris = list(iter_sources([str(shard), str(whole)], problems=problems))
    assert [split_tar_member_uri(u) for u in uris] == (
        [(str(shard), f"k{i}.png") for i in range(listed)] + [(str(whole), f"k{i}.png") for i in range(2)])
    assert len(problems.broken_tars) == 1 and str(shard) in problems.broken_tars[0]
    assert problems.lines() == problems.broken_tars  # the complete tar is not reported


def _sources_of_every_kind(tmp_path, storage, root) -> list[str]:
    """A folder (files, a sniffed file, a text file, a whole tar, a tar cut short, a dot file),
    then a tar and a URI list with blank rows: every way a listing can stand between two URIs."""
    whole, short = tmp_path / "whole.tar", tmp_path / "short.tar"
    write_tar(whole, {f"w{i}.png": PNG for i in range(3)})
    offsets = write_tar(short, {f"s{i}.png": PNG for i in range(4)})
    short.write_bytes(short.read_bytes()[:offsets[2] + 100])
    files = {"a.png": PNG, "b/c.png": PNG, "b/d.tar": whole.read_bytes(), "b/e": PNG, "b/notes.txt": b"text",
             "b.png": PNG, "c/.hidden.png": PNG, "c/short.tar": short.read_bytes(), "c/z.png": PNG}
    for name, data in files.items():
        storage.write_bytes(storage.join(root, "pool", name), data)
    storage.write_bytes(storage.join(root, "solo.tar"), whole.read_bytes())
    listed = pa.table({"uri": [storage.join(root, "pool", "a.png"), None, "", storage.join(root, "pool", "b.png"),
                               "  ", storage.join(root, "pool", "c", "z.png")]})
    buf = pa.BufferOutputStream()
    pq.write_table(listed, buf)
    storage.write_bytes(storage.join(root, "list.parquet"), buf.getvalue().to_pybytes())
    return [storage.join(root, "pool"), storage.join(root, "solo.tar"), storage.join(root, "list.parquet")]


@pytest.mark.parametrize("remote", [False, True])
def test_a_listing_picks_up_from_its_cursor_after_any_uri_it_gave(tmp_path, remote, request):
    storage, root = storage_at(request, tmp_path, "src", remote)
    sources = _sources_of_every_kind(tmp_path, storage, root)
    problems, cursor, stops, uris = ListingProblems(), ListingCursor(), [], []
    for uri in iter_sources(sources, storage, problems=problems, cursor=cursor):
        uris.append(uri)
        stops.append(cursor.to_json())  # what a listing chunk ending here would keep
    assert len(uris) == 10 + 3 + 3  # the folder's images and tar members, solo.tar's members, the list
    assert problems.bad_rows == 3 and len(problems.broken_tars) == 1
    for i, stop in enumerate(stops):
        picked_up = ListingCursor.from_json(stop)
        again = picked_up.problems.copy()
        assert list(iter_sources(sources, storage, problems=again, cursor=picked_up)) == uris[i + 1:], stop
        assert again == problems, stop  # each met once, before the stop or after it
        assert picked_up.to_json() == cursor.to_json()


def test_blank_and_malformed_rows_of_a_uri_list_are_skipped_and_counted(tmp_path):
    (tmp_path / "x.png").write_bytes(PNG)
    (tmp_path / "0001").write_bytes(PNG)
    pq.write_table(pa.table({"uri": [str(tmp_path / "x.png"), None, "", "  "]}), tmp_path / "list.parquet")
    problems = ListingProblems()
    assert list(iter_source(str(tmp_path / "list.parquet"), problems=problems)) == [str(tmp_path / "x.png")]
    assert problems.bad_rows == 3 and problems.lines() == ["3 blank or malformed rows in URI lists"]
    (tmp_path / "list.csv").write_text("uri,label\nx.png,a\n0001,b\nx.png,c,extra\n,d\n")
    problems = ListingProblems()
    assert list(iter_source(str(tmp_path / "list.csv"), problems=problems)) == [
        str(tmp_path / "x.png"), str(tmp_path / "0001")]  # "0001" stays a name, not the number 1
    assert problems.bad_rows == 2  # the row with a third field, the row with no URI


def test_a_csv_row_short_of_later_columns_keeps_its_uri(tmp_path):
    # A row that stops before the header's later columns (a trailing label left out) still names
    # its image; with no field where the URI column is, it is a bad row. Such rows come after
    # the rows of the batch being read, the same way every time.
    (tmp_path / "list.csv").write_text('label,uri,note\na,x.png,ok\nb,"y,1.png"\nc\nd,z.png,ok\n')
    problems = ListingProblems()
    assert list(iter_source(str(tmp_path / "list.csv"), problems=problems)) == [
        str(tmp_path / "x.png"), str(tmp_path / "z.png"), str(tmp_path / "y,1.png")]
    assert problems.bad_rows == 1  # "c": no URI field


def test_a_csv_list_whose_rows_are_all_short_lists_every_uri(tmp_path):
    # No row is whole, so the reader gives no batch at all: the short rows still come out.
    (tmp_path / "list.csv").write_text("uri,label\na.png\nb.png\n")
    problems = ListingProblems()
    assert list(iter_source(str(tmp_path / "list.csv"), problems=problems)) == [
        str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert problems.bad_rows == 0


def test_a_short_csv_row_too_long_for_csv_is_one_bad_row_not_an_unreadable_list(tmp_path):
    (tmp_path / "list.csv").write_text("uri,label,note\nx.png,a,ok\n" + "y" * 140_000 + ".png,b\nz.png,c,ok\n")
    problems = ListingProblems()
    assert list(iter_source(str(tmp_path / "list.csv"), problems=problems)) == [
        str(tmp_path / "x.png"), str(tmp_path / "z.png")]
    assert problems.bad_rows == 1


def test_a_csv_list_reads_only_its_uri_column(tmp_path):
    # pyarrow infers a column's type from the first block (1 MiB): a later "cat" in a column of
    # numbers failed the whole list, on every attempt, though the column is never used
    rows = 80_000
    text = "label,uri\n" + "".join(f"{i},x{i}.png\n" for i in range(rows)) + "cat,last.png\n\n"
    (tmp_path / "list.csv").write_text(text)
    assert len(text) > 1 << 20
    problems = ListingProblems()
    uris = list(iter_source(str(tmp_path / "list.csv"), problems=problems))
    assert len(uris) == rows + 1 and uris[-1] == str(tmp_path / "last.png")
    assert problems.bad_rows == 1  # the blank line at the end is a blank row


def test_rows_of_a_csv_list_that_are_not_utf8_or_swallow_line_breaks_are_bad_rows(tmp_path):
    (tmp_path / "list.csv").write_bytes(b'uri\nx.png\nb\xe9.png\ny.png\n"open.png\nz.png\n')
    problems = ListingProblems()
    assert list(iter_source(str(tmp_path / "list.csv"), problems=problems)) == [
        str(tmp_path / "x.png"), str(tmp_path / "y.png")]  # the rest of the list after the open quote is one value
    assert problems.bad_rows == 2


@pytest.mark.parametrize("name, data", [("list.parquet", b"not parquet at all"), ("list.csv", b"")])  # empty: not even a header
def test_a_uri_list_that_cannot_be_parsed_names_itself(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(SourceError, match=rf"^source list {tmp_path / name} cannot be read: "):
        list(iter_source(str(tmp_path / name)))


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


def test_s3_keys_holding_a_double_colon_are_plain_keys_not_chained_urls(s3):
    colon = s3.uri("pool/2024-01-01T10::00.png")  # fsspec would read "::" as a chain of filesystems
    s3.storage.write_bytes(colon, PNG)
    s3.storage.write_bytes(s3.uri("pool/b.png"), b"b")
    other = encode(rgb(seed=1), "PNG")
    s3.storage.write_bytes(s3.uri("pool/2024-01-01T10"), other)  # the key before the "::": another image
    uris = list(iter_sources([s3.uri("pool")], s3.storage))
    assert uris == [s3.uri("pool/2024-01-01T10"), colon, s3.uri("pool/b.png")]
    assert read_many([colon, s3.uri("pool/b.png")], s3.storage) == [PNG, b"b"]  # first in its batch
    assert read_many(uris, s3.storage) == [other, PNG, b"b"]
    assert s3.storage.read_bytes(colon) == PNG and s3.storage.exists(colon) and s3.storage.stat(colon)[0] == len(PNG)


def test_s3_reads_tell_a_missing_object_from_an_unreachable_store(s3):
    # Brackets and stars are plain characters in a key, not a pattern to expand.
    uris = [s3.uri(f"pool/img[{i}]*.png") for i in range(5)] + [s3.uri("pool/a.png")]
    for i, uri in enumerate(uris[:5]):
        s3.storage.write_bytes(uri, bytes([i]) * 8)
    s3.storage.write_bytes(uris[5], PNG)
    got = read_many(uris + [s3.uri("pool/gone.png")], s3.storage)
    assert got[:6] == [bytes([i]) * 8 for i in range(5)] + [PNG]
    assert isinstance(got[6], FileNotFoundError)
    decoded = decode_rows([uris[5], s3.uri("pool/gone.png")], s3.storage, DecodeLimits(), _crop, (4, 4, 3))
    assert list(decoded["reject_reason"]) == ["", "unreadable"]  # a missing image is that image's problem
    down = read_many(uris[:2], s3.unreachable_storage())
    with pytest.raises(StorageError, match=r"cannot read s3://.*/pool/a\.png: EndpointConnectionError"):
        decode_rows(uris[5:], s3.unreachable_storage(), DecodeLimits(), _crop, (4, 4, 3))
    assert [type(e) for e in down] == [StorageError, StorageError]
    assert str(down[0]).startswith(f"cannot read {uris[0]}: EndpointConnectionError: ")


def _crop(image):
    return image[:4, :4]


def test_members_of_an_archived_tar_are_its_own_rejects_and_wrong_credentials_the_stores(moto_bucket, s3, tmp_path):
    """A tar shard the store refuses like any object it refuses: archived (Glacier), its members
    are rejects on every attempt alike, not a stage that fails each time until it is restored."""
    client, bucket, storage = moto_bucket
    write_tar(tmp_path / "shard.tar", {"a.png": PNG, "b.png": PNG})
    for key in ("warm.tar", "cold.tar"):
        client.put_object(Bucket=bucket, Key=key, Body=(tmp_path / "shard.tar").read_bytes(),
                          **({"StorageClass": "GLACIER"} if key == "cold.tar" else {}))
    members = [f"tar://{name}::s3://{bucket}/{tar}" for tar in ("warm.tar", "cold.tar") for name in ("a.png", "b.png")]
    out = read_many(members, storage)
    assert out[:2] == [PNG, PNG]
    assert all(type(r) is PermissionError for r in out[2:]), out[2:]
    assert all(type(r) is PermissionError for r in read_many(members[2:], storage))  # alone in its batch too
    rows = decode_rows(members, storage, DecodeLimits(), _crop, (4, 4, 3))
    assert list(rows["reject_reason"]) == ["", "", "unreadable", "unreadable"]
    # moto takes any signature; SeaweedFS refuses a wrong secret: the store's trouble, not the tar's
    s3.storage.put_file(tmp_path / "shard.tar", s3.uri("warm.tar"))
    wrong = Storage({**s3.storage_options(), "secret": "wrong"})
    got = read_many([f"tar://a.png::{s3.uri('warm.tar')}", f"tar://b.png::{s3.uri('warm.tar')}"], wrong)
    assert all(isinstance(r, StorageError) for r in got), got
