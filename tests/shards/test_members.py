"""The tar member layout: headers identical to tarfile's, and unsafe or corrupt members refused."""
from __future__ import annotations

import io
import tarfile

import pytest

from data_curation.shards.members import (
    BadMember,
    archive_end,
    member_header,
    padded,
    parse_member,
    sample_members,
)


@pytest.mark.parametrize("name,size", [("a.jpg", 0), ("0f" * 32 + ".json", 123), ("k_-9.webp", 8**11 - 1)])
def test_headers_are_the_bytes_tarfile_writes(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
    assert member_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


def test_an_archive_of_members_reads_back_with_tarfile_and_parse_member():
    members = [("k1.jpg", b"\xff\xd8\xff" + bytes(600)), ("k1.json", b"{}")]
    out = io.BytesIO()
    for name, data in members:
        out.write(member_header(name, len(data)) + data + bytes(padded(len(data)) - len(data)))
    out.write(archive_end(out.tell()))
    raw = out.getvalue()
    assert len(raw) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members
    name, start, size = parse_member(raw, 0)
    assert (name, raw[start:start + size]) == members[0]
    assert parse_member(raw, start + padded(size))[0] == "k1.json"


def _tar_header(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0) -> bytearray:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))


@pytest.mark.parametrize("header,problem", [
    (_tar_header("../k.jpg"), "unsafe"),
    (_tar_header("/abs/k.jpg"), "unsafe"),
    (_tar_header("dir/k.jpg"), "unsafe"),
    (_tar_header("k.jpg", tarfile.SYMTYPE), "not a regular file"),
    (_tar_header("k", tarfile.DIRTYPE), "not a regular file"),
    (_tar_header("k.jpg", size=4096), "is truncated"),
    (bytearray(512), "bad header"),
])
def test_unsafe_or_corrupt_members_are_refused(header, problem):
    with pytest.raises(BadMember, match=problem):
        parse_member(bytes(header) + bytes(512), 0)


def test_a_cut_header_is_truncated():
    with pytest.raises(BadMember, match="truncated header"):
        parse_member(bytes(_tar_header("k.jpg")[:300]), 0)


def test_a_flipped_header_bit_fails_the_checksum():
    header = _tar_header("k.jpg", size=10)
    header[5] ^= 0x01
    with pytest.raises(BadMember, match="checksum"):
        parse_member(bytes(header) + bytes(512), 0)


def test_the_writer_refuses_unsafe_names():
    with pytest.raises(BadMember):
        member_header("../k.jpg", 1)


def test_sample_members_must_carry_the_indexed_key():
    out = io.BytesIO()
    for name, data in (("k1.png", b"\x89PNG"), ("k1.json", b"{}")):
        out.write(member_header(name, len(data)) + data + bytes(padded(len(data)) - len(data)))
    raw = out.getvalue()
    assert sample_members(raw, 0, "k1", "png") == ((512, 4), (1536, 2))
    with pytest.raises(BadMember, match="index has k2.png"):
        sample_members(raw, 0, "k2", "png")
    with pytest.raises(BadMember, match="index has k1.jpg"):
        sample_members(raw, 0, "k1", "jpg")
