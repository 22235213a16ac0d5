"""SDXL as a base: a tiny SDXL-format folder built in code (`helpers.make_tiny_sdxl`), the real SDXL configuration
counted on the meta device. What holds on SD v1.x holds here: the plain path is diffusers' pipeline, training
resumes exactly, a layout moves the image and its padding does not, and a broken folder is one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import LAYOUTS, NAMES, STEPS, adapter_for, box_adapter, error_line, generate, run_train_adapter, sample
from safetensors.torch import load_file

from spatiallock.base.folders import load_base
from spatiallock.cli import main
from spatiallock.errors import SpatialLockError
from spatiallock.layout import Layout
from spatiallock.pipelines.diffusion import SpatialLockPipeline


def test_plain_path_matches_diffusers_stable_diffusion_xl_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        [layout.caption for layout in LAYOUTS], num_inference_steps=STEPS, guidance_scale=4.0, output_type="np",
        height=32, width=32, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    ours = SpatialLockPipeline.from_pretrained(tiny_sdxl, adapter=adapter_for(tiny_sdxl))  # every gate at zero
    assert type(ours.scheduler).__name__ == "EulerDiscreteScheduler"  # the folder's own sampler
    assert ours.text_conditioning.family == "sdxl"
    np.testing.assert_allclose(sample(ours), expected, atol=1e-5)
    # the same without an adapter, and without guidance (no unconditional rows)
    plain = SpatialLockPipeline.from_pretrained(tiny_sdxl)
    np.testing.assert_allclose(sample(plain), expected, atol=1e-5)
    unguided = reference(
        [layout.caption for layout in LAYOUTS], num_inference_steps=STEPS, guidance_scale=1.0, output_type="np",
        height=32, width=32, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    np.testing.assert_allclose(sample(plain, guidance_scale=1.0), unguided, atol=1e-5)


def test_sdxl_conditioning_is_two_encoders_pooled_text_and_size_ids(tiny_sdxl):
    pipe = SpatialLockPipeline.from_pretrained(tiny_sdxl)
    states, mask, added = pipe.text_conditioning.encode(pipe, ["a red circle", "a blue square"], (32, 48))
    assert states.shape == (2, 77, pipe.unet.config.cross_attention_dim) and mask is None
    assert added["text_embeds"].shape == (2, pipe.text_encoder_2.config.projection_dim)
    assert added["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]] * 2
    empty, _, empty_added = pipe.text_conditioning.unconditional(pipe, 2, (32, 48))
    assert not empty.any() and not empty_added["text_embeds"].any()  # force_zeros_for_empty_prompt
    # training's dropped captions are the unconditional rows; the others are encoded as they are
    dropped, _, dropped_added = pipe.text_conditioning.dropped(pipe, ["", "a blue square"], (32, 48))
    assert not dropped[0].any() and torch.equal(dropped[1], states[1])
    assert not dropped_added["text_embeds"][0].any()
    # phrases: the first encoder's pooled embedding (CLIP ViT-L's on SDXL), as on SD v1.x
    embeds, _, _ = pipe.encode_layouts(LAYOUTS)
    assert embeds.shape[-1] == pipe.text_encoder.config.hidden_size


def test_grounded_image_follows_the_layout_not_its_padding(tiny_sdxl):
    pipe = SpatialLockPipeline.from_pretrained(tiny_sdxl, adapter=box_adapter(tiny_sdxl, class_names=NAMES))
    one = Layout("a red circle", ("red circle",), ((0.1, 0.1, 0.5, 0.5),))
    moved = Layout("a red circle", ("red circle",), ((0.5, 0.5, 0.9, 0.9),))
    first = sample(pipe, layouts=[one])
    assert np.abs(sample(pipe, layouts=[moved]) - first).max() > 1e-3
    # padded beside a layout with more objects, the image is the same
    padded = sample(pipe, layouts=[one, LAYOUTS[0]])[:1]
    np.testing.assert_allclose(padded, first, atol=1e-5)
    # every extension runs on SDXL's inputs (the conditional rows' pooled text and size ids reach each call)
    for options in (
        {"layout_guidance_steps": 1, "layout_guidance_iterations": 1},
        {"init_from_layout": True},
        {"perception_guidance_steps": 1},
        {"candidates": 2, "select_at": 0.5},
    ):
        assert np.isfinite(sample(pipe, layouts=[one], **options)).all(), options


ONE_OBJECT = {"label": "red circle", "box": [0.1, 0.1, 0.6, 0.6]}
RECIPE = ("--positions", "all", "--first-blocks", "1", "--box-attention", "--feed-forward", "finest", "--lr", "1e-3")


@pytest.mark.usefixtures("one_thread")
def test_train_adapter_on_sdxl_saves_loads_generates_and_resumes_exactly(tiny_sdxl, tiny_shapes, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert (
        run_train_adapter(tiny_sdxl, tiny_shapes, whole, *RECIPE, "--max-steps", "4", "--checkpoint-every", "2") == 0
    )
    config = json.loads((whole / "config.json").read_text())
    assert config["first_blocks"] == 1 and config["context_dim"] == 80
    # the first transformer block of each attention module only: the coarser level's stack holds two
    assert config["blocks"] and all(name.endswith("transformer_blocks.0") for name in config["blocks"])
    # two steps, then two more with --resume: the same weights as four at once
    assert (
        run_train_adapter(tiny_sdxl, tiny_shapes, parts, *RECIPE, "--max-steps", "2", "--checkpoint-every", "1") == 0
    )
    resumed = ("--max-steps", "4", "--checkpoint-every", "1", "--resume")
    assert run_train_adapter(tiny_sdxl, tiny_shapes, parts, *RECIPE, *resumed) == 0
    final = load_file(whole / "diffusion_pytorch_model.safetensors")
    assert final.keys() == load_file(parts / "diffusion_pytorch_model.safetensors").keys()
    assert all(torch.equal(final[k], v) for k, v in load_file(parts / "diffusion_pytorch_model.safetensors").items())
    assert not torch.equal(final["fusers.0.gate_attn"], torch.zeros(()))  # it trained
    # load it and generate on the SDXL base
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"caption": "a red circle", "objects": [ONE_OBJECT]}))
    assert generate(layout, tiny_sdxl, tmp_path / "images", "--adapter", str(whole)) == 0
    assert list((tmp_path / "images").glob("*.png"))


def test_save_pretrained_keeps_the_sdxl_parts(tiny_sdxl, tmp_path):
    pipe = SpatialLockPipeline.from_pretrained(tiny_sdxl, adapter=box_adapter(tiny_sdxl))
    expected = sample(pipe)
    pipe.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert {"text_encoder_2", "tokenizer_2"} <= index.keys() and index["force_zeros_for_empty_prompt"] is True
    np.testing.assert_array_equal(sample(SpatialLockPipeline.from_pretrained(tmp_path / "model")), expected)


def test_a_broken_sdxl_folder_is_one_line_naming_the_part(tiny_sdxl, tiny_shapes, tmp_path, capsys):
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"caption": "a red circle", "objects": [ONE_OBJECT]}))
    missing = tmp_path / "missing"
    shutil.copytree(tiny_sdxl, missing)
    shutil.rmtree(missing / "text_encoder_2")
    assert generate(layout, missing, tmp_path / "x", "--adapter", "none") == 2
    assert "without text_encoder_2/" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()
    wide = tmp_path / "wide"
    shutil.copytree(tiny_sdxl, wide)
    config = json.loads((wide / "text_encoder_2" / "config.json").read_text())
    config["hidden_size"] += 16
    (wide / "text_encoder_2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpatialLockError, match=r"hidden sizes 32 \+ 64 do not make unet/'s cross_attention_dim 80"):
        load_base(wide)
    assert run_train_adapter(wide, tiny_shapes, tmp_path / "y") == 2
    assert "cross_attention_dim" in error_line(capsys.readouterr().err)


def test_params_counts_sdxl_on_the_meta_device(capsys):
    assert main(["params", "--base", "sdxl", "--config-from", "default", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert every["base_params"] > 2.5e9  # SDXL's U-Net, 2.57 B, nothing downloaded
    assert 0 < every["ratio"] <= 0.35
    assert main(["params", "--base", "sdxl", "--config-from", "default", "--first-blocks", "1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["gligen_trainable"] == every["gligen_trainable"]
    assert first["spatiallock_trainable"] < every["spatiallock_trainable"] / 3
    assert len(first["spatiallock_blocks"]) == 10  # one a module: 4 attention modules down, 6 up
    assert first["recipe"]["first_blocks"] == 1


def test_every_sampling_command_takes_an_sdxl_base(tiny_sdxl, tiny_shapes, tmp_path, monkeypatch):
    from spatiallock.app.studio import Request, Studio
    from spatiallock.evaluation.detector import Detector, DetectorConfig

    adapter = tmp_path / "adapter"
    box_adapter(tiny_sdxl, class_names=NAMES).save_pretrained(adapter)
    layouts = str(tiny_shapes / "instances_val.json")
    common = ["--model", str(tiny_sdxl), "--adapter", str(adapter), "--steps", "2", "--no-progress"]
    out = tmp_path / "dataset"
    assert main(["generate-dataset", "--layouts", layouts, "--out", str(out), "--limit", "2", *common]) == 0
    assert len(json.loads((out / "instances.json").read_text())["images"]) == 2
    categories = json.loads((tiny_shapes / "instances_val.json").read_text())["categories"]
    detector = tmp_path / "detector"
    torch.manual_seed(0)
    Detector(DetectorConfig(categories=categories, image_size=32)).save_pretrained(detector)
    report = tmp_path / "report.json"
    assert main(["evaluate", "--layouts", layouts, "--detector", str(detector), "--out", str(report), *common]) == 0
    assert json.loads(report.read_text())["num_layouts"] == 4
    studio = Studio(str(tiny_sdxl), str(adapter), detector=None)
    layout = Layout("a red circle", ("red circle",), (tuple(ONE_OBJECT["box"]),))
    ((image, shown, records),) = list(studio.generate(layout, Request(steps=2)))
    assert image.size == (32, 32) and records[0]["label"] == "red circle"
