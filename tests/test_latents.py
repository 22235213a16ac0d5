"""A base whose U-Net takes p x p patches of the autoencoder's latent as one cell (`base.latents`): the patch is read
off the configs, loses nothing, and a base trained with `--latent-patch` generates, grounds and starts from layouts."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from helpers import tiny_unet, tiny_vae

from spatiallock.base.folders import load_base, small_unet_config
from spatiallock.base.latents import (
    decode_latents,
    encode_pixels,
    image_factor,
    latent_patch,
    to_autoencoder,
    to_unet,
)
from spatiallock.cli import main
from spatiallock.errors import SpatialLockError
from spatiallock.pipelines.diffusion import SpatialLockPipeline
from spatiallock.training.base import finer_levels, warm_start_unet

pytestmark = pytest.mark.usefixtures("one_thread")


def unet_for(latent_channels: int, patch: int, latent_size: int = 16) -> UNet2DConditionModel:
    config = small_unet_config(latent_size, 32, latent_channels, widths=(16, 32), patch=patch)
    return UNet2DConditionModel(**{**config, "attention_head_dim": 8, "norm_num_groups": 8})


def test_the_patch_is_read_off_the_configs_and_a_mismatch_is_refused():
    vae = tiny_vae()  # 4 latent channels, factor 2
    assert latent_patch(vae, tiny_unet()) == 1 and image_factor(vae, tiny_unet()) == 2
    patched = unet_for(4, 2)
    assert (patched.config.in_channels, patched.config.out_channels, patched.config.sample_size) == (16, 16, 8)
    assert latent_patch(vae, patched) == 2 and image_factor(vae, patched) == 4
    assert latent_patch(vae, unet_for(4, 3, latent_size=18)) == 3
    with pytest.raises(SpatialLockError, match="unet: 8 output channels do not fit an autoencoder of 4"):
        latent_patch(vae, unet_for(8, 1))
    with pytest.raises(SpatialLockError, match="latent patch: must divide the latent size 16, got 3"):
        small_unet_config(16, 32, 4, patch=3)


def test_patches_are_a_lossless_rearrangement_of_the_latent():
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cells = to_unet(latents, 2)
    assert cells.shape == (2, 16, 8, 8)
    # one U-Net cell holds the 2 x 2 latent cells it covers, each latent channel's four in a row
    assert torch.equal(cells[1, 4:8, 3, 5], latents[1, 1, 6:8, 10:12].reshape(-1))
    assert torch.equal(to_autoencoder(cells, 2), latents)
    assert to_unet(latents, 1) is latents and to_autoencoder(latents, 1) is latents


def test_encoding_and_decoding_through_patches_gives_the_autoencoders_own_round_trip():
    torch.manual_seed(0)
    vae = tiny_vae().eval()
    vae.register_to_config(scaling_factor=0.5)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        plain = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        cells = encode_pixels(vae, 2, pixels)
        assert cells.shape == (2, 16, 8, 8)
        torch.testing.assert_close(cells, to_unet(vae.encode(pixels).latent_dist.mean * 0.5, 2))
        torch.testing.assert_close(decode_latents(vae, 2, cells), plain)
        sampled = encode_pixels(vae, 2, pixels, "sample", torch.Generator().manual_seed(1))
        assert not torch.equal(sampled, cells)  # a draw from the posterior, not its mean


def test_a_base_trained_with_latent_patches_generates_grounds_and_starts_from_layouts(
    tiny_shapes, tiny_small_base, tmp_path, capsys
):
    autoencoder, out, adapter = tmp_path / "ae", tmp_path / "patched", tmp_path / "adapter"
    common = ["--data", str(tiny_shapes), "--resolution", "32", "--no-progress", "--batch-size", "2"]
    shape = ["--latent-size", "16", "--vae-widths", "16,32", "--vae-batch-size", "2", "--vae-steps", "2"]
    assert main(["train", "base", "--out", str(autoencoder), *common, *shape, "--vae-only"]) == 0
    # a U-Net on 2x2 patches of its 16x16x4 latent, warm-started from a U-Net of the same blocks on 8x8x4 latents
    patched = ["--vae-from", str(autoencoder / "vae"), "--latent-patch", "2", "--unet-widths", "32,64"]
    still = ["--max-steps", "1", "--lr", "1e-9", "--ema-decay", "0"]  # one step that moves nothing measurably
    assert (
        main(
            ["train", "base", "--out", str(out), *common, *patched, "--unet-warm-start", str(tiny_small_base), *still]
        )
        == 0
    )
    assert "tensors taken, 3 start fresh" in capsys.readouterr().out  # conv_in's weight, conv_out's weight and bias
    base, source = load_base(out), load_base(tiny_small_base)
    assert base.vae.config.latent_channels == 4 and base.latent_patch == 2
    assert (base.unet.config.in_channels, base.unet.config.sample_size) == (16, 8)  # a 16x16x4 latent as 8x8x16
    ours, theirs = base.unet.state_dict(), source.unet.state_dict()
    assert ours["conv_in.weight"].shape == (32, 16, 3, 3) and ours["conv_out.weight"].shape == (16, 32, 3, 3)
    for key, value in theirs.items():
        if ours[key].shape == value.shape:
            torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)
    capsys.readouterr()
    refused = ["train", "base", "--out", str(tmp_path / "no"), *common, "--init-from", str(tiny_small_base)]
    assert main([*refused, "--unet-warm-start", str(tiny_small_base)]) == 2
    assert "unet warm start: not with init from" in capsys.readouterr().err
    argv = ["train", "adapter", "--base", str(out), "--data", str(tiny_shapes), "--out", str(adapter)]
    assert main([*argv, "--positions", "all", "--max-steps", "1", "--batch-size", "2", "--no-progress"]) == 0
    pipe = SpatialLockPipeline.from_pretrained(str(out), adapter=str(adapter))
    assert pipe.vae_scale_factor == 4 and pipe.native_size == 32
    layout = {"prompt": "a red circle", "phrases": ["red circle"], "boxes": [[0.1, 0.1, 0.6, 0.6]]}
    for extra in ({}, {"init_from_layout": True}):
        image = pipe(**layout, **extra, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (32, 32)
    with pytest.raises(SpatialLockError, match="must be a multiple of 4"):
        pipe(**layout, height=30, width=32, num_inference_steps=1)
    # the folders stay plain diffusers ones: the autoencoder's latent is as trained, 16x16x4
    vae = AutoencoderKL.from_pretrained(out / "vae")
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape == (1, 4, 16, 16)


def test_a_unet_with_a_finer_level_in_front_starts_from_every_block_of_one_without():
    torch.manual_seed(0)
    source = unet_for(16, 2)  # widths 16, 32 on a 16x16x4 latent in 2x2 patches: the 8x8 cells
    config = small_unet_config(16, 32, 4, widths=(8, 16, 32), plain_levels=1)  # the same latent, every cell
    assert finer_levels((8, 16, 32), (16, 32)) == 1
    assert finer_levels((8, 16, 32), (8, 32)) == 0 and finer_levels((16, 32), (16, 32)) == 0
    assert config["time_embedding_dim"] == 64 == 4 * source.config.block_out_channels[0]
    fresh = UNet2DConditionModel(**{**config, "attention_head_dim": 8})
    unet = UNet2DConditionModel(**{**config, "attention_head_dim": 8})
    unet.load_state_dict(fresh.state_dict())
    taken, left = warm_start_unet(unet, source.state_dict(), finer=1)
    ours, theirs = unet.state_dict(), source.state_dict()
    # the source's down block 0 is down block 1 here; the up blocks keep their numbers; the finest level is new
    for here, there in [
        ("down_blocks.1.attentions.0.proj_in.weight", "down_blocks.0.attentions.0.proj_in.weight"),
        ("down_blocks.2.resnets.0.conv2.weight", "down_blocks.1.resnets.0.conv2.weight"),
        ("up_blocks.1.attentions.0.proj_out.weight", "up_blocks.1.attentions.0.proj_out.weight"),
        ("mid_block.resnets.0.conv1.weight", "mid_block.resnets.0.conv1.weight"),
    ]:
        assert torch.equal(ours[here], theirs[there])
    new = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(ours[new], fresh.state_dict()[new])
    # all but 13: the input and output layers (conv_in, conv_norm_out, conv_out: 6) and the first layers of the
    # two resnets that meet the new level (down 1's first, up 1's last: their inputs are 8 channels wider here)
    assert (taken, left) == (len(theirs) - 13, len(ours) - len(theirs) + 13)
    # 8 sinusoidal time features here, 16 there: the first time layer is fitted, not left fresh
    steps = torch.tensor([0, 100, 400, 700, 999])
    with torch.no_grad():
        wanted = source.time_embedding(source.time_proj(steps))
        error = (unet.time_embedding(unet.time_proj(steps)) - wanted).norm() / wanted.norm()
        unfitted = (fresh.time_embedding(fresh.time_proj(steps)) - wanted).norm() / wanted.norm()
    assert error < unfitted / 2  # 0.50 against 1.45 here; 0.08 for the 32x32 U-Net from the patched base's
    assert torch.isfinite(unet.time_embedding.linear_1.weight.half()).all()  # a ridge fit: storable in fp16
