"""Sampling speed: seconds per image of the plain base pipeline, SpatialLock and the GLIGEN-style baseline.

Rows: `base`; `spatiallock` (the paper's two blocks); `shipped` (an adapter built by the recipe of the shipped
model's adapter, or of `--shipped MODEL`'s); `spatiallock-box-all` (box attention and the full block in every down
and up transformer block: the configuration shipped before the lean one); `gligen`.

One run, one device, the same steps, the same latents and layouts for all three; random weights (speed does
not depend on them). On CPU: the shipped small base's architecture at its native 64 px. On a GPU: the Stable
Diffusion v1.4 architecture at 512 px in fp16 with 50 steps.

    python benchmarks/sample_speed.py                 # the device's default setting
    python benchmarks/sample_speed.py --steps 25 --images 8 --repeats 3
    python benchmarks/sample_speed.py --layout-control   # plus the training-free tools' rows (guidance, init)
    python benchmarks/sample_speed.py --save-images before.npz   # then, on changed code: --same-as before.npz

Writes benchmarks/results/sample_speed_<cpu|cuda>.json with the device named.

On a tiny SDXL-shaped base (`--sdxl`: SDXL's U-Net layout, no attention at the finest level and deeper stacks at
the coarser ones, two CLIP text encoders, pooled text and size ids, scaled down to run on a CPU): the plain base,
the shipped recipe, the shipped recipe with only the first transformer block of each attention module
(`--first-blocks 1`) and GLIGEN-style, in one run; adds an "sdxl" section to the results file, rows kept:

    python benchmarks/sample_speed.py --sdxl

On a busy machine (`--busy`): the `shipped` row alone, each measurement a process of its own started as a command
starts (so the toolkit's thread settings apply, see `spatiallock.threads`): quiet; beside one busy-loop process
(`while True: pass`); two sampling processes at once (timed together). Each under the toolkit's settings and under
torch's own (SPATIALLOCK_THREADS=torch, how sampling ran before), in one run:

    python benchmarks/sample_speed.py --busy       # adds a "busy" section to the results file, rows kept
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spatiallock.threads import configure_threads

configure_threads()  # before torch loads, as each command does

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402

from spatiallock.base.configs import SD_V1_UNET  # noqa: E402
from spatiallock.base.folders import CAPTION_TOKENS, small_scheduler, small_vae_config  # noqa: E402
from spatiallock.base.text import phrase_dim  # noqa: E402
from spatiallock.layout import Layout  # noqa: E402
from spatiallock.models.adapter import RECIPE, SpatialLockAdapter  # noqa: E402
from spatiallock.models.grounding import GATES  # noqa: E402
from spatiallock.pipelines.diffusion import SpatialLockPipeline  # noqa: E402
from spatiallock.sampling import adapter_like  # noqa: E402

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
    """The shipped small base's architecture (its U-Net's and autoencoder's configs) with random weights, and the
    real all-MiniLM-L6-v2 text encoder."""
    from spatiallock.base.text import load_minilm
    from spatiallock.shipped import default_model_path

    text_encoder, tokenizer = load_minilm()
    torch.manual_seed(0)
    shipped = default_model_path()
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(shipped / "vae"))
    sampler = DDIMScheduler.from_config(small_scheduler().config)
    return vae, text_encoder, tokenizer, unet, sampler, CAPTION_TOKENS


def char_tokenizer(**options):
    """A character-level CLIP tokenizer (speed only): every printable ASCII character, no merges."""
    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp())
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", **options)


def sd_parts():
    """Stable Diffusion v1.4's architecture with random weights; a character-level CLIP tokenizer (speed only)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = char_tokenizer()
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


def sdxl_parts():
    """A tiny SDXL-shaped base with random weights: SDXL's U-Net layout (levels 32, 64, 128 wide, attention at the
    two coarser ones with stacks of 2 and 4 transformer blocks, linear projections, "text_time" added
    embeddings), two CLIP encoders (32 and 48 wide, the second with a 24-dim projection: caption states 80 wide),
    an autoencoder 64 px <-> 16 x 16 x 4, SDXL's noise schedule. Speed only."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = char_tokenizer(model_max_length=77)
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer), "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, **text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=24, **text))
    levels = {
        "block_out_channels": [32, 64, 128], "transformer_layers_per_block": [1, 2, 4],
        "attention_head_dim": [2, 4, 8],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    }  # fmt: skip
    added = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8}
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        cross_attention_dim=80,
        norm_num_groups=16,
        use_linear_projection=True,
        projection_class_embeddings_input_dim=24 + 6 * 8,
        **levels,
        **added,
    )
    vae = AutoencoderKL(**small_vae_config(64, 4, 16))
    sampler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return vae, text_encoder, tokenizer, unet, sampler, text_encoder_2


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
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per model, after one warm-up call (default: 3; --busy: 2)",
    )
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
    parser.add_argument("--rows", default=None, metavar="NAME,...", help="time only these rows (default: all)")
    parser.add_argument(
        "--busy", action="store_true",
        help="the shipped row quiet, beside a busy-loop process and two at once, each in a process of its own, "
        "under the toolkit's thread settings and under torch's own; adds a `busy` section to the results file",
    )  # fmt: skip
    parser.add_argument(
        "--sdxl", action="store_true",
        help="a tiny SDXL-shaped base: plain, shipped recipe, shipped with --first-blocks 1, GLIGEN-style; adds an "
        "`sdxl` section to the results file",
    )  # fmt: skip
    parser.add_argument("--wait-for", default=None, help=argparse.SUPPRESS)  # --busy's children: start together
    args = parser.parse_args(argv)
    if args.busy:
        return busy_run(args)
    args.repeats = args.repeats or 3

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    gpu = device.type == "cuda"
    steps = args.steps or (50 if gpu else 25)
    images = args.images or (4 if gpu else 8)
    dtype = torch.float16 if gpu else torch.float32
    if args.sdxl:
        vae, text_encoder, tokenizer, unet, sampler, text_encoder_2 = sdxl_parts()
        pipe = SpatialLockPipeline(vae, text_encoder, tokenizer, unet, sampler, None, 77, text_encoder_2, tokenizer)
    else:
        vae, text_encoder, tokenizer, unet, sampler, caption_tokens = sd_parts() if gpu else small_base_parts()
        pipe = SpatialLockPipeline(vae, text_encoder, tokenizer, unet, sampler, None, caption_tokens)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    shipped = adapter_like(args.shipped, unet, phrase_dim(text_encoder), 16)
    adapters = {
        "base": None,
        "spatiallock": SpatialLockAdapter.from_unet(unet, "spatiallock", None, phrase_dim(text_encoder), 16),
        "shipped": shipped,
        "gligen": SpatialLockAdapter.from_unet(unet, "gligen", None, phrase_dim(text_encoder), 16),
        # the configuration shipped before: box attention and the full block in every down and up transformer block
        "spatiallock-box-all": SpatialLockAdapter.from_unet(
            unet, "spatiallock", "all", phrase_dim(text_encoder), 16, box_attention=True
        ),
    }
    if args.sdxl:  # the rows of an SDXL-shaped base
        first = SpatialLockAdapter.like({**shipped.config, "first_blocks": 1}, unet, phrase_dim(text_encoder), 16)
        adapters = {"base": None, "shipped": shipped, "shipped-first-blocks-1": first, "gligen": adapters["gligen"]}
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
    if args.rows:
        wanted = args.rows.split(",")
        unknown = [name for name in wanted if name not in runs]
        if unknown:
            parser.error(f"--rows: unknown row {unknown[0]!r}; rows: {', '.join(runs)}")
        runs = {name: runs[name] for name in wanted}
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
            if repeat == 0 and args.wait_for and name == list(runs)[-1]:
                wait_for(args.wait_for, Path(args.out))
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
        "architecture": "tiny SDXL-shaped base" if args.sdxl else "sd-v1.4" if gpu else "spatiallock small base",
        "resolution": size,
        "steps": steps,
        "images_per_call": images,
        "dtype": str(dtype).replace("torch.", ""),
        "guidance_scale": 5.0,
        "shipped": args.shipped,
        "shipped_recipe": {k: adapters["shipped"].config[k] for k in ("variant", "positions", *RECIPE[1:])},
        "rows": rows,
        "threads": thread_settings(),
    }
    out = Path(args.out) if args.out else RESULTS / f"sample_speed_{device.type}.json"
    if args.sdxl:  # a section of its own; the file's other rows kept
        result["unet_config"] = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        result = {**(json.loads(out.read_text()) if out.exists() else {}), "sdxl": result}
    elif out.exists() and not args.wait_for and not args.rows:
        kept_busy = json.loads(out.read_text()).get("busy")
        if kept_busy:
            result["busy"] = kept_busy
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def wait_for(go: str, out: Path) -> None:
    """A --busy child after its warm-up: says it is ready, then waits for the parent's start signal."""
    Path(f"{out}.ready").write_text(json.dumps(thread_settings()))
    deadline = time.monotonic() + 1800
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise SystemExit("sample_speed: no start signal from the --busy run in 30 minutes")
        time.sleep(0.01)


def thread_settings() -> dict:
    names = ("SPATIALLOCK_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    return {"torch_threads": torch.get_num_threads(), **{n: os.environ[n] for n in names if n in os.environ}}


BUSY_LOOP = "while True: pass"
# extra environment of each child; `one-thread` is timed quiet only: the best there is with one core free
SETTINGS = {"toolkit": {}, "torch": {"SPATIALLOCK_THREADS": "torch"}, "one-thread": {"SPATIALLOCK_THREADS": "1"}}
BESIDE = ("toolkit", "torch")  # the settings timed beside a neighbour
# busy: the loop is this benchmark's child; busy-session: in a session of its own, as a loop started in another
# terminal is (Linux then shares the CPUs between sessions first, and between threads within a session)
CONDITIONS = ("quiet", "busy", "busy-session", "two")


QUIET_ROUNDS = 3  # quiet runs of each setting, alternating: the run-to-run spread is about 10 % here


def time_children(args, work: Path, setting: str, condition: str, tag: str) -> dict:
    """One measurement: fresh processes (two for `two`) timing the shipped row together after their warm-up,
    with the busy loop started beside them for `busy*`."""
    go = work / f"{tag}.go"
    outs = [work / f"{tag}-{i}.json" for i in range(2 if condition == "two" else 1)]
    env = {**os.environ, **SETTINGS[setting]}
    command = [sys.executable, str(Path(__file__).resolve()), "--cpu", "--rows", "shipped", "--steps",
               str(args.steps), "--images", str(args.images), "--repeats", str(args.repeats), "--shipped",
               args.shipped, "--wait-for", str(go)]  # fmt: skip
    neighbour, logs = None, []
    try:
        logs = [open(f"{out}.log", "w") for out in outs]  # noqa: SIM115 (closed below)
        children = [
            subprocess.Popen([*command, "--out", str(out)], env=env, stdout=log, stderr=log)
            for out, log in zip(outs, logs)
        ]
        while not all(Path(f"{out}.ready").exists() for out in outs):
            if any(child.poll() not in (None, 0) for child in children):
                raise SystemExit(f"sample_speed: a {setting}/{condition} process failed")
            time.sleep(0.05)
        if condition.startswith("busy"):  # after the warm-up, before the timed calls
            own_session = condition == "busy-session"
            neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], start_new_session=own_session)
            time.sleep(0.5)
        go.touch()
        if any(child.wait() != 0 for child in children):
            raise SystemExit(f"sample_speed: a {setting}/{condition} process failed")
    except SystemExit:
        for out in outs:
            print(Path(f"{out}.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for log in logs:
            log.close()
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    results = [json.loads(out.read_text()) for out in outs]
    times = [result["rows"][0]["s_per_image"] for result in results]
    print(f"  {setting:8s} {condition:12s} {' '.join(f'{t:.3f}' for t in times)} s/image", flush=True)
    return {
        "times": times,
        "threads_at_start": json.loads(Path(f"{outs[0]}.ready").read_text()),
        "threads_at_end": results[0]["threads"],
    }


def busy_run(args) -> None:
    """Each (settings, condition) in fresh processes timing the shipped row: quiet (QUIET_ROUNDS times, the
    settings alternating), beside a busy loop, beside it in its own session, two processes at once."""
    if args.cpu is False and torch.cuda.is_available():
        raise SystemExit("sample_speed: --busy measures CPU sampling; add --cpu on a machine with a GPU")
    args.steps, args.images, args.repeats = args.steps or 25, args.images or 8, args.repeats or 2
    work = Path(tempfile.mkdtemp(prefix="sample-speed-busy-"))
    runs = [(setting, "quiet", n) for n in range(QUIET_ROUNDS) for setting in SETTINGS]
    runs += [(setting, condition, 0) for setting in BESIDE for condition in CONDITIONS[1:]]
    found: dict[tuple[str, str], list[dict]] = {}
    for setting, condition, n in runs:
        found.setdefault((setting, condition), []).append(
            time_children(args, work, setting, condition, f"{setting}-{condition}-{n}")
        )
    measured: dict[str, dict] = {setting: {} for setting in SETTINGS}
    for (setting, condition), records in found.items():
        if condition == "two":
            each = records[0]["times"]  # both processes of one run: their mean
            value = statistics.mean(each)
        else:
            each = [record["times"][0] for record in records]  # the runs: their median
            value = statistics.median(each)
        measured[setting][condition] = {
            "s_per_image": round(value, 4),
            "s_per_image_each": each,
            "threads_at_start": records[-1]["threads_at_start"],
            "threads_at_end": records[-1]["threads_at_end"],
        }
    for rows in measured.values():
        quiet = rows["quiet"]["s_per_image"]
        for row in rows.values():
            row["vs_quiet"] = round(row["s_per_image"] / quiet, 3)
    torch_quiet = measured["torch"]["quiet"]["s_per_image"]
    for row in measured["toolkit"].values():
        row["vs_torch_quiet"] = round(row["s_per_image"] / torch_quiet, 3)
    busy = {
        "command": "python benchmarks/sample_speed.py --busy",
        "device": device_name(torch.device("cpu")).rsplit(",", 1)[0],
        "cpus": os.cpu_count(),
        "steps": args.steps,
        "images_per_call": args.images,
        "repeats": args.repeats,
        "quiet_rounds": QUIET_ROUNDS,
        "neighbour": f"python -c '{BUSY_LOOP}', started after the warm-up; busy-session: in a session of its own",
        "settings": {
            "toolkit": "spatiallock.threads (SPATIALLOCK_THREADS unset)",
            "torch": "SPATIALLOCK_THREADS=torch",
            "one-thread": "SPATIALLOCK_THREADS=1, quiet only: the floor for one free core",
        },
        "rows": measured,
        "toolkit_quiet_vs_torch_quiet": round(measured["toolkit"]["quiet"]["s_per_image"] / torch_quiet, 3),
    }
    for setting, rows in measured.items():
        print(f"  {setting}: " + ", ".join(f"{c} {r['vs_quiet']:.2f}x quiet" for c, r in rows.items()))
    print(f"  toolkit quiet / torch quiet: {busy['toolkit_quiet_vs_torch_quiet']:.2f}")
    out = Path(args.out) if args.out else RESULTS / "sample_speed_cpu.json"
    result = json.loads(out.read_text()) if out.exists() else {"benchmark": "sample_speed"}
    result["busy"] = busy
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
