"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `checkpoint-<step>/` holding each trainable model (`<name>.safetensors`), the
optimiser's tensors (`optimizer.safetensors`) and the rest of the state (`state.json`: step, optimiser
hyper-parameters, LR scheduler, torch RNG state). It is written to a temporary folder and renamed, so a
kill never leaves a half-written checkpoint (the temporary folders a kill leaves are removed at the next
save); only the newest `keep` are kept. A checkpoint is read whole and checked before anything is restored
from it, so a damaged one is named (`UnreadableCheckpoint`) and the one before it can be used instead.

Model weights are loaded from safetensors only, never through a pickle (`from_pretrained_safetensors`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from spatiallock.errors import SpatialLockError, first_line
from spatiallock.files import usual_modes

PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".checkpoint-tmp-"
SAVE_PREFIX = ".save-"
RNG_KEY = "__torch_rng_state__"
# what a damaged file raises on reading: a missing or cut file, bad JSON or safetensors, missing keys
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, SafetensorError)


class UnreadableCheckpoint(SpatialLockError):
    """A checkpoint whose files are missing, cut short or malformed; the message names it."""


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for idx, entry in state_dict["state"].items():
        meta["state"][str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
                meta["state"][str(idx)][key] = {"tensor": f"{idx}.{key}"}
            else:
                meta["state"][str(idx)][key] = {"value": value}
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def remove_temporaries(folder: str | os.PathLike, prefix: str = TMP_PREFIX) -> None:
    """Remove the temporary folders (`prefix`*) that a kill during a save left in `folder`."""
    folder = Path(folder)
    if folder.is_dir():
        for item in folder.iterdir():
            if item.name.startswith(prefix) and item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint folder of `list_checkpoints` (`checkpoint-<step>`)."""
    return int(PATTERN.match(Path(path).name).group(1))


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := PATTERN.match(p.name)) and p.is_dir() and not p.is_symlink()
    ]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    folder: str | os.PathLike,
    step: int,
    models: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler=None,
    extra: dict | None = None,
    keep: int = 3,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically and prune older ones beyond `keep`, and any beyond `step` (left by a
    run that resumed before them because they were unreadable).

    `tensors`: further tensor files, `{file stem: {key: tensor}}` (an EMA's weights).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(folder)
    final = folder / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=folder))
    try:
        for name, model in models.items():
            weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(weights, tmp / f"{name}.safetensors")
        for stem, values in (tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in values.items()}, tmp / f"{stem}.safetensors")
        flat, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
        flat[RNG_KEY] = torch.get_rng_state()
        save_file(flat, tmp / "optimizer.safetensors")
        state = {
            "step": step,
            "optimizer": optimizer_meta,
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "extra": extra or {},
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        usual_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(folder):
        # beyond this step: a newer checkpoint the run resumed before (an unreadable one), now superseded
        if checkpoint_step(old) > step:
            shutil.rmtree(old, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str | os.PathLike, names: Iterable[str]) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read a whole checkpoint without restoring anything: its state.json and its tensor files by stem (the
    models `names`, "optimizer", and any further files such as an EMA's). `UnreadableCheckpoint` naming the
    checkpoint when a file is missing, cut short or malformed."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        match = PATTERN.match(path.name)
        if not isinstance(state, dict) or not match or state.get("step") != int(match.group(1)):
            raise ValueError(f"state.json does not record step {match.group(1) if match else '?'}")
        files = {stem: load_file(path / f"{stem}.safetensors") for stem in (*names, "optimizer")}
        for extra in sorted(path.glob("*.safetensors")):
            if extra.stem not in files:
                files[extra.stem] = load_file(extra)
        rng = files["optimizer"].get(RNG_KEY)
        if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
            raise ValueError("optimizer.safetensors lacks the random generator state")
        _unflatten_optimizer(files["optimizer"], state["optimizer"])  # every tensor it names is there
        if not isinstance(state["optimizer"].get("param_groups"), list):
            raise ValueError("state.json lacks the optimizer's parameter groups")
    except READ_ERRORS as err:
        raise UnreadableCheckpoint(f"{path}: unreadable checkpoint ({first_line(err)})") from None
    return state, files


def load_checkpoint(
    path: str | os.PathLike, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer, lr_scheduler=None
) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Restore models, optimiser, LR scheduler and torch RNG from a checkpoint; returns its state.json and its
    tensor files (`read_checkpoint`). `UnreadableCheckpoint` when it is damaged, `SpatialLockError` when it
    does not fit the models and optimiser given (written with other settings)."""
    path = Path(path)
    state, files = read_checkpoint(path, models)
    try:
        for name, model in models.items():
            model.load_state_dict(files[name])
        tensors = dict(files["optimizer"])
        rng = tensors.pop(RNG_KEY)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        if lr_scheduler is not None and state.get("lr_scheduler") is not None:
            lr_scheduler.load_state_dict(state["lr_scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise SpatialLockError(
            f"{path}: does not fit the model being trained, was it written with other settings? ({first_line(err)})"
        ) from None
    torch.set_rng_state(rng)
    return state, files


def refuse_fp16_overflow(model: nn.Module, what: str) -> None:
    """Refuse, in one line naming `what` and the tensor, a model with a weight fp16 cannot hold (it would be
    stored as inf, and every output through it NaN)."""
    largest = torch.finfo(torch.float16).max
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        peak = float(tensor.detach().abs().max())
        if peak > largest:
            raise SpatialLockError(
                f"{what}: {name} holds {peak:.3g}, beyond fp16's {largest:.0f}: it cannot be stored in fp16 "
                "(keep fp32, or refit the layer)"
            )


def atomic_save_pretrained(model, folder: str | os.PathLike) -> Path:
    """`model.save_pretrained(folder)` through a temporary folder, each file renamed into place."""
    folder = Path(folder)
    if folder.is_symlink():
        raise SpatialLockError(f"{folder}: is a link; not written through")
    folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(folder, SAVE_PREFIX)
    tmp = Path(tempfile.mkdtemp(prefix=SAVE_PREFIX, dir=folder))
    try:
        model.save_pretrained(tmp)
        usual_modes(tmp)
        for item in tmp.iterdir():
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def from_pretrained_safetensors(cls, path: str | os.PathLike, what: str, **options):
    """`cls.from_pretrained(path, use_safetensors=True, **options)`: weights from safetensors or not at all,
    never through diffusers' pickle fallback; `SpatialLockError` naming `what` when they cannot be loaded."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warnings repeat the error we raise, over several lines
    try:
        return cls.from_pretrained(path, use_safetensors=True, **options)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError, SafetensorError) as err:
        raise SpatialLockError(f"{what}: cannot load {path}: {first_line(err)}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"


def write_model_folder(folder: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """A model folder of the project's own models (detector, locator, LAMA): `config.json` and `model.safetensors`.
    Use `atomic_save_pretrained` to write it atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(weights, folder / MODEL_WEIGHTS, metadata={"format": "pt"})
    usual_modes(folder / MODEL_WEIGHTS)
    (folder / MODEL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_model_folder(folder: str | os.PathLike, what: str, build) -> nn.Module:
    """The model `write_model_folder` wrote to `folder`, in eval mode: `build(config dict)` makes it, the weights
    are loaded from safetensors. Every way the folder can be wrong is one `SpatialLockError` naming `what`."""
    folder = Path(folder)
    config_file, weights_file = folder / MODEL_CONFIG, folder / MODEL_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise SpatialLockError(f"{what}: {folder} lacks {MODEL_CONFIG} or {MODEL_WEIGHTS}")
    try:
        values = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise TypeError(f"a JSON {type(values).__name__}, not an object")
        model = build(values)
    except SpatialLockError as err:
        raise SpatialLockError(f"{config_file}: {err}") from None
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, RecursionError) as err:
        raise SpatialLockError(f"{what}: {config_file} is not a {what} config ({first_line(err)})") from None
    try:
        model.load_state_dict(load_file(weights_file))
    except SafetensorError as err:  # truncated or not a safetensors file
        raise SpatialLockError(f"{what}: {weights_file} is not readable ({first_line(err)})") from None
    except RuntimeError as err:  # other tensors than the config's architecture has
        raise SpatialLockError(f"{what}: {weights_file} does not fit its {MODEL_CONFIG} ({first_line(err)})") from None
    return model.eval()
