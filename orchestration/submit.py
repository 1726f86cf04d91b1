"""Submit `vfm run ...` to a Ray cluster through the Ray Jobs API.

A config given as a local YAML file travels as the job's working_dir (a folder holding
just that file), so the head node does not need the file; presets are shipped in the
package. MLflow and S3 settings from the submitter's environment are passed on.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

PASS_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """The job could not be submitted or followed; one line naming the address."""


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "authentication" in line.lower():
            line += " (the cluster uses Ray token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        raise SubmitError(f"Ray Jobs API at {address} is unreachable: {line}") from None


def submit_run(address: str, argv: list[str], *, config_path: str | None, follow: bool,
               log: Callable[[str], None]) -> int:
    """Submit ``argv`` (a `vfm run ...` command line); with ``follow``, stream logs and return its exit code."""
    client = _client(address)
    submission_id = f"vfm-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    env["VFM_RAY_JOB_ID"] = submission_id
    runtime_env: dict = {"env_vars": env}
    staging = None
    if config_path and Path(config_path).is_file():
        staging = tempfile.mkdtemp(prefix="vfm-submit-")
        shutil.copy(config_path, Path(staging, Path(config_path).name))
        runtime_env["working_dir"] = staging
        argv = [Path(config_path).name if a == config_path else a for a in argv]
    entrypoint = shlex.join(argv)
    try:
        job_id = _submit_with_retry(client, address, log, entrypoint=entrypoint, runtime_env=runtime_env,
                                    submission_id=submission_id)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    print(job_id, flush=True)
    log(f"submitted {entrypoint!r} as {job_id}; logs: ray job logs --address {address} -f {job_id}")
    if not follow:
        return 0
    asyncio.run(_tail(client, job_id))
    status = _wait(client, job_id)
    log(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def _submit_with_retry(client, address: str, log: Callable[[str], None], retry_for: float = 120.0, **job) -> str:
    """Submit, waiting out a head that is up but whose job agent is not ready yet (a fresh cluster)."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            return client.submit_job(**job)
        except Exception as exc:
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "try again later" not in line or time.monotonic() > deadline:
                raise SubmitError(f"Ray Jobs API at {address} refused the job: {line}") from None
            log(f"the Ray head at {address} is not ready to take jobs yet; retrying")
            time.sleep(3)


async def _tail(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def _wait(client, job_id: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)
