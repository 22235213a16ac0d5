"""Checkpoints of `train adapter`: a resumed run ends bit-identical to an uninterrupted one; a NaN loss stops the
run and keeps the last good checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import adapter_for, error_line, run_train_adapter
from safetensors.torch import load_file

from spatiallock.checkpoint import list_checkpoints
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.training.adapter import AdapterTrainConfig, train_adapter
from spatiallock.training.loop import LoopConfig, NonFiniteLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(tiny_sd, tiny_shapes, tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    lr = ("--lr", "1e-3")  # with the default warm-up, steps 1..4 take lr 2e-5 .. 8e-5
    assert run_train_adapter(tiny_sd, tiny_shapes, whole, "--max-steps", "4", "--checkpoint-every", "2", *lr) == 0
    assert run_train_adapter(tiny_sd, tiny_shapes, parts, "--max-steps", "2", "--checkpoint-every", "1", *lr) == 0
    capsys.readouterr()
    # the same output folder again without --resume is refused before any training
    assert run_train_adapter(tiny_sd, tiny_shapes, parts, "--max-steps", "4", *lr) == 2
    assert "already holds checkpoints; pass --resume" in error_line(capsys.readouterr().err)
    resumed = ("--max-steps", "4", "--checkpoint-every", "1", "--resume", *lr)
    assert run_train_adapter(tiny_sd, tiny_shapes, parts, *resumed) == 0

    final = load_file(whole / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(load_file(parts / "diffusion_pytorch_model.safetensors"), final)
    assert not torch.equal(final["fusers.0.gate_attn"], torch.zeros(()))  # it trained
    # the step-4 checkpoints agree too: weights, optimiser moments, LR scheduler, RNG state
    last_whole, last_parts = (list_checkpoints(f / "train" / "checkpoints" / "adapter")[-1] for f in (whole, parts))
    assert last_whole.name == last_parts.name == "checkpoint-4"
    for name in ("adapter.safetensors", "optimizer.safetensors"):
        assert_same_tensors(load_file(last_parts / name), load_file(last_whole / name))
    assert json.loads((last_parts / "state.json").read_text()) == json.loads((last_whole / "state.json").read_text())
    # the log of the resumed run holds each logged step once
    steps = [json.loads(line)["step"] for line in (parts / "train" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_sd, tiny_shapes, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    original = SpatialLockAdapter.forward
    calls = []

    def forward_with_nan_at_step_3(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(SpatialLockAdapter, "forward", forward_with_nan_at_step_3)
    loop = LoopConfig(max_steps=6, batch_size=2, warmup_steps=50, checkpoint_every=2, progress=False)  # as the CLI
    config = AdapterTrainConfig(base=str(tiny_sd), data=str(tiny_shapes), out=str(out), loop=loop)
    with pytest.raises(NonFiniteLoss, match=r"loss: became nan at step 3; stopped, .*checkpoint-2 is kept"):
        train_adapter(config)
    assert len(calls) == 3  # stopped at once: no further step

    kept = list_checkpoints(out / "train" / "checkpoints" / "adapter")
    assert [p.name for p in kept] == ["checkpoint-2"]
    assert json.loads((kept[0] / "state.json").read_text())["step"] == 2
    assert not (out / "config.json").exists()  # no final adapter from a failed run
    weights = load_file(kept[0] / "adapter.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    adapter_for(tiny_sd).load_state_dict(weights)  # loadable as the adapter, strictly

    # without the fault, --resume continues from step 2 and finishes
    monkeypatch.undo()
    assert run_train_adapter(tiny_sd, tiny_shapes, out, "--max-steps", "4", "--checkpoint-every", "2", "--resume") == 0
    assert [p.name for p in list_checkpoints(out / "train" / "checkpoints" / "adapter")] == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    finished = SpatialLockAdapter.from_pretrained(out).state_dict()
    assert all(torch.isfinite(v).all() for v in finished.values())
