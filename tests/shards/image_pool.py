"""A folder of small real images (scikit-learn digits) and a curation manifest over them."""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_curation.builtin import load_builtin
from data_curation.sources import tar_member_uri
from data_curation.storage import Storage

# Source formats, in turn: most are stored as they are, BMP is re-encoded by the writer.
FORMATS = ("PNG", "JPEG", "PNG", "WEBP", "BMP")


@dataclass
class ImagePool:
    manifest_uri: str
    source: dict[str, bytes]  # id -> source bytes, for every selected image
    uris: dict[str, str]  # id -> uri
    labels: dict[str, int]  # id -> digit (the cluster_l1 of the manifest)

    @property
    def selected(self) -> set[str]:
        return set(self.source)


def make_pool(folder: str, n: int = 200, storage: Storage | None = None, side: int = 24,
              packed: bool = False, current: bool = False) -> ImagePool:
    """``n`` images under ``folder`` (local or s3://) and ``folder``/manifest.parquet.

    Every 10th image is left unselected, and one unreadable file is listed as rejected.
    ``packed`` puts the images in ``folder``/images.tar instead, listed as tar member URIs.
    ``current`` gives the manifest the file sizes (``bytes``) and tar spans that curate writes
    now; without, it is a manifest of a run from before curate kept them.
    """
    storage = storage or Storage()
    digits = load_builtin("digits")
    rows, pool = [], ImagePool(Storage.join(folder, "manifest.parquet"), {}, {}, {})
    tar_uri, packed_images = Storage.join(folder, "images.tar"), io.BytesIO()
    tar = tarfile.open(fileobj=packed_images, mode="w") if packed else None
    for i in range(n):
        pixels = np.kron(digits.images[i], np.ones((side // 8, side // 8), np.uint8))
        pixels[0, 0], pixels[0, 1] = i % 256, i // 256  # no two images alike
        fmt = FORMATS[i % len(FORMATS)]
        buf = io.BytesIO()
        Image.fromarray(pixels).convert("RGB").save(buf, format=fmt)
        data = buf.getvalue()
        name = f"{i:05d}.{fmt.lower()}"
        if tar is not None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            uri = tar_member_uri(tar_uri, name)
        else:
            uri = Storage.join(folder, "images", name)
            storage.write_bytes(uri, data)
        sha = hashlib.sha256(data).hexdigest()
        label = int(digits.labels[i])
        selected = i % 10 != 9
        rows.append({"id": sha, "uri": uri, "sha256": sha, "width": side, "height": side, "reject_reason": None,
                     "dup_group": i, "dup_kept": True, "dup_kind": None, "cluster_l1": label,
                     "cluster_l2": label // 5, "selected": selected,
                     "selected_by": ("balanced" if i % 3 else "retrieval") if selected else None,
                     "size": len(data)})
        if selected:
            pool.source[sha], pool.uris[sha], pool.labels[sha] = data, uri, label
    schema = [("id", pa.string()), ("uri", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
              ("height", pa.int32()), ("reject_reason", pa.string()), ("dup_group", pa.int64()),
              ("dup_kept", pa.bool_()), ("dup_kind", pa.string()), ("cluster_l1", pa.int64()),
              ("cluster_l2", pa.int64()), ("selected", pa.bool_()), ("selected_by", pa.string())]
    if tar is not None:
        tar.close()
        storage.write_bytes(tar_uri, packed_images.getvalue())
        if current:
            with tarfile.open(fileobj=io.BytesIO(packed_images.getvalue())) as written:
                where = {tar_member_uri(tar_uri, m.name): (m.offset, m.offset_data + m.size) for m in written}
            for row in rows:
                row["span_start"], row["span_end"] = where[row["uri"]]
            schema += [("span_start", pa.int64()), ("span_end", pa.int64())]
    if current:
        for row in rows:
            row["bytes"] = row.pop("size")
        schema.append(("bytes", pa.int64()))
    else:
        for row in rows:
            del row["size"]
    bad_uri = Storage.join(folder, "images", "broken.jpg")
    storage.write_bytes(bad_uri, b"\xff\xd8\xff")
    rows.append({"id": hashlib.sha256(bad_uri.encode()).hexdigest(), "uri": bad_uri, "sha256": None, "width": None,
                 "height": None, "reject_reason": "truncated", "dup_group": None, "dup_kept": None, "dup_kind": None,
                 "cluster_l1": None, "cluster_l2": None, "selected": False, "selected_by": None})
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(schema)), sink)
    storage.write_bytes(pool.manifest_uri, sink.getvalue())
    return pool
