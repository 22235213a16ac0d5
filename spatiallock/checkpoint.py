"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `checkpoint-<step>/` holding each trainable model (`<name>.safetensors`), the
optimiser's tensors (`optimizer.safetensors`) and the rest of the state (`state.json`: step, optimiser
hyper-parameters, LR scheduler, torch RNG state). It is written to a temporary folder and renamed, so a
kill never leaves a half-written checkpoint; only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PATTERN = re.compile(r"^checkpoint-(\d+)$")


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


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
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
    """Write `checkpoint-<step>` atomically and prune older ones beyond `keep`.

    `tensors`: further tensor files, `{file stem: {key: tensor}}` (an EMA's weights).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-tmp-", dir=folder))
    try:
        for name, model in models.items():
            weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(weights, tmp / f"{name}.safetensors")
        for stem, values in (tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in values.items()}, tmp / f"{stem}.safetensors")
        flat, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
        flat["__torch_rng_state__"] = torch.get_rng_state()
        save_file(flat, tmp / "optimizer.safetensors")
        state = {
            "step": step,
            "optimizer": optimizer_meta,
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "extra": extra or {},
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer, lr_scheduler=None
) -> dict:
    """Restore models, optimiser, LR scheduler and torch RNG from a checkpoint; returns its state.json."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    for name, model in models.items():
        model.load_state_dict(load_file(path / f"{name}.safetensors"))
    tensors = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("__torch_rng_state__"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if lr_scheduler is not None and state.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    return state


def atomic_save_pretrained(model, folder: str | os.PathLike) -> Path:
    """`model.save_pretrained(folder)` through a temporary folder, each file renamed into place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=folder))
    try:
        model.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
