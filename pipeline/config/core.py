"""The sections every run has, whatever its stages: run, ray, mlflow, storage."""
from __future__ import annotations

from pydantic import Field

from pipeline.config.base import Section


class RunConfig(Section):
    seed: int = Field(0, description="Seed for every random choice of every stage.")
    cache_dir: str = Field(
        ".cache/vfm",
        description="Local scratch folder (Ray temp dir, downloads, staging); relative to the working directory.",
    )


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Ray cluster to join (e.g. 'auto', '10.0.0.1:6379'); RAY_ADDRESS wins; None starts a local Ray.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (None: all of this machine's).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the local Ray (None: those Ray detects, from CUDA_VISIBLE_DEVICES or NVML).")
    dashboard: bool = Field(False, description="Start the Ray dashboard with the local Ray (on 127.0.0.1).")
    object_store_memory_gb: float | None = Field(
        None, gt=0, description="Object store size of the local Ray in GiB (None: Ray's default)."
    )


class MlflowConfig(Section):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; MLFLOW_TRACKING_URI wins; None means sqlite:///mlflow.db in the working directory.",
    )
    experiment: str | None = Field(None, description="Experiment name (None: the config's name).")


class StorageConfig(Section):
    endpoint_url: str | None = Field(
        None, description="S3 endpoint for SeaweedFS/MinIO/Ceph (None: AWS, or AWS_ENDPOINT_URL)."
    )
    region: str | None = Field(None, description="S3 region (None: AWS_DEFAULT_REGION or the SDK's default).")
    key: str | None = Field(None, description="S3 access key (None: AWS_ACCESS_KEY_ID or the SDK's chain).")
    secret: str | None = Field(None, description="S3 secret key (None: AWS_SECRET_ACCESS_KEY or the SDK's chain).")

    def s3_options(self) -> dict:
        """s3fs options, with the usual AWS variables filling what the config leaves empty."""
        import os

        return {
            "endpoint_url": self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
            "region": self.region,
            "key": self.key,
            "secret": self.secret,
        }
