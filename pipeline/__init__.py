"""vfm: from a raw image pool to an evaluated DINOv3-style vision foundation model."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vfm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
