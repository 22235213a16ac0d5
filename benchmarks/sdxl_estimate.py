"""What one training step of an adapter on SDXL costs at 1024 px: counted, not timed (no weights, no GPU needed).

SDXL base 1.0's U-Net (`spatiallock.base.configs.sdxl_architecture`) and the adapter are built on the `meta`
device in bf16; one training step (forward with grounding, the diffusion loss, backward into the adapter) runs
there under `torch.utils.flop_counter.FlopCounterMode`, and a saved-tensors hook adds up the bytes autograd keeps
for the backward pass (the activations). Memory per step = the frozen parts' weights (bf16) + the adapter's
weights, gradients and Adam moments (fp32, 16 bytes a parameter) + those activations (an upper estimate: a
tensor saved by two operations counts twice); time per step = the counted FLOPs over an assumed sustained bf16
throughput, given at two (`--tflops`, default 400 and 100: about 40% of an H100 SXM's dense peak, the compute-bound
floor, and 10%, nearer what a U-Net's normalisations and small batches allow). Both are estimates until a GPU run
measures them.

    python benchmarks/sdxl_estimate.py        # batch 1: the shipped recipe, with --first-blocks 1, GLIGEN-style
    python benchmarks/sdxl_estimate.py --batch 4 --tflops 300 --tflops 150

Writes benchmarks/results/sdxl_estimate.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from spatiallock.base.configs import build_unet, sdxl_architecture
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.models.injection import count_parameters, freeze
from spatiallock.sampling import adapter_like

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1e9
# the frozen parts besides the U-Net, in parameters (text encoders: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text
# towers; the autoencoder): their bf16 weights sit on the GPU unless caption states are cached beforehand
TEXT_ENCODER_PARAMS = 123_060_480 + 694_659_840
VAE_PARAMS = 83_653_863


def step_cost(adapter: SpatialLockAdapter, unet, batch: int, objects: int, size: int) -> dict:
    """FLOPs of one training step and the bytes autograd saves for its backward pass, on the meta device."""
    arch = sdxl_architecture()
    latent = size // 8
    with torch.device("meta"):
        sample = torch.randn(batch, 4, latent, latent, dtype=torch.bfloat16)
        states = torch.randn(batch, 77, arch["unet"]["cross_attention_dim"], dtype=torch.bfloat16)
        added = {
            "text_embeds": torch.randn(batch, arch["text_encoder_2"]["projection_dim"], dtype=torch.bfloat16),
            "time_ids": torch.randn(batch, 6, dtype=torch.bfloat16),
        }
        phrases = torch.randn(batch, objects, arch["text_encoder"]["hidden_size"], dtype=torch.bfloat16)
        boxes = torch.rand(batch, objects, 4, dtype=torch.bfloat16)
        masks = torch.ones(batch, objects, dtype=torch.bfloat16)
        steps = torch.randint(0, 1000, (batch,))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    adapter.attach(unet)
    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = adapter(unet, sample, steps, states, phrases, boxes, masks, added_cond_kwargs=added)
        output.sample.float().pow(2).mean().backward()
    SpatialLockAdapter.detach(unet)
    return {"flops": counter.get_total_flops(), "activation_bytes": sum(saved)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="images per step (default: 1)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default: 1024)")
    parser.add_argument("--objects", type=int, default=30, help="grounding slots per image (default: 30)")
    parser.add_argument(
        "--tflops", type=float, action="append", default=None,
        help="an assumed sustained bf16 TFLOP/s; repeatable (default: 400 and 100)",
    )  # fmt: skip
    parser.add_argument("--shipped", default="default", metavar="MODEL", help="the recipe counted (default: shipped)")
    parser.add_argument("--out", default=str(RESULTS / "sdxl_estimate.json"))
    args = parser.parse_args(argv)
    args.tflops = args.tflops or [400.0, 100.0]
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 (the step's precision) on the meta device
    unet = freeze(build_unet(sdxl_architecture()["unet"], device="meta"))
    phrase_dim = sdxl_architecture()["text_encoder"]["hidden_size"]
    unet_params = count_parameters(unet)
    frozen_bytes = 2 * (unet_params + TEXT_ENCODER_PARAMS + VAE_PARAMS)
    rows = []
    with torch.device("meta"):
        shipped = adapter_like(args.shipped, unet, phrase_dim, 80)
        recipes = {
            "shipped recipe": shipped,
            "shipped recipe, --first-blocks 1": SpatialLockAdapter.like(
                {**shipped.config, "first_blocks": 1}, unet, phrase_dim, 80
            ),
            "GLIGEN-style": SpatialLockAdapter.from_unet(unet, "gligen", None, phrase_dim, 80),
        }
    torch.set_default_dtype(torch.float32)
    for name, adapter in recipes.items():  # the step runs in bf16; the fp32 master copy is counted in memory
        params = count_parameters(adapter)
        cost = step_cost(adapter, unet, args.batch, args.objects, args.size)
        memory = frozen_bytes + 16 * params + cost["activation_bytes"]
        row = {
            "adapter": name,
            "trainable_params": params,
            "step_tflops": round(cost["flops"] / 1e12, 2),
            "activations_gb": round(cost["activation_bytes"] / GB, 2),
            "frozen_weights_gb": round(frozen_bytes / GB, 2),
            "adapter_training_state_gb": round(16 * params / GB, 2),
            "memory_gb": round(memory / GB, 1),
            "seconds_per_step": {f"{t:g} TFLOP/s": round(cost["flops"] / (t * 1e12), 3) for t in args.tflops},
        }
        rows.append(row)
        print(
            f"{name:34s} {params / 1e6:8.1f} M trainable  {row['step_tflops']:7.1f} TFLOP/step  "
            f"activations {row['activations_gb']:6.1f} GB  memory ~{row['memory_gb']:5.1f} GB  "
            + " or ".join(f"~{v:.2f} s/step at {k}" for k, v in row["seconds_per_step"].items())
        )
    result = {
        "benchmark": "sdxl_estimate",
        "what": "counted on the meta device (FlopCounterMode, saved-tensors hook), not timed: an estimate",
        "base": "SDXL base 1.0 (U-Net config carried in spatiallock/base/architectures/sdxl-base-1.0.json)",
        "unet_params": unet_params,
        "batch": args.batch,
        "size": args.size,
        "objects": args.objects,
        "precision": "bf16 activations and frozen weights; fp32 adapter weights, gradients and Adam moments",
        "assumed_tflops": args.tflops,
        "note": "no gradient checkpointing; --gradient-checkpointing trades recomputation for most activations",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
