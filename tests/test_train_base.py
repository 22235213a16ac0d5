"""`spatiallock train base` on a tiny data set: the folder it writes, `--init-from`, Min-SNR weighting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image

from spatiallock.base.folders import load_base, small_unet_config
from spatiallock.cli import main
from spatiallock.pipelines.diffusion import SpatialLockPipeline
from spatiallock.training.base import BaseTrainConfig, min_snr_weights, train_base
from spatiallock.training.loop import LoopConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def train(data, out, *options: str) -> int:
    args = ["train", "base", "--data", str(data), "--out", str(out), "--resolution", "32", "--no-progress"]
    return main([*args, "--batch-size", "2", "--vae-batch-size", "2", *options])


def test_train_base_writes_a_loadable_base_with_a_measured_latent_scale(tiny_shapes, tmp_path):
    out = tmp_path / "base"
    loop = {"batch_size": 2, "progress": False}
    config = BaseTrainConfig(
        data=str(tiny_shapes), out=str(out), resolution=32, flip_prob=0.0,  # the images as they are on disk
        vae=LoopConfig(max_steps=2, learning_rate=1e-3, **loop), unet=LoopConfig(max_steps=2, **loop),
    )  # fmt: skip
    train_base(config)
    base = load_base(out)
    # the latent scale: 1 / std of the autoencoder's posterior means over the training images (all 16 here)
    files = sorted((tiny_shapes / "train").glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    with torch.no_grad():
        means = base.vae.encode(pixels.float() / 127.5 - 1.0).latent_dist.mean
    assert len(files) == 16 and base.vae.config.scaling_factor == pytest.approx(1.0 / means.std().item(), rel=1e-4)
    wanted = small_unet_config(latent_size=8, cross_attention_dim=384)
    assert {k: base.unet.config[k] for k in wanted} == wanted
    stages = {json.loads(line)["stage"] for line in (out / "train" / "log.jsonl").read_text().splitlines()}
    assert stages == {"vae", "unet"}


def test_init_from_keeps_the_autoencoder_and_trains_the_given_unet_further(tiny_shapes, tiny_small_base, tmp_path):
    out = tmp_path / "further"
    options = ("--init-from", str(tiny_small_base), "--max-steps", "1", "--lr", "1e-5", "--snr-gamma", "5")
    assert train(tiny_shapes, out, *options, "--mixed-precision", "bf16") == 0
    before_vae, after_vae = (AutoencoderKL.from_pretrained(p, subfolder="vae") for p in (tiny_small_base, out))
    for key, value in before_vae.state_dict().items():
        assert torch.equal(after_vae.state_dict()[key], value), key  # not trained again
    before, after = (UNet2DConditionModel.from_pretrained(p, subfolder="unet") for p in (tiny_small_base, out))
    assert after.config.block_out_channels == before.config.block_out_channels  # its architecture, not the default
    moved = [k for k, v in before.state_dict().items() if not torch.equal(after.state_dict()[k], v)]
    assert moved  # trained ...
    for key, value in before.state_dict().items():  # ... from those weights: one small step away
        torch.testing.assert_close(after.state_dict()[key], value, atol=1e-3, rtol=0)
    log = (out / "train" / "log.jsonl").read_text().splitlines()
    assert {json.loads(line)["stage"] for line in log} == {"unet"}


def test_init_from_a_folder_without_a_unet_is_one_clear_line(tiny_shapes, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train(tiny_shapes, tmp_path / "o", "--init-from", str(tmp_path / "empty")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"spatiallock: error: init from: {tmp_path / 'empty'} is not a base folder (no unet/config.json)"]
    assert not (tmp_path / "o").exists()


def test_min_snr_weights_cap_the_nearly_clean_steps():
    v = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    eps = DDPMScheduler.from_config(v.config, prediction_type="epsilon")
    steps = torch.tensor([0, 100, 500, 999])
    alphas = v.alphas_cumprod[steps]
    snr = alphas / (1 - alphas)
    assert snr[0] > 5 > snr[-1]  # the clean end above gamma, the noisy end below
    torch.testing.assert_close(min_snr_weights(v, steps, 5.0), snr.clamp(max=5.0) / (snr + 1))
    torch.testing.assert_close(min_snr_weights(eps, steps, 5.0), snr.clamp(max=5.0) / snr)
    w = min_snr_weights(eps, steps, 5.0)
    assert w[-1] == 1.0 and w[0] < 0.1  # noisy steps keep their weight, clean ones lose most of it


def test_train_decoder_changes_only_the_decoder_and_copies_the_rest(tiny_shapes, tiny_small_base, tmp_path, capsys):
    out = tmp_path / "sharper"
    args = ["train", "decoder", "--base", str(tiny_small_base), "--data", str(tiny_shapes), "--out", str(out)]
    assert (
        main([*args, "--resolution", "32", "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3", "--no-progress"])
        == 0
    )
    before, after = (AutoencoderKL.from_pretrained(p, subfolder="vae").state_dict() for p in (tiny_small_base, out))
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder and len(encoder) + len(decoder) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in encoder)  # the latent space does not move
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    unet = (UNet2DConditionModel.from_pretrained(p, subfolder="unet").state_dict() for p in (tiny_small_base, out))
    assert all(torch.equal(a, b) for a, b in zip(*(u.values() for u in unet)))  # copied as it is
    load_base(out)  # a whole model folder
    # the base is copied, never changed in place
    assert main(["train", "decoder", "--base", str(out), "--data", str(tiny_shapes), "--out", str(out)]) == 2
    assert "out: must be another folder than the base" in capsys.readouterr().err


def test_a_latent_shape_of_its_own_trains_alone_and_then_carries_a_unet(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "wide"
    shape = ("--latent-channels", "8", "--latent-size", "16", "--vae-widths", "16,32", "--unet-widths", "32,32,64")
    shape += ("--unet-plain-levels", "1", "--vae-lr-drops", "1")  # fmt: skip
    steps = ("--vae-steps", "2", "--max-steps", "1", "--checkpoint-every", "1")
    assert train(tiny_shapes, out, *shape, *steps, "--vae-only") == 0
    assert "autoencoder written to" in capsys.readouterr().out
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.latent_channels == 8 and list(vae.config.block_out_channels) == [16, 32]
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape == (1, 8, 16, 16)  # factor 2
    assert not (out / "unet").exists()
    assert json.loads((out / "train" / "config.json").read_text())["vae"]["lr_milestones"] == [1]
    # another U-Net on that autoencoder, in a run of its own: the latent shape follows the autoencoder
    other = tmp_path / "other"
    assert train(tiny_shapes, other, "--vae-from", str(out / "vae"), "--unet-widths", "16,32", "--max-steps", "1") == 0
    on_it = load_base(other)
    assert on_it.unet.config.in_channels == 8 and on_it.unet.config.sample_size == 16
    assert list(on_it.unet.config.block_out_channels) == [16, 32]
    for key, value in vae.state_dict().items():
        assert torch.equal(on_it.vae.state_dict()[key], value), key
    capsys.readouterr()
    assert train(tiny_shapes, tmp_path / "none", "--vae-from", str(tmp_path / "missing")) == 2
    assert capsys.readouterr().err.startswith("spatiallock: error: vae from: cannot load")
    assert not (tmp_path / "none").exists()
    # the same run, resumed without --vae-only: the U-Net on those latents, the autoencoder as it was
    assert train(tiny_shapes, out, *shape, *steps, "--resume") == 0
    base = load_base(out)
    assert base.unet.config.in_channels == base.unet.config.out_channels == 8
    assert base.unet.config.sample_size == 16 and list(base.unet.config.block_out_channels) == [32, 32, 64]
    assert base.unet.config.down_block_types[0] == "DownBlock2D"  # no attention over the 16x16 latent
    for key, value in vae.state_dict().items():
        assert torch.equal(base.vae.state_dict()[key], value), key
    # an adapter trains on it and the pipeline draws at its size (a latent of half the image side)
    adapter = tmp_path / "adapter"
    argv = ["train", "adapter", "--base", str(out), "--data", str(tiny_shapes), "--out", str(adapter)]
    assert main([*argv, "--positions", "all", "--max-steps", "1", "--batch-size", "2", "--no-progress"]) == 0
    pipe = SpatialLockPipeline.from_pretrained(str(out), adapter=str(adapter))
    image = pipe(prompt="a red circle", phrases=["red circle"], boxes=[[0.1, 0.1, 0.6, 0.6]], num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (32, 32)
    # the run keeps each command that started or resumed it, in order
    commands = (out / "train" / "commands.txt").read_text().splitlines()
    assert len(commands) == 2 and all("spatiallock train base --data" in line for line in commands)
    assert commands[0].endswith("--vae-only") and commands[1].endswith("--resume")


@pytest.mark.parametrize(
    "options, message",
    [
        (("--latent-size", "12"), "latent size: 12 must divide the resolution 32 by a power of 2"),
        (("--latent-size", "16", "--vae-widths", "32,64,64"), "vae widths: 3 given, but a 16x16 latent"),
        (("--unet-widths", "64"), "unet widths: at least 2 levels, got 1"),
        (("--vae-lr-drops", "1000,0"), "--vae-lr-drops: steps must be at least 1"),
        (("--unet-widths", "32,64", "--unet-plain-levels", "1"), "unet plain levels: from 0 to 0 with 2 levels"),
    ],
)
def test_latent_shapes_that_do_not_fit_are_one_line_naming_the_option(tiny_shapes, tmp_path, capsys, options, message):
    assert train(tiny_shapes, tmp_path / "o", *options) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"spatiallock: error: {message}"), err
    assert not (tmp_path / "o").exists()


def test_plain_levels_take_attention_off_the_finest_levels_and_keep_a_32x32_unet_under_budget():
    from torch.utils.flop_counter import FlopCounterMode

    from spatiallock.models.injection import resolve_positions

    def unet_and_flops(plain: int) -> tuple[UNet2DConditionModel, int]:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**small_unet_config(32, 384, 4, (48, 96, 128, 192), plain_levels=plain)).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(torch.zeros(1, 4, 32, 32), 10, torch.zeros(1, 8, 384))
        return unet, counter.get_total_flops()

    plain, flops = unet_and_flops(1)
    everywhere, flops_everywhere = unet_and_flops(0)
    assert [hasattr(b, "attentions") for b in plain.down_blocks] == [False, True, True, False]
    assert [hasattr(b, "attentions") for b in plain.up_blocks] == [False, True, True, False]
    assert [hasattr(b, "attentions") for b in everywhere.down_blocks] == [True, True, True, False]
    # the adapter's placements see the attention levels only: 16x16 and 8x8, as on the 16x16 latent's U-Net
    assert resolve_positions(plain, "all") == [
        "down_blocks.1.attentions.0", "down_blocks.2.attentions.0",
        "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
    ]  # fmt: skip
    assert flops < 1.8e9 < flops_everywhere  # the new base's budget per call at batch 1: 1.79 G against 2.07 G


def test_base_fingerprint_names_the_weights_of_the_unet_and_the_autoencoder(tiny_small_base, tmp_path):
    import shutil

    from spatiallock.base.folders import base_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(tiny_small_base, copy)
    assert base_fingerprint(copy) == base_fingerprint(tiny_small_base) is not None  # the weights, not the path
    vae = AutoencoderKL.from_pretrained(copy / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1e-3)
    vae.save_pretrained(copy / "vae")  # one decoder weight moved: another base
    assert base_fingerprint(copy) != base_fingerprint(tiny_small_base)
    assert base_fingerprint(tmp_path / "no-base") is None  # nothing to digest (a LAMA model folder)


def test_a_finished_autoencoder_trains_further_on_resume_with_a_late_drop_as_if_run_so_from_the_start(
    tiny_shapes, tmp_path
):
    """--vae-only for 4 steps, then --resume to 6 with the learning rate dropped from step 4: the weights of an
    uninterrupted 6-step run with that drop. A drop placed before the step resumed from is refused."""
    common = ("--vae-only", "--checkpoint-every", "2")
    twice, once = tmp_path / "twice", tmp_path / "once"
    assert train(tiny_shapes, twice, *common, "--vae-steps", "4") == 0
    assert train(tiny_shapes, twice, *common, "--vae-steps", "6", "--resume", "--vae-lr-drops", "3") == 2  # before 4
    assert train(tiny_shapes, twice, *common, "--vae-steps", "6", "--resume", "--vae-lr-drops", "4") == 0
    assert train(tiny_shapes, once, *common, "--vae-steps", "6", "--vae-lr-drops", "4") == 0
    resumed, straight = (AutoencoderKL.from_pretrained(folder / "vae") for folder in (twice, once))
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert resumed.config.scaling_factor == straight.config.scaling_factor
    first = AutoencoderKL.from_pretrained(twice / "train" / "vae")
    assert first.config.scaling_factor == straight.config.scaling_factor  # the run's own copy, updated too


def test_a_decoder_trained_beside_the_unet_on_the_autoencoder_alone_is_assembled_with_it(
    tiny_shapes, tmp_path, capsys
):
    assemble_base = _script("assemble_base")
    autoencoder, unet_run, decoder = tmp_path / "ae", tmp_path / "unet", tmp_path / "dec"
    assert train(tiny_shapes, autoencoder, "--vae-steps", "2", "--vae-only") == 0
    assert train(tiny_shapes, unet_run, "--vae-from", str(autoencoder / "vae"), "--max-steps", "1") == 0
    common = [
        "--data",
        str(tiny_shapes),
        "--resolution",
        "32",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert main(["train", "decoder", "--base", str(autoencoder), "--out", str(decoder), *common]) == 0
    assert (decoder / "vae" / "config.json").is_file() and not (decoder / "unet").exists()  # the autoencoder alone
    before, after = (AutoencoderKL.from_pretrained(p / "vae").state_dict() for p in (autoencoder, decoder))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    # the U-Net of the one run with the decoder of the other: a whole base, in fp16
    out = tmp_path / "base"
    assert assemble_base.main(["--base", str(unet_run), "--vae", str(decoder), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    written = {part: load_file(out / part / "diffusion_pytorch_model.safetensors") for part in ("unet", "vae")}
    for key, value in after.items():
        assert torch.equal(written["vae"][key], value.half()), key
    unet = UNet2DConditionModel.from_pretrained(unet_run / "unet").state_dict()
    assert unet.keys() == written["unet"].keys()
    assert all(torch.equal(written["unet"][k], v.half()) for k, v in unet.items())
    assert load_base(out).latent_patch == 1  # a whole base
    # an autoencoder with another encoder would change what the U-Net's latents mean: refused, nothing written
    other = tmp_path / "other"
    assert train(tiny_shapes, other, "--vae-steps", "1", "--vae-only", "--seed", "1") == 0
    capsys.readouterr()
    assert assemble_base.main(["--base", str(unet_run), "--vae", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "vae: " in capsys.readouterr().err and not (tmp_path / "x").exists()


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_time_input_fp16_cannot_hold_is_refused_then_refitted_to_nearly_the_same_embedding(
    tiny_small_base, tmp_path, capsys
):
    from diffusers.models.embeddings import Timesteps

    from spatiallock.training.decoder import copy_files

    # a U-Net whose time input leans on a direction the 1,000 timesteps' sinusoids barely span, with weights of
    # millions: what an exact least-squares fit on nearly collinear features gives
    unet = UNet2DConditionModel.from_pretrained(tiny_small_base / "unet")
    layer, steps = unet.time_embedding.linear_1, torch.arange(1000)
    features = Timesteps(layer.weight.shape[1], unet.config.flip_sin_to_cos, unet.config.freq_shift)(steps)
    unseen = torch.linalg.svd(features.double()).Vh[-1].float()
    with torch.no_grad():
        before = unet.time_embedding(unet.time_proj(steps))
        layer.weight.add_(3e6 * torch.randn(layer.weight.shape[0], 1) * unseen)
        leaning = unet.time_embedding(unet.time_proj(steps))
    assert float((leaning - before).norm() / before.norm()) < 0.05 and float(layer.weight.detach().abs().max()) > 1e5
    huge = tmp_path / "huge"
    copy_files(tiny_small_base, huge, skip=("unet",))
    unet.save_pretrained(huge / "unet")
    assemble, refit = _script("assemble_base"), _script("refit_time_input")
    assert assemble.main(["--base", str(huge), "--vae", str(huge), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "base: time_embedding.linear_1.weight holds" in err and "beyond fp16" in err
    assert not (tmp_path / "no").exists()
    fixed = tmp_path / "fixed"
    assert refit.main(["--base", str(huge), "--out", str(fixed)]) == 0
    assert "the time embedding moved by" in capsys.readouterr().out
    assert assemble.main(["--base", str(fixed), "--vae", str(fixed), "--out", str(tmp_path / "fp16")]) == 0
    refitted = load_base(tmp_path / "fp16").unet.float()
    with torch.no_grad():
        after = refitted.time_embedding(refitted.time_proj(steps))
    assert torch.isfinite(after).all() and float((after - before).norm() / before.norm()) < 0.1
    assert refit.main(["--base", str(huge), "--out", str(fixed)]) == 2  # never over an existing folder
