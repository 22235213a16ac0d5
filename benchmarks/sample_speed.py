"""Sampling speed: seconds per image of the plain base pipeline, SpatialLock and the GLIGEN-style baseline.

Rows: `base`; `spatiallock` (the paper's two blocks); `shipped` (an adapter built by the recipe of the shipped
model's adapter, or of `--shipped MODEL`'s); `spatiallock-box-all` (box attention and the full block in every down
and up transformer block: the configuration shipped before the lean one); `gligen`.

One run, one device, the same steps, the same latents and layouts for all three; random weights (speed does
not depend on them). On CPU: the project's small base architecture at its native 64 px. On a GPU: the Stable
Diffusion v1.4 architecture at 512 px in fp16 with 50 steps.

    python benchmarks/sample_speed.py                 # the device's default setting
    python benchmarks/sample_speed.py --steps 25 --images 8 --repeats 3
    python benchmarks/sample_speed.py --layout-control   # plus the training-free tools' rows (guidance, init)
    python benchmarks/sample_speed.py --save-images before.npz   # then, on changed code: --same-as before.npz

Writes benchmarks/results/sample_speed_<cpu|cuda>.json with the device named.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from spatiallock.base.configs import SD_V1_UNET
from spatiallock.base.folders import CAPTION_TOKENS, small_scheduler, small_unet_config, small_vae_config
from spatiallock.base.text import phrase_dim
from spatiallock.layout import Layout
from spatiallock.models.adapter import RECIPE, SpatialLockAdapter
from spatiallock.models.grounding import GATES
from spatiallock.pipelines.diffusion import SpatialLockPipeline
from spatiallock.sampling import adapter_like

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = [
    Layout(
        "a red circle and a blue square",
        ("red circle", "blue square"),
        ((0.05, 0.3, 0.45, 0.7), (0.55, 0.3, 0.95, 0.7)),
    ),
    Layout("a green triangle", ("green triangle", "yellow diamond"), ((0.3, 0.05, 0.7, 0.45), (0.3, 0.55, 0.7, 0.95))),
    Layout("three shapes", ("red square", "blue circle"), ((0.0, 0.0, 0.3, 0.3), (0.35, 0.35, 0.65, 0.65))),
    Layout("a yellow circle", ("yellow circle",), ((0.25, 0.25, 0.75, 0.75),)),
]

SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "scaling_factor": 0.18215,
}  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} threads"


def small_base_parts():
    """The small base's architecture with random weights, and the real all-MiniLM-L6-v2 text encoder."""
    from spatiallock.base.text import load_minilm

    text_encoder, tokenizer = load_minilm()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**small_unet_config(16, text_encoder.config.hidden_size))
    vae = AutoencoderKL(**small_vae_config(64))
    sampler = DDIMScheduler.from_config(small_scheduler().config)
    return vae, text_encoder, tokenizer, unet, sampler, CAPTION_TOKENS


def sd_parts():
    """Stable Diffusion v1.4's architecture with random weights; a character-level CLIP tokenizer (speed only)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(tempfile.mkdtemp())
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768,
    )  # fmt: skip
    text_encoder = CLIPTextModel(config)
    unet = UNet2DConditionModel(**SD_V1_UNET)
    vae = AutoencoderKL(**SD_VAE)
    sampler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return vae, text_encoder, tokenizer, unet, sampler, 77


def open_gates(adapter: SpatialLockAdapter) -> SpatialLockAdapter:
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if name.rsplit(".", 1)[-1] in GATES:
                parameter.fill_(0.5)
    return adapter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 25 on CPU, 50 on GPU)")
    parser.add_argument("--images", type=int, default=None, help="images per call (default: 8 on CPU, 4 on GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per model, after one warm-up call")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even when a GPU is there")
    parser.add_argument(
        "--layout-control", action="store_true",
        help="add rows with cross-attention layout guidance (10 steps) and layout-rendered initialisation, on the "
        "base and on SpatialLock: what the training-free tools cost",
    )  # fmt: skip
    parser.add_argument(
        "--shipped",
        default="default",
        metavar="MODEL",
        help="the `shipped` row: an adapter built by the recipe of MODEL's adapter (default: the shipped model)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="NAME=MODEL",
        help="one more row NAME: an adapter built by the recipe of MODEL's adapter; repeatable",
    )
    parser.add_argument(
        "--out", default=None, help="result JSON (default: benchmarks/results/sample_speed_<dev>.json)"
    )
    parser.add_argument(
        "--save-images", default=None, metavar="FILE.npz", help="keep each row's images (of the warm-up call)"
    )
    parser.add_argument(
        "--same-as", default=None, metavar="FILE.npz",
        help="compare each row's images with those a --save-images run kept (another version of the code): the "
        "largest difference per row goes into the results",
    )  # fmt: skip
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    gpu = device.type == "cuda"
    steps = args.steps or (50 if gpu else 25)
    images = args.images or (4 if gpu else 8)
    dtype = torch.float16 if gpu else torch.float32
    vae, text_encoder, tokenizer, unet, sampler, caption_tokens = sd_parts() if gpu else small_base_parts()
    pipe = SpatialLockPipeline(vae, text_encoder, tokenizer, unet, sampler, None, caption_tokens)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    adapters = {
        "base": None,
        "spatiallock": SpatialLockAdapter.from_unet(unet, "spatiallock", None, phrase_dim(text_encoder), 16),
        "shipped": adapter_like(args.shipped, unet, phrase_dim(text_encoder), 16),
        "gligen": SpatialLockAdapter.from_unet(unet, "gligen", None, phrase_dim(text_encoder), 16),
        # the configuration shipped before: box attention and the full block in every down and up transformer block
        "spatiallock-box-all": SpatialLockAdapter.from_unet(
            unet, "spatiallock", "all", phrase_dim(text_encoder), 16, box_attention=True
        ),
    }
    for text in args.recipe:
        name, _, model = text.partition("=")
        if not name or not model or name in adapters:
            parser.error(f"--recipe: expected a new NAME=MODEL, got {text!r}")
        adapters[name] = adapter_like(model, unet, phrase_dim(text_encoder), 16)
    # row name -> (adapter, pipeline options)
    runs = {name: (name, {}) for name in adapters}
    if args.layout_control:
        guided, init = {"layout_guidance_steps": 10}, {"layout_guidance_steps": 10, "init_from_layout": True}
        runs.update({"base+guidance": ("base", guided), "base+guidance+init": ("base", init)})
        runs["spatiallock+guidance+init"] = ("spatiallock", init)
    layouts = [LAYOUTS[i % len(LAYOUTS)] for i in range(images)]
    size = pipe.native_size
    rows = []
    print(f"device: {device_name(device)}; {size}px, {steps} steps, {images} images per call, {dtype}")
    # round-robin over the models, so that any load on the machine falls on all of them alike
    times: dict[str, list[float]] = {name: [] for name in runs}
    kept: dict[str, np.ndarray] = {}
    for repeat in range(args.repeats + 1):
        for name, (model, options) in runs.items():
            adapter = adapters[model]
            pipe.set_adapter(None if adapter is None else open_gates(adapter))
            generator = [torch.Generator(device).manual_seed(i) for i in range(images)]
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = pipe(layouts=layouts, num_inference_steps=steps, generator=generator, output_type="np", **options)
            if gpu:
                torch.cuda.synchronize()
            if repeat:  # the first round warms up
                times[name].append((time.perf_counter() - start) / images)
            else:
                kept[name] = out.images
    if args.save_images:
        np.savez_compressed(args.save_images, **kept)
    reference = dict(np.load(args.same_as)) if args.same_as else {}
    for name, (model, options) in runs.items():
        adapter = adapters[model]
        row = {
            "model": name,
            "options": options,
            "s_per_image": round(statistics.median(times[name]), 4),
            "s_per_image_all": [round(t, 4) for t in times[name]],
            "adapter_params": 0 if adapter is None else sum(p.numel() for p in adapter.parameters()),
        }
        if name in reference:  # images in [0, 1]
            row["max_abs_diff_vs_reference"] = float(np.abs(kept[name] - reference[name]).max())
        rows.append(row)
        same = f"  images differ by {row['max_abs_diff_vs_reference']:.2e}" if name in reference else ""
        print(f"  {name:26s} {row['s_per_image']:.4f} s/image  (adapter {row['adapter_params'] / 1e6:.2f} M){same}")
    base = rows[0]["s_per_image"]
    for row in rows:
        row["vs_base"] = round(row["s_per_image"] / base, 3)
    print("  ratio to base: " + ", ".join(f"{r['model']} {r['vs_base']:.2f}x" for r in rows))
    result = {
        "benchmark": "sample_speed",
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "architecture": "sd-v1.4" if gpu else "spatiallock small base",
        "resolution": size,
        "steps": steps,
        "images_per_call": images,
        "dtype": str(dtype).replace("torch.", ""),
        "guidance_scale": 5.0,
        "shipped": args.shipped,
        "shipped_recipe": {k: adapters["shipped"].config[k] for k in ("variant", "positions", *RECIPE[1:])},
        "rows": rows,
    }
    out = Path(args.out) if args.out else RESULTS / f"sample_speed_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
