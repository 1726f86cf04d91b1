"""The per-image pass of curation: read, hash, decode, prepare for the embedder.

:func:`decode_rows` turns a batch of URIs into columns (one row per URI, rejected rows
included) that an embedding step completes with :func:`embed_rows`. The two halves are
separate so that decoding (CPU, many tasks) and embedding (a model, an actor pool) can be
scheduled apart; :func:`scan_uris` runs both in-process for small inputs (tests, benches).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from data_curation.copy_descriptor import DESCRIPTOR_DIM, copy_descriptor
from data_curation.decode import DecodeLimits, decode_image
from data_curation.embedders import Embedder
from data_curation.sources import Span, read_many
from data_curation.storage import Storage, StorageError


def decode_rows(uris: list[str], storage: Storage | None, limits: DecodeLimits,
                prepare: Callable[[np.ndarray], np.ndarray], prepared_shape: tuple[int, ...],
                spans: Sequence[Span | None] | None = None) -> dict[str, np.ndarray]:
    """Columns for ``uris``: metadata (``bytes``: the file's size, -1 when unreadable), ``accepted``, ``pixels`` (prepared input, zeros when
    rejected) and ``copy`` (the copy-detection descriptor, zeros when rejected). A file that is
    missing or cannot be read is rejected as ``unreadable``; a store that cannot be reached
    raises its StorageError. ``spans``: the tar spans of the listing (see :func:`read_many`).

    "Not applicable" is "" in string columns (no reject reason, no sha256 of an unreadable
    file), not None: Ray Data turns an all-None column into floats.
    """
    n = len(uris)
    ids, shas, reasons = [], [], []
    width = np.full(n, -1, dtype=np.int32)
    height = np.full(n, -1, dtype=np.int32)
    size = np.full(n, -1, dtype=np.int64)
    accepted = np.zeros(n, dtype=bool)
    pixels = np.zeros((n, *prepared_shape), dtype=np.float32)
    copies = np.zeros((n, DESCRIPTOR_DIM), dtype=np.float32)
    for i, (uri, data) in enumerate(zip(uris, read_many(list(uris), storage, spans), strict=True)):
        if isinstance(data, StorageError):
            raise data  # the store cannot be read, not this image: fail, and a rerun resumes
        if isinstance(data, Exception):
            ids.append(hashlib.sha256(uri.encode("utf-8")).hexdigest())
            shas.append("")
            reasons.append("unreadable")
            continue
        sha = hashlib.sha256(data).hexdigest()
        size[i] = len(data)
        ids.append(sha)
        shas.append(sha)
        decoded = decode_image(data, limits)
        if decoded.width is not None:
            width[i], height[i] = decoded.width, decoded.height
        reasons.append(decoded.reason or "")
        if decoded.image is not None:
            accepted[i] = True
            pixels[i] = prepare(decoded.image)
            copies[i] = copy_descriptor(decoded.image)
    return {
        "uri": np.asarray(uris, dtype=object),
        "id": np.asarray(ids, dtype=object),
        "sha256": np.asarray(shas, dtype=object),
        "width": width,
        "height": height,
        "bytes": size,
        "reject_reason": np.asarray(reasons, dtype=object),
        "accepted": accepted,
        "pixels": pixels,
        "copy": copies,
    }


def embed_rows(rows: dict[str, np.ndarray], embedder: Embedder) -> dict[str, np.ndarray]:
    """Add ``embedding`` (B, dim) to ``rows`` (zeros for rejected rows) and drop ``pixels``. An
    image the embedder gives NaN or infinite values (a backbone overflowing in low precision) is
    rejected as ``embedding_not_finite``: one such vector would stop clustering for the pool."""
    out = {k: v for k, v in rows.items() if k != "pixels"}
    accepted = np.asarray(rows["accepted"], dtype=bool)
    embedding = np.zeros((len(accepted), embedder.dim), dtype=np.float32)
    if accepted.any():
        embedding[accepted] = embedder.embed(np.asarray(rows["pixels"])[accepted])
    broken = accepted & ~np.isfinite(embedding).all(axis=1)
    if broken.any():  # zeros, as for every rejected row
        embedding[broken] = 0.0
        out["copy"] = np.where(broken[:, None], np.float32(0.0), np.asarray(rows["copy"]))
        out["accepted"] = accepted & ~broken
        out["reject_reason"] = np.where(broken, "embedding_not_finite", np.asarray(rows["reject_reason"], dtype=object))
    out["embedding"] = embedding
    return out


def prepared_shape(prepare: Callable[[np.ndarray], np.ndarray]) -> tuple[int, ...]:
    """The shape ``prepare`` gives, measured on a tiny grey image."""
    return tuple(prepare(np.full((16, 16, 3), 128, dtype=np.uint8)).shape)


def scan_uris(uris: list[str], embedder: Embedder, limits: DecodeLimits, storage: Storage | None = None,
              batch_size: int = 256) -> dict[str, np.ndarray]:
    """Decode and embed ``uris`` in this process; the columns of :func:`embed_rows`, concatenated."""
    shape = prepared_shape(embedder.prepare)
    parts = [embed_rows(decode_rows(uris[i:i + batch_size], storage, limits, embedder.prepare, shape), embedder)
             for i in range(0, len(uris), batch_size)]
    if not parts:
        return embed_rows(decode_rows([], storage, limits, embedder.prepare, shape), embedder)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
