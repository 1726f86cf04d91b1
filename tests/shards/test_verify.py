"""Re-reading shards against the index (what `vfm verify` runs) names exactly the bad shards."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_curation.shards.build import build_shards
from data_curation.shards.index import INDEX_FILE
from data_curation.shards.verify import verify_shards
from data_curation.storage import Storage
from pipeline.stages.shard import verify_cli
from tests.shards.conftest import SPEC


def test_intact_shards_pass(built_once):
    report = verify_shards(built_once.shard_dir)
    assert report.ok and report.shards == 6 and report.samples == len(built_once.pool.selected)
    assert report.summary().endswith("all good")


def test_a_flipped_bit_and_a_missing_shard_are_reported_by_name(built):
    shards = sorted(Path(built.shard_dir, "shards").iterdir())
    data = bytearray(shards[2].read_bytes())
    data[len(data) // 3] ^= 0x10
    shards[2].write_bytes(bytes(data))
    shards[4].unlink()
    report = verify_shards(built.shard_dir)
    assert not report.ok
    assert set(report.bad) == {shards[2].name, shards[4].name}
    assert "sha256 mismatch" in report.bad[shards[2].name] and report.bad[shards[4].name] == "missing"
    assert report.summary().endswith("2 bad") and report.to_dict()["bad_shards"] == report.bad


def test_a_flipped_bit_in_padding_is_still_caught(built):
    """Bytes no sample owns (tar padding, the end blocks) are covered by the shard checksum."""
    shard = sorted(Path(built.shard_dir, "shards").iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_shards(built.shard_dir)
    assert set(report.bad) == {shard.name} and "bad sample" not in report.bad[shard.name]


def test_a_folder_without_an_index_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no shards.json"):
        verify_shards(str(tmp_path))


def test_vfm_verify_exits_1_naming_the_bad_shard(built, tmp_path):
    run_dir = Path(built.shard_dir).parent
    lines: list[str] = []
    assert verify_cli(str(run_dir), Storage(), lines.append) == 0 and lines[-1].endswith("all good")
    shard = sorted(Path(built.shard_dir, "shards").iterdir())[1]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x80
    shard.write_bytes(bytes(data))
    lines.clear()
    assert verify_cli(str(run_dir), Storage(), lines.append) == 1
    assert lines[0].startswith(f"bad shard {shard.name}: ") and "1 bad" in lines[-2]


def test_an_index_from_before_the_crc32_column_still_verifies(built):
    path = Path(built.shard_dir, INDEX_FILE)
    pq.write_table(pq.read_table(path).drop_columns(["crc32"]), path)
    assert verify_shards(built.shard_dir).ok


def test_a_shard_gone_bad_in_place_is_kept_by_a_rerun_until_vfm_verify_names_it(built_once, tmp_path):
    """Bit rot leaves a file's time and size as they were, so a rerun, which keeps a shard whose
    version its record names without reading it, keeps it; vfm verify reads it, names it and
    removes its record, and the next rerun writes it again."""
    run_dir = tmp_path / "run"
    shard_dir, work_dir = run_dir / "shard", run_dir / "shard" / "_work"  # as a run dir holds them
    shutil.copytree(built_once.shard_dir, shard_dir)
    shutil.copytree(built_once.work_dir, work_dir)
    shard = sorted((shard_dir / "shards").iterdir())[3]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0x08
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    def rerun():
        return build_shards(built_once.pool.manifest_uri, str(shard_dir), str(work_dir), SPEC, log=lambda _: None)

    assert rerun().written == 0
    lines: list[str] = []
    assert verify_cli(str(run_dir), Storage(), lines.append) == 1
    assert lines[0].startswith(f"bad shard {shard.name}: sha256 mismatch")
    assert lines[-1] == f"to write the bad shards again: vfm run -c {run_dir / 'config.yaml'} --run-dir {run_dir} " \
                        f"--from shard"
    again = rerun()
    assert (again.written, again.missing, again.mismatching) == (1, 0, 1)
    assert verify_cli(str(run_dir), Storage(), lines.append) == 0
