"""The models shipped inside the package, under the name `default`: the small base with its SpatialLock adapter, the
detector of the synthetic domain and the location model. Every command that takes a model, detector or locator
folder takes `default` for these."""

from __future__ import annotations

from pathlib import Path

from spatiallock.errors import SpatialLockError

ASSETS = Path(__file__).resolve().parent / "assets"


def default_model_path() -> Path:
    """The small base + SpatialLock adapter shipped inside the package."""
    return ASSETS / "default"


def default_detector_path() -> Path:
    """The detector of the synthetic domain shipped inside the package."""
    return ASSETS / "detector"


def resolve_model(name: str) -> str:
    """`default` -> the shipped model; a folder must exist; a hub id (runwayml/stable-diffusion-v1-5) means its
    copy in the Hugging Face cache, fetched there once if need be (`spatiallock.base.folders.local_model_path`)."""
    from spatiallock.base.folders import local_model_path

    if name == "default":
        path = default_model_path()
        if not (path / "model_index.json").is_file():
            raise SpatialLockError(f"model: the shipped default model is missing from {path}")
        return str(path)
    return str(local_model_path(name))


def default_locator_path() -> Path:
    """The location model (seed 004) shipped inside the package."""
    return ASSETS / "locator"


def resolve_detector(name: str) -> Path:
    """`default` -> the shipped detector; otherwise a folder that must exist."""
    path = default_detector_path() if name == "default" else Path(name)
    if not path.exists():
        what = "the shipped default detector is missing from" if name == "default" else "not found:"
        raise SpatialLockError(f"detector: {what} {path}")
    if not path.is_dir():
        raise SpatialLockError(
            f"detector: {path} is not a folder (a detector is a folder written by `train detector`)"
        )
    return path
