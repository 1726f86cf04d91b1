"""Listing chunks found damaged are listed again alone, from the chunk before them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_curation.listing import DamagedListing, Listing
from data_curation.sources import SourceError
from data_curation.storage import Storage
from tests.curation.images import encode, write_tar


def _pool(folder: Path) -> Path:
    """Seven PNGs and a tar of two, in a folder: chunks of 2 give 2, 2, 2, 2, 1 images."""
    folder.mkdir()
    for i in range(7):
        (folder / f"a{i}.png").write_bytes(encode(Image.fromarray(np.full((16, 16), 30 * i, np.uint8)), "PNG"))
    write_tar(folder / "z.tar", {f"t{i}.png": encode(Image.fromarray(np.full((16, 16), i, np.uint8)), "PNG")
                                 for i in range(2)})
    return folder


def _written(listing: Listing, rows: dict[int, int]) -> dict[int, tuple]:
    """Each chunk's rows and where the listing stood after it."""
    out = {}
    for index in rows:
        table = pq.read_table(listing.chunk(index))
        out[index] = (table.to_pylist(), json.loads(table.schema.metadata[b"vfm.listing"]))
    return out


def test_damaged_listing_chunks_are_listed_again_from_the_chunk_before_them(tmp_path):
    listing = Listing([str(_pool(tmp_path / "pool"))], str(tmp_path / "listing"), Storage(), 2)
    rows, _ = listing.write()
    assert rows == {0: 2, 1: 2, 2: 2, 3: 2, 4: 1}
    whole = _written(listing, rows)
    chunk = [Path(listing.chunk(i)) for i in rows]
    chunk[1].write_bytes(b"not parquet")
    chunk[2].write_bytes(chunk[2].read_bytes()[:-20])  # cut short
    chunk[4].unlink()  # the last one, removed
    untouched = {i: chunk[i].stat().st_mtime_ns for i in (0,)}
    data = chunk[3].read_bytes()
    at = data.index(b"a6")  # a bit of a value: without page checksums, read as another URI
    chunk[3].write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])
    for index, reason in ((1, "ArrowInvalid"), (2, "ArrowInvalid"), (3, "ValueError: .*checksum"),
                          (4, "FileNotFoundError")):
        with pytest.raises(DamagedListing, match=f"chunk-00000{index}.parquet is damaged: {reason}"):
            listing.read(index, rows[index])
    # The one a reader met, those whose footer is damaged, and those a run reaches while listing again.
    assert listing.mend(rows, 1) == [1, 2, 3, 4]
    assert _written(listing, rows) == whole  # the same rows, tar spans included, and the same cursors
    assert {i: chunk[i].stat().st_mtime_ns for i in (0,)} == untouched


class CountingWrites(Storage):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write_bytes(self, uri: str, data: bytes) -> None:
        self.writes.append(Path(uri).name)
        super().write_bytes(uri, data)


def test_a_damaged_page_behind_a_sound_footer_is_found_when_its_run_reaches_it(tmp_path):
    storage = CountingWrites()
    listing = Listing([str(_pool(tmp_path / "pool"))], str(tmp_path / "listing"), storage, 2)
    rows, _ = listing.write()
    whole = _written(listing, rows)
    page = bytearray(Path(listing.chunk(2)).read_bytes())
    page[4] ^= 0xFF  # the first page's header: pyarrow raises OSError; the footer is sound
    Path(listing.chunk(2)).write_bytes(bytes(page))
    Path(listing.chunk(3)).write_bytes(b"not parquet")
    with pytest.raises(DamagedListing, match="chunk-000002.parquet is damaged: ValueError"):
        listing.read(2, 2)
    storage.writes.clear()
    # A reader met chunk 1 (say); chunk 3's footer is damaged; chunk 2 is found while listing 1 again.
    assert listing.mend(rows, 1) == [1, 2, 3]
    assert storage.writes == ["chunk-000001.parquet", "chunk-000002.parquet", "chunk-000003.parquet"]  # once each
    assert _written(listing, rows) == whole


def test_a_chunk_with_other_rows_than_listed_is_damaged(tmp_path):
    listing = Listing([str(_pool(tmp_path / "pool"))], str(tmp_path / "listing"), Storage(), 2)
    rows, _ = listing.write()
    whole = _written(listing, rows)
    Path(listing.chunk(3)).write_bytes(Path(listing.chunk(0)).read_bytes())  # sound Parquet, not chunk 3's
    with pytest.raises(DamagedListing, match="its rows are not those of chunk 3"):
        listing.read(3, 2)
    with pytest.raises(DamagedListing, match="2 rows, not the 3 listed"):
        listing.read(0, 3)
    assert listing.mend(rows, 1) == [1, 3]  # chunk 3 found by its footer's statistics
    assert _written(listing, rows) == whole


def test_a_damaged_chunk_of_sources_that_changed_around_it_is_an_error_naming_force(tmp_path):
    pool = _pool(tmp_path / "pool")
    listing = Listing([str(pool)], str(tmp_path / "listing"), Storage(), 2)
    rows, _ = listing.write()
    Path(listing.chunk(1)).write_bytes(b"not parquet")
    (pool / "a2b.png").write_bytes((pool / "a0.png").read_bytes())  # lists between chunk 1's last and chunk 2
    with pytest.raises(SourceError, match="chunk-000001.parquet was damaged, and the sources no longer list the "
                                          "same way around it .* --force"):
        listing.mend(rows, 1)
    (pool / "a2b.png").unlink()
    (pool / "z.tar").unlink()  # now the last chunk's images are gone
    Path(listing.chunk(4)).write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="chunk-000004.parquet was damaged"):
        listing.mend(rows, 4)


def test_the_damaged_last_chunk_of_a_finished_listing_is_mended_after_the_sources_grew(tmp_path):
    pool = _pool(tmp_path / "pool")
    listing = Listing([str(pool)], str(tmp_path / "listing"), Storage(), 2)
    rows, _ = listing.write()
    whole = _written(listing, rows)
    done = tmp_path / "listing" / "_DONE.json"
    assert json.loads(done.read_text())["last_uri"] == whole[4][0][0]["uri"]
    (pool / "zz.png").write_bytes((pool / "a0.png").read_bytes())  # new: lists after the last chunk's image
    Path(listing.chunk(4)).write_bytes(b"not parquet")
    assert listing.mend(rows, 4) == [4]
    assert _written(listing, rows)[4][0] == whole[4][0]  # the same rows (its cursor now resumes at zz.png)
    assert listing.write()[0] == rows  # still the finished listing: the new image is left out, as before
    # The last image gone and others in its place: not the listing that finished.
    (pool / "z.tar").rename(tmp_path / "z.tar")
    (pool / "zz2.png").write_bytes((pool / "a0.png").read_bytes())
    Path(listing.chunk(4)).write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="chunk-000004.parquet was damaged"):
        listing.mend(rows, 4)
    # A listing finished before the last URI was kept, or whose _DONE.json is damaged: nothing may follow.
    (tmp_path / "z.tar").rename(pool / "z.tar")
    kept = json.loads(done.read_text())
    for text in (json.dumps({k: v for k, v in kept.items() if k != "last_uri"}), "[]"):
        done.write_text(text)
        with pytest.raises(SourceError, match="chunk-000004.parquet was damaged"):
            listing.mend(rows, 4)
    lines: list[str] = []  # and write() goes on after the last whole chunk, taking the new images in
    assert listing.write(lines.append)[0] == {**rows, 5: 2}
    assert lines[0] == f"warning: {done} is damaged (ValueError): reading the listing's chunks instead"


def test_a_listing_finished_after_a_pick_up_keeps_its_last_uri(tmp_path):
    listing = Listing([str(_pool(tmp_path / "pool"))], str(tmp_path / "listing"), Storage(), 2)
    rows, _ = listing.write()
    last = json.loads((tmp_path / "listing" / "_DONE.json").read_text())["last_uri"]
    (tmp_path / "listing" / "_DONE.json").unlink()  # killed after its last chunk: nothing is left to list
    assert listing.write()[0] == rows
    assert json.loads((tmp_path / "listing" / "_DONE.json").read_text())["last_uri"] == last
