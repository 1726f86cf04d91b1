"""Every infra manifest parses, and every vfm command line in it is one the CLI accepts."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser

INFRA = Path(__file__).resolve().parent.parent / "infra"
MANIFESTS = sorted(p for p in INFRA.rglob("*.yaml"))
VFM_LINE = re.compile(r"(?:^|--\s+|[:#]\s*)(vfm\s+(?:run|submit|resume|status|plan|eval|export|verify)\b[^\n\"']*)")


def vfm_commands(text: str) -> list[list[str]]:
    return [shlex.split(m.group(1).strip())[1:] for m in VFM_LINE.finditer(text)]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_manifest_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_rayjob_entrypoint_is_a_valid_vfm_run_on_s3():
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "vfm"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.config == "vit7b" and args.run_dir.startswith("s3://")


@pytest.mark.parametrize("path", [*MANIFESTS, INFRA / "Dockerfile"], ids=lambda p: str(p.relative_to(INFRA)))
def test_every_vfm_command_line_is_accepted_by_the_cli(path):
    commands = vfm_commands(path.read_text())
    for argv in commands:
        build_parser().parse_args(argv)  # argparse exits on a bad line, failing the test
    if "kuberay" in str(path) or path.name == "ray-cluster.yaml":
        assert commands, f"{path} names no vfm command"


def test_dockerfile_installs_the_gpu_extra_on_a_cuda_base():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    assert "pip install '.[gpu]'" in text and "ninja" in text
