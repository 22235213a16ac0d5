"""`spatiallock train adapter` on tiny bases written to disk: what it writes, what it trains, what it leaves alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from helpers import SYNTH_CLASSES, adapter_for, error_line, run_train_adapter
from safetensors.torch import load_file

import spatiallock.training.adapter as adapter_training
from spatiallock.base.folders import load_base
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.training.common import noisy_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("base_kind", ["sd", "small-base"])
def test_train_writes_a_loadable_adapter_that_moved_from_its_init(request, tiny_shapes, tmp_path, capsys, base_kind):
    base_folder = request.getfixturevalue({"sd": "tiny_sd", "small-base": "tiny_small_base"}[base_kind])
    out = tmp_path / "adapter"
    # with the warm-up, the two steps take lr 2e-4 and 4e-4
    assert run_train_adapter(base_folder, tiny_shapes, out, "--max-steps", "2", "--lr", "1e-2") == 0
    assert f"adapter written to {out} (2 steps" in capsys.readouterr().out

    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "train" / "config.json").read_text())["base"] == str(base_folder)
    trained = SpatialLockAdapter.from_pretrained(out)
    base = load_base(base_folder)
    trained.attach(base.unet)  # fits the base it was trained on
    width = 32 if base_kind == "sd" else 384  # CLIP-tiny or all-MiniLM-L6-v2
    assert trained.config.variant == "spatiallock"
    assert trained.config.context_dim == width and trained.config.phrase_dim == width
    assert trained.config.num_classes == SYNTH_CLASSES
    assert list(trained.config.blocks) == [
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.0",
    ]

    init, after = adapter_for(base_folder).state_dict(), trained.state_dict()
    assert init.keys() == after.keys()
    gates = [k for k in init if k.endswith(("gate_attn", "gate_ff"))]
    assert len(gates) == 4
    for key in gates:  # zero at init (identity blocks), opened by training
        assert init[key].item() == 0.0 and after[key].item() != 0.0, key
    assert not torch.equal(init["weighting.log_vars"], after["weighting.log_vars"])
    # every tensor moved, even those behind zero-initialised gates and projections (no gradient in step 1), but
    # maybe a LayerNorm scale: its step-2 gradient can be ~1e-13, and an Adam step ~1e-9 is lost next to 1.0
    unchanged = [k for k in init if torch.equal(init[k], after[k])]
    assert all(".norm" in k and k.endswith(".weight") and bool((init[k] == 1).all()) for k in unchanged), unchanged
    assert len(unchanged) <= 0.1 * len(init), unchanged
    assert all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_with_gradient_checkpointing_writes_a_loadable_adapter_that_moved(
    tiny_sd, tiny_shapes, tmp_path, monkeypatch, checkpointing
):
    """`--mixed-precision bf16` (and `--gradient-checkpointing`): every training forward runs the frozen base in
    bf16 under bf16 autocast, with the U-Net's gradient checkpointing on and used (torch's checkpoint called in
    the U-Net's blocks) exactly when asked, and the adapter written loads, fits the base and has moved."""
    checkpoint, checkpointed = torch.utils.checkpoint.checkpoint, []

    def counting_checkpoint(*args, **kwargs):
        checkpointed.append(1)
        return checkpoint(*args, **kwargs)

    forward, seen = SpatialLockAdapter.forward, []

    def recording_forward(self, unet, *args, **kwargs):
        before = len(checkpointed)
        output = forward(self, unet, *args, **kwargs)
        autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        seen.append((unet.is_gradient_checkpointing, unet.dtype, autocast, len(checkpointed) - before))
        return output

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(SpatialLockAdapter, "forward", recording_forward)
    out = tmp_path / "adapter"
    options = ("--mixed-precision", "bf16", "--max-steps", "2", "--lr", "1e-2")
    if checkpointing:
        options += ("--gradient-checkpointing",)
    assert run_train_adapter(tiny_sd, tiny_shapes, out, *options) == 0
    assert len(seen) == 2
    for on, dtype, autocast, calls in seen:
        assert dtype == torch.bfloat16 and autocast == (True, torch.bfloat16)
        assert on == checkpointing and (calls > 0) == checkpointing
    recorded = json.loads((out / "train" / "config.json").read_text())
    assert recorded["mixed_precision"] == "bf16" and recorded["gradient_checkpointing"] is checkpointing

    trained = SpatialLockAdapter.from_pretrained(out)
    trained.attach(load_base(tiny_sd).unet)  # fits the base it was trained on
    init, after = adapter_for(tiny_sd).state_dict(), trained.state_dict()
    assert init.keys() == after.keys() and all(torch.isfinite(v).all() for v in after.values())
    assert all(after[k].item() != 0.0 for k in init if k.endswith(("gate_attn", "gate_ff")))  # opened from zero
    assert sum(not torch.equal(init[k], after[k]) for k in init) >= 0.9 * len(init)


def test_unknown_position_fails_with_the_valid_names(tiny_sd, tiny_shapes, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert run_train_adapter(tiny_sd, tiny_shapes, out, "--max-steps", "1", "--positions", "nosuchblock") == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("spatiallock: error: positions: nosuchblock names no attention block; valid: ")
    valid = "down_blocks.0.attentions.0, mid_block.attentions.0, up_blocks.1.attentions.0, up_blocks.1.attentions.1"
    assert f"valid: {valid} or a preset: default, all, down, up, inner" in err
    assert not (out / "config.json").exists()


def test_fixed_loss_weights_are_recorded_and_used(tiny_sd, tiny_shapes, tmp_path):
    out = tmp_path / "adapter"
    assert run_train_adapter(tiny_sd, tiny_shapes, out, "--max-steps", "1", "--loss-weights", "0.5,0.5") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["loss_weighting"] == "fixed" and config["loss_weights"] == [0.5, 0.5]
    assert json.loads((out / "train" / "config.json").read_text())["loss_weights"] == [0.5, 0.5]
    adapter = SpatialLockAdapter.from_pretrained(out)
    assert adapter.weighting.log_vars is None and "weighting.log_vars" not in adapter.state_dict()
    assert adapter.weighting.weights() == {"diffusion": 0.5, "perception": 0.5}
    entry = json.loads((out / "train" / "log.jsonl").read_text().splitlines()[-1])
    assert entry["step"] == 1 and entry["weights"] == {"diffusion": 0.5, "perception": 0.5}
    assert entry["loss"] == pytest.approx(0.5 * entry["diffusion"] + 0.5 * entry["perception"], rel=1e-6)


@pytest.mark.parametrize("text", ["0.5", "0.5,x", "0.5,-1"])
def test_malformed_loss_weights_are_refused_by_the_parser(tmp_path, capsys, text):
    assert run_train_adapter(tmp_path / "base", tmp_path / "data", tmp_path / "out", "--loss-weights", text) == 2
    assert "--loss-weights" in capsys.readouterr().err


def _file_hashes(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _tensors(base) -> dict[str, dict[str, torch.Tensor]]:
    parts = {"unet": base.unet, "vae": base.vae, "text_encoder": base.text_encoder}
    return {name: {k: v.detach().clone() for k, v in part.state_dict().items()} for name, part in parts.items()}


def test_training_leaves_the_base_bit_identical(tiny_sd, tiny_shapes, tmp_path, monkeypatch):
    files_before = _file_hashes(tiny_sd)
    tensors_before = _tensors(load_base(tiny_sd))
    loaded = []  # the base object the training run used

    def recording_load_base(*args, **kwargs):
        loaded.append(load_base(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(adapter_training, "load_base", recording_load_base)
    assert run_train_adapter(tiny_sd, tiny_shapes, tmp_path / "adapter", "--max-steps", "2", "--lr", "1e-2") == 0
    assert len(loaded) == 1

    # on disk: not one byte changed, nothing added or removed
    assert _file_hashes(tiny_sd) == files_before
    # in memory, after training: the base the run used still holds exactly its weights, frozen, no adapter keys
    for name, tensors in _tensors(loaded[0]).items():
        assert tensors.keys() == tensors_before[name].keys(), name
        for key, value in tensors.items():
            assert torch.equal(value, tensors_before[name][key]), f"{name}.{key}"
        assert not any(p.requires_grad for p in getattr(loaded[0], name).parameters()), name
    # and reloaded from disk
    reloaded = _tensors(load_base(tiny_sd))
    for name, tensors in reloaded.items():
        assert all(torch.equal(v, tensors_before[name][k]) for k, v in tensors.items()), name
    # the adapter did train (so the base really was run under a changing adapter)
    trained = load_file(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors")
    assert trained["fusers.0.gate_attn"].item() != 0.0


def test_cubic_timestep_sampling_favours_the_noisy_steps():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.zeros(4000, 1, 1, 1)
    steps = {}
    for sampling in ("uniform", "cubic"):
        _, t, _ = noisy_inputs(scheduler, latents, torch.Generator().manual_seed(0), sampling)
        assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.int64
        steps[sampling] = t.float()
    assert abs(steps["uniform"].mean() - 500) < 20
    assert abs(steps["cubic"].mean() - 750) < 20  # E[1 - u^3] = 3/4
    assert (steps["cubic"] >= 500).float().mean() > 0.75  # P(u^3 <= 1/2) = 0.79


def test_an_unknown_timestep_sampling_is_refused(tiny_small_base, tiny_shapes, tmp_path, capsys):
    assert run_train_adapter(tiny_small_base, tiny_shapes, tmp_path / "a", "--timestep-sampling", "log-normal") == 2
    assert "invalid choice: 'log-normal'" in capsys.readouterr().err


def test_gate_lr_scale_lets_the_gates_take_larger_steps(tiny_small_base, tiny_shapes, tmp_path):
    # one step at lr 1e-2 (warm-up: 2e-4); Adam's first step moves every parameter with a gradient by the lr
    out = tmp_path / "adapter"
    options = ("--max-steps", "1", "--lr", "1e-2", "--gate-lr-scale", "10")
    assert run_train_adapter(tiny_small_base, tiny_shapes, out, *options) == 0
    assert json.loads((out / "train" / "config.json").read_text())["gate_lr_scale"] == 10.0
    init, after = adapter_for(tiny_small_base).state_dict(), SpatialLockAdapter.from_pretrained(out).state_dict()
    gates = [k for k in init if k.endswith(("gate_attn", "gate_ff"))]
    for key in gates:
        assert abs(after[key].item() - init[key].item()) == pytest.approx(2e-3, rel=1e-3), key
    steps = (after["weighting.log_vars"] - init["weighting.log_vars"]).abs()
    torch.testing.assert_close(steps, torch.full_like(steps, 2e-4), rtol=1e-3, atol=0)


def test_max_train_samples_trains_on_the_first_images_only(tiny_small_base, tiny_shapes, tmp_path, monkeypatch):
    from spatiallock.data.coco import LayoutDataset

    drawn = []
    sample = LayoutDataset._sample

    def recording(self, i, image):
        drawn.append(Path(self.records[i].path).name)
        return sample(self, i, image)

    monkeypatch.setattr(LayoutDataset, "_sample", recording)
    out = tmp_path / "adapter"
    assert run_train_adapter(tiny_small_base, tiny_shapes, out, "--max-steps", "4", "--max-train-samples", "2") == 0
    assert json.loads((out / "train" / "config.json").read_text())["max_train_samples"] == 2
    first_two = sorted((tiny_shapes / "train").iterdir())[:2]
    assert len(drawn) == 8 and set(drawn) == {path.name for path in first_two}


@pytest.mark.parametrize("text", ["0", "-3", "two", "1.5"])
def test_max_train_samples_must_be_a_positive_whole_number(tmp_path, capsys, text):
    assert run_train_adapter(tmp_path / "base", tmp_path / "data", tmp_path / "a", "--max-train-samples", text) == 2
    assert f"argument --max-train-samples: expected a positive whole number, got '{text}'" in capsys.readouterr().err
