"""The one storage helper, on local disk and on the real S3 server."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from data_curation.storage import Storage, StorageError
from tests.s3server import storage_at


def _tar_with(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    storage = Storage()
    target = str(tmp_path / "a" / "b.json")
    storage.write_json(target, {"x": 1})
    storage.write_json(target, {"x": 2})
    assert storage.read_json(target) == {"x": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]
    src = tmp_path / "src.bin"
    src.write_bytes(b"0" * 10_000)
    storage.put_file(src, str(tmp_path / "c" / "d.bin"))
    assert storage.stat(str(tmp_path / "c" / "d.bin"))[0] == 10_000


@pytest.mark.parametrize("remote", [False, True])
def test_create_bytes_writes_only_where_nothing_is(tmp_path, remote, request):
    storage, uri = storage_at(request, tmp_path, "run/_LOCK-000001.json", remote)
    assert storage.create_bytes(uri, b"first")
    assert not storage.create_bytes(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    if not remote:
        assert [p.name for p in (tmp_path / "run").iterdir()] == ["_LOCK-000001.json"]  # no temp file left


def test_listing_and_removal(tmp_path):
    storage = Storage()
    for name in ("x/1.txt", "x/y/2.txt", "z.txt"):
        storage.write_text(str(tmp_path / name), name)
    assert storage.ls(str(tmp_path / "x")) == [str(tmp_path / "x" / "1.txt"), str(tmp_path / "x" / "y")]
    assert sorted(storage.walk_files(str(tmp_path))) == sorted(str(tmp_path / n) for n in ("x/1.txt", "x/y/2.txt", "z.txt"))
    storage.rm(str(tmp_path / "x"), recursive=True)
    storage.rm(str(tmp_path / "never-was"))
    assert not storage.exists(str(tmp_path / "x")) and storage.ls(str(tmp_path / "nothing")) == []


# Names whose byte order as whole paths is neither files-then-folders nor folders-then-files:
# "a-b.png" < "a.png" < "a/deep/x.png" < "a/z.png" < "a0.png".
_TREE = ["b.txt", "a.png", "a0.png", "a-b.png", "a/z.png", "a/deep/x.png", "sub9/z.txt", "sub10/w.txt"]


@pytest.mark.parametrize("remote", [False, True])
def test_walking_files_streams_them_in_the_byte_order_of_their_paths(tmp_path, remote, request):
    storage, root = storage_at(request, tmp_path, "pool", remote)
    if remote:
        storage.list_page_size = 2  # several ListObjectsV2 pages, so streaming goes across pages
    for name in _TREE:
        storage.write_text(storage.join(root, name), name)
    walk = storage.walk_files(root)
    first = next(walk)
    storage.write_text(storage.join(root, "sub9", "late.txt"), "written after the walk began")
    walked = [first[len(root) + 1:]] + [uri[len(root) + 1:] for uri in walk]
    expected = sorted(_TREE + ["sub9/late.txt"])
    if remote:  # the server's order: byte order on AWS S3, SeaweedFS lists folder by folder
        assert sorted(walked) == expected
    else:
        assert walked == expected
    assert list(storage.walk_files(storage.join(root, "never-was"))) == []
    assert sorted(storage.walk_files(root + "/")) == sorted(storage.join(root, n) for n in expected)
    whole = [storage.join(root, name) for name in walked]
    for i, uri in enumerate(whole):  # picking a walk up after any file it gave
        assert list(storage.walk_files(root, after=uri)) == whole[i + 1:]
    fs, path = storage.fs(root)  # the filesystem object is shared with other tests: look at this tree only
    assert not [key for key in fs.dircache if key.startswith(path)], "the walk left listings in fsspec's cache"


def test_a_walk_picked_up_later_does_not_open_the_folders_before_it(tmp_path, monkeypatch):
    storage, root = Storage(), str(tmp_path / "pool")
    for name in _TREE:
        storage.write_text(storage.join(root, name), name)
    fs, _ = storage.fs(root)
    opened: list[str] = []
    real_ls = fs.ls
    monkeypatch.setattr(fs, "ls", lambda path, **kw: opened.append(path[len(root):]) or real_ls(path, **kw))
    assert list(storage.walk_files(root, after=storage.join(root, "sub10", "w.txt"))) == [
        storage.join(root, "sub9", "z.txt")]
    assert opened == ["", "/sub10", "/sub9"]  # not a/ nor a/deep/


@pytest.mark.parametrize("remote", [False, True])
def test_walking_leaves_out_hidden_files_and_everything_in_hidden_folders(tmp_path, remote, request):
    storage, root = storage_at(request, tmp_path, ".cache/pool", remote)  # a hidden root is walked
    for name in ("a.png", ".DS_Store", ".git/objects/x.png", "sub/.ipynb_checkpoints/b-checkpoint.png",
                 "sub/b.png", "sub/.hidden.png"):
        storage.write_text(storage.join(root, name), name)
    assert sorted(storage.walk_files(root)) == [storage.join(root, "a.png"), storage.join(root, "sub/b.png")]


def test_a_local_walk_follows_symlinks_and_reports_loops_and_special_files(tmp_path):
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "pool"
    (elsewhere / "deep").mkdir(parents=True)
    (elsewhere / "deep" / "c.png").write_text("c")
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_text("a")
    (root / "linked").symlink_to(elsewhere)  # a folder assembled from links, as datasets often are
    (root / "a-link.png").symlink_to(root / "a.png")
    (root / "broken.png").symlink_to(tmp_path / "never-was.png")  # listed: its reader fails on it
    (root / "sub" / "back").symlink_to(root)  # a loop
    os.mkfifo(root / "sub" / "fifo.png")
    (root / "sub" / "fifo-link.png").symlink_to(root / "sub" / "fifo.png")
    (root / "sub" / "zeros.png").symlink_to("/dev/zero")  # read to the end, it never ends
    skipped: list[str] = []
    walked = list(Storage().walk_files(str(root), skipped=skipped.append))
    assert walked == [str(root / n) for n in ("a-link.png", "a.png", "broken.png", "linked/deep/c.png")]
    neither = "neither a file nor a folder (a FIFO, a socket or a device): not listed"
    assert skipped == [f"folder {root}/sub/back links to {root}, a folder it is in (a symlink loop): not walked",
                       f"{root}/sub/fifo-link.png links to {root}/sub/fifo.png, {neither}",
                       f"{root}/sub/fifo.png is {neither}", f"{root}/sub/zeros.png links to /dev/zero, {neither}"]
    assert list(Storage().walk_files(str(root), after=str(root / "broken.png"))) == [str(root / "linked/deep/c.png")]


_WALK_WITHOUT_PERMISSION_OVERRIDE = """
import ctypes, json, sys
# Root reads any folder through two capabilities, CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2):
# drop them from this process, so that the kernel applies a folder's mode bits as it does for any
# user (a no-op for a user who never had them)
header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; twice (capabilities 0-31, 32-63)
libc = ctypes.CDLL(None, use_errno=True)
if libc.capget(header, data) != 0:
    sys.exit(f"capget failed: errno {ctypes.get_errno()}")
data[0] &= ~0b110
if libc.capset(header, data) != 0:
    sys.exit(f"capset failed: errno {ctypes.get_errno()}")
from data_curation.storage import Storage, StorageError
skipped = []
try:
    walked = list(Storage().walk_files(sys.argv[1], skipped=skipped.append))
except StorageError as exc:
    walked = str(exc)
print(json.dumps({"walked": walked, "skipped": skipped}))
"""


def test_a_subfolder_that_cannot_be_listed_is_reported_and_an_unreadable_root_is_an_error(tmp_path):
    root = tmp_path / "pool"
    (root / "locked").mkdir(parents=True)
    (root / "a.png").write_text("a")
    (root / "locked" / "b.png").write_text("b")
    (root / "locked").chmod(0o000)

    def walk(uri: Path) -> dict:  # in a process the folder's mode bits hold for, root or not
        out = subprocess.run([sys.executable, "-c", _WALK_WITHOUT_PERMISSION_OVERRIDE, str(uri)],
                             capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    try:
        assert walk(root) == {"walked": [str(root / "a.png")], "skipped": [
            f"folder {root}/locked cannot be listed (PermissionError: [Errno 13] Permission denied: "
            f"'{root}/locked'): not walked"]}
        assert walk(root / "locked")["walked"].startswith(f"cannot list {root}/locked: PermissionError")
    finally:
        (root / "locked").chmod(0o755)  # for pytest to clean up


def test_walking_s3_skips_folder_markers_and_names_the_prefix_on_errors(s3):
    storage = s3.storage
    storage.write_text(s3.uri("pool/a.png"), "a")
    s3.server.client().put_object(Bucket=s3.bucket, Key="pool/empty-folder/", Body=b"")  # what consoles create
    assert list(storage.walk_files(s3.uri("pool"))) == [s3.uri("pool/a.png")]
    stranger = Storage({"endpoint_url": s3.endpoint_url, "key": "no-such-key", "secret": "wrong"})
    with pytest.raises(StorageError, match=f"cannot list {s3.uri('pool')}"):
        list(stranger.walk_files(s3.uri("pool")))


@pytest.mark.parametrize("remote", [False, True])
def test_put_tree_copies_a_folder_to_the_same_relative_paths(tmp_path, remote, request):
    src = tmp_path / "src"
    for name in ("a.png", "sub/b.png", "sub/deeper/c.png"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(name.encode())
    storage, dst = storage_at(request, tmp_path, "copy", remote)
    storage.put_tree(src, dst)
    assert sorted(storage.walk_files(dst)) == [storage.join(dst, n) for n in ("a.png", "sub/b.png", "sub/deeper/c.png")]
    assert storage.read_bytes(storage.join(dst, "sub/deeper/c.png")) == b"sub/deeper/c.png"


def test_s3_round_trip_listing_and_tar_members(s3):
    storage = s3.storage
    storage.write_json(s3.uri("p/q.json"), {"k": [1, 2]})
    assert storage.read_json(s3.uri("p/q.json")) == {"k": [1, 2]}
    assert storage.ls(s3.uri("p")) == [s3.uri("p/q.json")]
    storage.write_bytes(s3.uri("t/images.tar"), _tar_with("img/0.png", b"PNGDATA"))
    assert storage.read_bytes(f"tar://img/0.png::{s3.uri('t/images.tar')}") == b"PNGDATA"


def test_a_uri_keeps_what_it_says_itself_and_only_chains_are_chained(s3, tmp_path):
    storage = s3.storage
    fs, path = storage.fs(s3.uri("pool/k.png") + "?versionId=abc")  # a pinned version of an object
    assert fs.version_aware and path.endswith("pool/k.png?versionId=abc")  # s3fs reads the version from the path
    storage.write_bytes(s3.uri("pool/10::00.png"), b"colons")  # "::" in a key is part of its name
    assert storage.fs(s3.uri("pool/10::00.png"))[1].endswith("pool/10::00.png")
    storage.write_bytes(s3.uri("pool/plain.png"), b"plain")
    cached, _ = storage.fs("simplecache::" + s3.uri("pool/plain.png"))  # one of fsspec's caches before S3
    assert type(cached).__name__ == "SimpleCacheFileSystem"
    assert storage.read_bytes("simplecache::" + s3.uri("pool/plain.png")) == b"plain"
    assert storage.fs(str(tmp_path / "a::b.png"))[1] == str(tmp_path / "a::b.png")


def test_s3_errors_are_one_line_storage_errors_naming_the_uri(s3):
    wrong = Storage({**s3.storage_options(), "secret": "wrong"})
    with pytest.raises(StorageError, match=rf"cannot .* {s3.uri('x.json')}"):
        wrong.write_json(s3.uri("x.json"), {})
    down = Storage({**s3.storage_options(), "endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(StorageError, match=r"EndpointConnectionError"):
        down.exists(s3.uri("x.json"))


def test_an_archived_object_is_its_own_trouble_and_rejected_credentials_the_stores(moto_bucket, s3):
    client, bucket, storage = moto_bucket
    client.put_object(Bucket=bucket, Key="ok.png", Body=b"fine")
    for key in ("cold.png", "colder.png"):
        client.put_object(Bucket=bucket, Key=key, Body=b"archived", StorageClass="GLACIER")
    uri = f"s3://{bucket}/"
    ok, cold, missing = storage.read_many([uri + "ok.png", uri + "cold.png", uri + "missing.png"])
    assert ok == b"fine" and isinstance(missing, FileNotFoundError)
    assert isinstance(cold, PermissionError) and not isinstance(cold, StorageError)
    # Archived fails every attempt alike, even where nothing else in the batch was served.
    assert all(type(r) is PermissionError for r in storage.read_many([uri + "cold.png", uri + "colder.png"]))
    s3.storage.write_bytes(s3.uri("a.png"), b"a")
    s3.storage.write_bytes(s3.uri("b.png"), b"b")
    wrong = Storage({**s3.storage_options(), "secret": "wrong"})  # SignatureDoesNotMatch: a PermissionError too
    assert all(isinstance(r, StorageError) for r in wrong.read_many([s3.uri("a.png"), s3.uri("b.png")]))


def test_a_download_killed_part_way_leaves_nothing_under_its_final_name(s3, tmp_path):
    """Embedding chunks of an S3 run dir are cached locally and a cached file is reused as is:
    a cut-off download must never sit there under the final name."""
    data = os.urandom(128 * 2**20)
    s3.storage.write_bytes(s3.uri("big.npy"), data)
    final = tmp_path / "cache" / "big.npy"
    root = Path(__file__).resolve().parents[1]
    script = ("import json, sys; from data_curation.storage import Storage; "
              "Storage(json.loads(sys.argv[1])).get_file(sys.argv[2], sys.argv[3])")
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(s3.storage_options()), s3.uri("big.npy"),
                             str(final)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)})

    def bytes_written() -> bool:
        return final.parent.exists() and any(p.stat().st_size for p in final.parent.iterdir())

    deadline = time.monotonic() + 60
    while not bytes_written():
        assert proc.poll() is None and time.monotonic() < deadline, "the download never started"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not final.exists()
    s3.storage.get_file(s3.uri("big.npy"), final)  # the next attempt downloads it whole
    assert hashlib.sha256(final.read_bytes()).digest() == hashlib.sha256(data).digest()
