"""Let webdataset open s3:// (and other fsspec) shard URLs through vfm's Storage.

webdataset 1.0.2 has no s3:// handler; its ``gopen_schemes`` table maps a URL scheme to an
opener. Registering one backed by :class:`Storage` makes plain ``webdataset.WebDataset``
pipelines (and anything else built on ``gopen``) read the same shards with the same
endpoint and credentials as the rest of vfm.
"""
from __future__ import annotations

from data_curation.storage import Storage


def register_gopen(storage: Storage | None = None, schemes: tuple[str, ...] = ("s3",)) -> None:
    """Make ``webdataset.gopen`` open URLs of ``schemes`` with ``storage`` (reading and writing)."""
    from webdataset.gopen import gopen_schemes  # the module: webdataset.gopen the attribute is a function

    storage = storage or Storage()

    def open_with_storage(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
        return storage.open(url, mode)

    for scheme in schemes:
        gopen_schemes[scheme] = open_with_storage
