"""Training speed and peak memory of the SpatialLock adapter against the GLIGEN-style baseline, side by side.

Every variant trains through the adapter's real training path on the same frozen base and the same batch:
`SpatialLockAdapter.from_unet` + `attach`, `forward(..., labels=..., target=..., object_masks=...)` -> `.loss`
(diffusion loss plus, for SpatialLock, the PoG perception loss under learned weights), backward, gradient
clipping and an AdamW step on the adapter's parameters only. Random weights and inputs: speed does not depend
on them. Each variant runs in a fresh process of its own, so that one's memory high-water mark and allocator
state never count for the other.

Settings per device (each can be overridden):
  CPU: the project's small base U-Net (`spatiallock.base.folders.small_unet_config()`), 64 px -> 16x16 latents,
       batch 16, float32, caption states 32 x 384 (all-MiniLM-L6-v2 sized, with a token mask), 16 classes.
  GPU: the Stable Diffusion v1.4 U-Net (`spatiallock.base.configs.SD_V1_UNET`), 512 px -> 64x64 latents,
       batch 8, bf16 autocast with the base in bf16 (as `train adapter --mixed-precision bf16`),
       caption states 77 x 768 (CLIP ViT-L/14 sized), 80 classes.
Every sample has 1 to 6 objects in 30 object slots (what `train adapter` collates).

Reported per variant: trainable parameters; steps per second and seconds per step over the timed steps (after
warm-up steps), with the median and fastest step and the process's CPU seconds per step (all its threads), which
other jobs on a shared machine disturb less than wall time; and peak memory: on a GPU
`torch.cuda.max_memory_allocated` (weights, optimiser state, activations), on CPU the process's peak resident
memory (`ru_maxrss`) minus its resident memory before any model was built. Plus the ratio of each SpatialLock
row to GLIGEN. Rows: `spatiallock` (the paper's two Grounding-Attention blocks), `spatiallock-box-all` (box
attention in every down and up transformer block: the shipped default's configuration), `gligen`. On a CPU
shared with other jobs, prefer `--threads 1` and compare the fastest step.

    python benchmarks/train_speed.py                  # the device's default setting, 20 timed steps
    python benchmarks/train_speed.py --steps 10 --warmup 2

Prints a table and writes benchmarks/results/train_speed_<cpu|cuda>.json naming the device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (adapter variant, placement, extra options); `spatiallock-box-all` is the shipped default's configuration
ADAPTERS = {
    "spatiallock": ("spatiallock", None, {}),
    "spatiallock-box-all": ("spatiallock", "all", {"box_attention": True}),
    "gligen": ("gligen", None, {}),
}
VARIANTS = tuple(ADAPTERS)
MAX_OBJECTS_PER_IMAGE = 6

# architecture -> latent scale factor, text width, caption tokens, caption mask, classes, default resolution
ARCHITECTURES = {
    "small": {"factor": 4, "text_dim": 384, "tokens": 32, "caption_mask": True, "classes": 16, "resolution": 64},
    "sd-v1-4": {"factor": 8, "text_dim": 768, "tokens": 77, "caption_mask": False, "classes": 80, "resolution": 512},
}


def rss_bytes() -> int:
    """Current resident memory of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the kernel updates its high-water mark lazily: the resident memory now may stand above it
    return max(peak if sys.platform == "darwin" else peak * 1024, rss_bytes())


def device_name(device_type: str, threads: int = 0) -> str:
    import torch

    if device_type == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "CPU"
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, torch threads: {threads or torch.get_num_threads()}"


def make_batch(batch: int, latent: int, arch: dict, generator):
    """One training batch of random latents, caption states and layouts (1 to 6 objects in the 30 slots
    `train adapter` pads layouts to)."""
    import torch

    from spatiallock.layout import MAX_OBJECTS

    g = generator
    counts = torch.randint(1, MAX_OBJECTS_PER_IMAGE + 1, (batch,), generator=g)
    masks = (torch.arange(MAX_OBJECTS)[None] < counts[:, None]).float()
    xy = torch.rand(batch, MAX_OBJECTS, 2, generator=g) * 0.6
    wh = 0.1 + torch.rand(batch, MAX_OBJECTS, 2, generator=g) * 0.3
    boxes = torch.cat([xy, xy + wh], dim=-1) * masks[..., None]
    labels = torch.randint(0, arch["classes"], (batch, MAX_OBJECTS), generator=g).masked_fill(masks == 0, -1)
    lengths = torch.randint(8, arch["tokens"] + 1, (batch,), generator=g)
    caption_mask = (torch.arange(arch["tokens"])[None] < lengths[:, None]).long()
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, arch["tokens"], arch["text_dim"], generator=g),
        "phrase_embeds": torch.randn(batch, MAX_OBJECTS, arch["text_dim"], generator=g),
        "boxes": boxes,
        "masks": masks,
        "labels": labels,
        "encoder_attention_mask": caption_mask if arch["caption_mask"] else None,
        "target": torch.randn(batch, 4, latent, latent, generator=g),
    }


def run_variant(args: argparse.Namespace) -> dict:
    """Build the base and one adapter, train `args.warmup + args.steps` steps, measure; in a fresh process."""
    import torch

    baseline_rss = rss_bytes()
    from spatiallock.base.configs import SD_V1_UNET, build_unet
    from spatiallock.base.folders import small_unet_config
    from spatiallock.models.adapter import SpatialLockAdapter
    from spatiallock.models.injection import count_parameters, freeze

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = ARCHITECTURES[args.arch]
    latent = args.resolution // arch["factor"]
    bf16 = args.precision == "bf16"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    torch.manual_seed(0)
    config = small_unet_config(latent, arch["text_dim"]) if args.arch == "small" else {**SD_V1_UNET}
    config["sample_size"] = latent
    unet = freeze(build_unet(config)).to(device, torch.bfloat16 if bf16 else torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    variant, positions, options = ADAPTERS[args.worker]
    adapter = SpatialLockAdapter.from_unet(unet, variant, positions, arch["text_dim"], arch["classes"], **options)
    adapter = adapter.to(device)
    adapter.attach(unet).train()
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = make_batch(args.batch_size, latent, arch, torch.Generator().manual_seed(args.seed))
    batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
    for key in ("sample", "encoder_hidden_states", "phrase_embeds", "boxes", "target") if bf16 else ():
        batch[key] = batch[key].to(torch.bfloat16)  # as `train adapter` hands them over with a bf16 base

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            output = adapter(
                unet, batch["sample"], batch["timestep"], batch["encoder_hidden_states"], batch["phrase_embeds"],
                batch["boxes"], batch["masks"], labels=batch["labels"],
                encoder_attention_mask=batch["encoder_attention_mask"], target=batch["target"],
                object_masks=batch["masks"],
            )  # fmt: skip
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return output.loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    setup_rss = rss_bytes()
    setup_gpu = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for _ in range(args.warmup):
        step()
    sync()
    times, cpu_times, losses = [], [], []
    for _ in range(args.steps):
        tic, cpu_tic = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        times.append(time.perf_counter() - tic)
        cpu_times.append(time.process_time() - cpu_tic)
        losses.append(float(loss.detach()))
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"{args.worker}: the loss is not finite: {losses}")
    total = sum(times)
    row = {
        "variant": args.worker,
        "trainable_params": count_parameters(adapter),
        "steps_per_s": round(args.steps / total, 4),
        "s_per_step": round(total / args.steps, 4),
        "s_per_step_median": round(statistics.median(times), 4),
        "s_per_step_min": round(min(times), 4),
        "cpu_s_per_step": round(sum(cpu_times) / args.steps, 4),  # this process's CPU time, all its threads
        "step_times": [round(t, 4) for t in times],
        "attention_blocks": len(adapter.config.blocks),
        "last_loss": round(losses[-1], 4),
    }
    mb = 1024 * 1024
    if device.type == "cuda":
        row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / mb, 1)
        row["setup_memory_mb"] = round(setup_gpu / mb, 1)
        row["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / mb, 1)
    else:
        row["peak_memory_mb"] = round((peak_rss_bytes() - baseline_rss) / mb, 1)
        row["setup_memory_mb"] = round((setup_rss - baseline_rss) / mb, 1)
        row["process_peak_rss_mb"] = round(peak_rss_bytes() / mb, 1)
    return row


def run_in_subprocess(args: argparse.Namespace, variant: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant]
    for name in ("device", "arch", "resolution", "batch_size", "steps", "warmup", "precision", "threads", "seed"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    done = subprocess.run(command, capture_output=True, text=True)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"train_speed: the {variant} run failed (exit code {done.returncode})")
    return json.loads(results[-1].removeprefix("RESULT "))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train_speed.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default: 3)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None, help="base U-Net (default: by device)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: by arch)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 8 on a GPU")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 autocast on a GPU"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the base U-Net")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random batch (default: 0)")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, of: " + ", ".join(VARIANTS) + " (default: all)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON file (default: benchmarks/results/train_speed_<cpu|cuda>.json)"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args(argv)
    unknown = sorted({v.strip() for v in args.variants.split(",") if v.strip()} - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.arch = args.arch or ("sd-v1-4" if gpu else "small")
    args.resolution = args.resolution or ARCHITECTURES[args.arch]["resolution"]
    args.batch_size = args.batch_size or (8 if gpu else 16)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    if args.steps < 1 or args.warmup < 0 or args.resolution % (8 * ARCHITECTURES[args.arch]["factor"]):
        parser.error("--steps must be >= 1, --warmup >= 0, --resolution a multiple of 8 latent pixels")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0
    import torch

    from spatiallock.layout import MAX_OBJECTS

    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    arch = ARCHITECTURES[args.arch]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    load_at_start = [round(v, 2) for v in os.getloadavg()] if device_type == "cpu" else None
    rows = []
    for variant in variants:
        print(f"{variant}: {args.warmup} warm-up + {args.steps} timed steps ...", flush=True)
        rows.append(run_in_subprocess(args, variant))
    result = {
        "benchmark": "train_speed",
        "device": device_name(device_type, args.threads),
        "device_type": device_type,
        "torch": torch.__version__,
        "config": {
            "architecture": args.arch,
            "resolution": args.resolution,
            "latent_size": args.resolution // arch["factor"],
            "batch_size": args.batch_size,
            "precision": args.precision,
            "gradient_checkpointing": args.gradient_checkpointing,
            "caption_tokens": arch["tokens"],
            "text_dim": arch["text_dim"],
            "num_classes": arch["classes"],
            "objects_per_image": f"1-{MAX_OBJECTS_PER_IMAGE}",
            "object_slots": MAX_OBJECTS,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "optimizer": "AdamW lr 1e-4, grad-norm clip 1.0, adapter parameters only",
            "peak_memory": "torch.cuda.max_memory_allocated"
            if device_type == "cuda"
            else "peak RSS (ru_maxrss) minus RSS before building the models, one fresh process per variant",
        },
        "rows": rows,
    }
    if device_type == "cpu":  # 1, 5, 15-minute load: other jobs on the machine slow every variant down
        result["load_average"] = {"start": load_at_start, "end": [round(v, 2) for v in os.getloadavg()]}
    by_name = {row["variant"]: row for row in rows}
    keys = (
        "trainable_params", "steps_per_s", "s_per_step", "s_per_step_median", "s_per_step_min", "cpu_s_per_step",
        "peak_memory_mb",
    )  # fmt: skip
    if "gligen" in by_name:
        b = by_name["gligen"]
        result["ratios"] = [
            {"of": f"{name} / gligen", **{k: round(by_name[name][k] / b[k], 4) for k in keys if b[k]}}
            for name in by_name
            if name != "gligen"
        ]

    print(f"\nTraining speed on {result['device']} (torch {result['torch']})")
    print(
        f"{args.arch} U-Net, {args.resolution} px -> {result['config']['latent_size']}^2 latents, "
        f"batch {args.batch_size}, {args.precision}, {args.warmup} warm-up + {args.steps} timed steps"
    )
    columns = (  # (title, key, width, format of a row's value)
        ("trainable params", "trainable_params", 18, ","), ("steps/s", "steps_per_s", 9, ".3f"),
        ("s/step", "s_per_step", 9, ".3f"), ("median s", "s_per_step_median", 10, ".3f"),
        ("min s", "s_per_step_min", 9, ".3f"), ("CPU s", "cpu_s_per_step", 9, ".3f"),
        ("peak MB", "peak_memory_mb", 10, ".1f"),
    )  # fmt: skip
    header = f"  {'variant':<26}" + "".join(f"{title:>{width}}" for title, _, width, _ in columns)
    print(header + "\n  " + "-" * (len(header) - 2))
    for row in rows:
        print(f"  {row['variant']:<26}" + "".join(f"{row[key]:>{width}{form}}" for _, key, width, form in columns))
    for ratio in result.get("ratios", []):
        cells = "".join(f"{ratio.get(key, float('nan')):>{width}.3f}" for _, key, width, _ in columns)
        print(f"  {ratio['of'].replace(' ', ''):<26}" + cells)
    if device_type == "cpu":
        print(f"  load average (1, 5, 15 min): {load_at_start} at start, {result['load_average']['end']} at end")
    out = Path(args.out) if args.out else RESULTS / f"train_speed_{device_type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
