"""The models shipped inside the package, under the name `default`: the small base with its SpatialLock adapter, the
detector of the synthetic domain (the evaluator), the judge (another detector of that domain, trained apart, for an
image-only reward and for `--judge`) and the location model. Every command that takes a model, detector, judge or
locator folder takes `default` for these."""

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


def default_judge_path() -> Path:
    """The judge shipped inside the package: a detector of the synthetic domain trained on the real training images
    apart from the evaluation detector (another seed), so that what it rewards is not what is scored."""
    return ASSETS / "judge"


def resolve_judge(name: str) -> Path:
    """`default` -> the shipped judge (never the evaluation detector); otherwise a detector folder that must exist."""
    return resolve_detector(name, default_judge_path(), "judge")


def resolve_detector(name: str, default: Path | None = None, what_default: str = "detector") -> Path:
    """`default` -> the shipped detector (or `default`); otherwise a folder that must exist."""
    path = (default or default_detector_path()) if name == "default" else Path(name)
    if not path.exists():
        what = f"the shipped default {what_default} is missing from" if name == "default" else "not found:"
        raise SpatialLockError(f"detector: {what} {path}")
    if not path.is_dir():
        raise SpatialLockError(
            f"detector: {path} is not a folder (a detector is a folder written by `train detector`)"
        )
    return path
