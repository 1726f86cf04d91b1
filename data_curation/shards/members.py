"""The tar layout of a shard: how a member is written and how it is read back safely.

Shards are plain USTAR archives written member by member: a 512-byte header, the data,
zero padding to the next 512-byte boundary, and at the end two zero blocks plus padding to
a 10 KiB record, exactly what ``tarfile`` writes. Headers carry mtime 0, uid/gid 0, no owner
names and mode 0644, so the same samples always give the same bytes. Writing the headers
ourselves gives every member's byte offset for free, and reading one header at an index
offset lets a reader seek straight to any sample.
"""
from __future__ import annotations

import re
import tarfile

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: archives are padded to a whole record
# A member name is KEY.EXT with no folders, no dots in the key, nothing a shell or a path could misread.
SAFE_KEY = r"^[A-Za-z0-9_-]{1,80}$"
SAFE_EXT = r"^[a-z0-9]{1,10}$"
_SAFE_NAME = re.compile(SAFE_KEY[:-1] + r"\." + SAFE_EXT[1:])
_REGULAR = frozenset(tarfile.REGTYPE + tarfile.AREGTYPE)  # the type flag bytes of a regular file


class BadMember(ValueError):
    """A tar member at an index offset is not what it should be (bad header, name, type or size)."""


def padded(size: int) -> int:
    """``size`` rounded up to a whole number of tar blocks."""
    return -(-size // BLOCK) * BLOCK


def is_safe_name(name: str) -> bool:
    """True for ``KEY.EXT`` member names: no folders, no '..', no absolute paths, no odd characters."""
    return bool(_SAFE_NAME.match(name))


def holds_member(buf: bytes | memoryview, pos: int, name: bytes) -> bool:
    """Whether the header at ``buf[pos:]`` is a regular file named exactly ``name``: a byte
    comparison, for readers that have checked the header's bytes otherwise (the reader's CRC-32)."""
    end = pos + len(name)
    return len(buf) >= pos + BLOCK and buf[pos:end] == name and buf[end] == 0 and buf[pos + 156] in _REGULAR


def _ustar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


# tarfile builds a header in ~60 us; filling the name, size and checksum of a template is ~10x
# faster and gives the same bytes (tests compare the two), which the writer's throughput needs.
_TEMPLATE = _ustar_header("x.x", 0)


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file ``name`` holding ``size`` bytes."""
    if not is_safe_name(name):
        raise BadMember(f"refusing to write tar member {name!r}: names must be KEY.EXT without folders")
    header = bytearray(_TEMPLATE)
    header[0:100] = name.encode("ascii").ljust(100, b"\0")
    header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def archive_end(offset: int) -> bytes:
    """What closes an archive whose members end at ``offset``: two zero blocks, then record padding."""
    end = offset + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % RECORD))


def parse_member(buf: bytes | memoryview, pos: int) -> tuple[str, int, int]:
    """Read the member header at ``buf[pos:]``: returns (name, data offset, data size).

    Raises :class:`BadMember` for a truncated or corrupt header (tar checksum), a member
    that is not a regular file, an unsafe name, or data running past the end of ``buf``.
    Parsed by hand: ``tarfile.TarInfo.frombuf`` costs more than the rest of reading a sample.
    """
    header = bytes(buf[pos:pos + BLOCK])
    if len(header) < BLOCK:
        raise BadMember(f"truncated header at byte {pos}")
    try:
        checksum = int(header[148:156].strip(b"\0 "), 8)
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise BadMember(f"bad header at byte {pos}") from None
    if checksum != sum(header) - sum(header[148:156]) + 8 * ord(" "):
        raise BadMember(f"bad header checksum at byte {pos}")
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", errors="replace")
    if header[156:157] not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise BadMember(f"member {name!r} at byte {pos} is not a regular file")
    if header[345:346] != b"\0" or not is_safe_name(name):  # a USTAR prefix would put the name in a folder
        raise BadMember(f"unsafe member name {name!r} at byte {pos}")
    start = pos + BLOCK
    if start + size > len(buf):
        raise BadMember(f"member {name!r} at byte {pos} is truncated")
    return name, start, size


def sample_members(buf: bytes | memoryview, pos: int, key: str, image_ext: str
                   ) -> tuple[tuple[int, int], tuple[int, int]]:
    """(data offset, size) of the image and of the JSON of sample ``key``, whose first header is
    at ``buf[pos]``; raises :class:`BadMember` unless the members are ``KEY.IMAGE_EXT`` then ``KEY.json``."""
    name, start, size = parse_member(buf, pos)
    if name != f"{key}.{image_ext}":
        raise BadMember(f"member {name!r} where the index has {key}.{image_ext}")
    meta_name, meta_start, meta_size = parse_member(buf, start + padded(size))
    if meta_name != f"{key}.json":
        raise BadMember(f"member {meta_name!r} where the index has {key}.json")
    return (start, size), (meta_start, meta_size)
