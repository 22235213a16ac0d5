"""`spatiallock train base|adapter|detector|locator|lama`: the small base model, the SpatialLock adapters, the
shapes detector, the location model, the LAMA baseline."""

from __future__ import annotations

import argparse
import math

from spatiallock.errors import SpatialLockError

MAX_RESOLUTION = 2048  # image side in pixels; Stable Diffusion v1 trains at 512
MAX_SEED = 2**32 - 1

BASE_HELP = """\
Train the small text-to-image base of the synthetic domain on captions only: first a small autoencoder
(--vae-steps), then the U-Net (--max-steps) on its latents, conditioned on the frozen all-MiniLM-L6-v2.
Writes a diffusers-layout folder (unet/, vae/, scheduler/, tokenizer/, model_index.json) and keeps
checkpoints and a JSON-lines log of the losses in MODEL/train/. Ctrl-C writes a checkpoint and stops;
--resume continues from the newest one.

example:
  spatiallock data synth --out data/shapes --train 10000 --val 1000
  spatiallock train base --data data/shapes --out models/base
"""

ADAPTER_HELP = """\
Train an adapter on a frozen base: the small base's folder, or a Stable Diffusion v1.x folder or hub id
(then use --resolution 512, --mixed-precision bf16 and --gradient-checkpointing on a GPU). Only the adapter
is trained and saved (config.json + safetensors in ADAPTER/); checkpoints and the loss log go to
ADAPTER/train/. Ctrl-C writes a checkpoint and stops; --resume continues from the newest one.
Several GPUs or machines: `accelerate launch -m spatiallock.cli train adapter ...`.

variants:
  spatiallock  Grounding-Attention + PoG with Enh-Fusion (the method)
  poi          Grounding-Attention only
  poi-pog      Grounding-Attention + PoG without Enh-Fusion
  gligen       GLIGEN-style gated self-attention in every transformer block (the baseline)

lean blocks (under a third of GLIGEN's parameters on Stable Diffusion v1.4 in every down and up block; count
any recipe with `spatiallock params --base sd-v1-4 --config-from ADAPTER`):
  --feed-forward none   Grounding-Attention without the paper's gated feed-forward (finest: only at the
                        finest latent level, where the blocks are narrowest)
  --attention-width F   each block's attention F times as wide (heads kept)
  --init-from ADAPTER   start from a trained adapter's weights wherever they fit

examples:
  spatiallock train adapter --base models/base --data data/shapes --out models/spatiallock   # the paper's
  spatiallock train adapter --base models/base --data data/shapes --out models/spatiallock-lean \\
      --box-attention --positions all --feed-forward none --lr 5e-4 --gate-lr-scale 10 --max-steps 3000
  spatiallock train adapter --base models/base --data data/shapes --out runs/all --positions all
  spatiallock train adapter --base models/base --data data/shapes --out runs/fixed --loss-weights 0.5,0.5
"""

DECODER_HELP = """\
Sharpen a base's autoencoder: train its decoder alone on the images of DIR (L1 + MSE), the encoder frozen.
The latent space does not move, so the base's U-Net and every adapter trained on it still fit; only the pixels
their latents decode to change. The autoencoder bounds every layout score (real images sent through it and
back score what a perfect U-Net would: the `autoencoder` row of benchmarks/synthetic.py), so a better decoder
lifts every row at once. Writes a copy of the base folder with the new vae/ (an adapter/ in it is copied along);
checkpoints and the loss log go to OUT/train/. Ctrl-C writes a checkpoint and stops; --resume continues.

example:
  spatiallock train decoder --base spatiallock/assets/default --data data/shapes --out models/base-sharp
"""

DETECTOR_HELP = """\
Train a detector of a COCO-format layout domain (the synthetic shapes) from scratch on its real images:
a small torchvision detection model (--arch: FCOS, RetinaNet, Faster R-CNN or SSD) on a residual conv
backbone with a feature pyramid, no downloaded weights. The FCOS one scores the layout fidelity of generated
images (AP, AP50, AP75) and its pooled features give a Frechet distance. Writes DET/config.json +
DET/model.safetensors, then scores DET on the real images of --eval-split, prints AP, AP50, AP75 and writes
them to DET/eval.json.

Generated data: --extra-data DIR (repeatable) adds the images of a `generate-dataset` folder (or of another
data folder's --split) to the real ones; their category ids must name the same categories as --data's.
--max-train-samples N keeps only the first N real images; --extra-share P draws a share P of the training
samples from the extra data (default: in proportion to the image counts).
Checkpoints and the loss log go to DET/train/. Ctrl-C writes a checkpoint and stops; --resume continues
from the newest one (also after the last step: it then only writes and scores the model again).
The defaults (5000 steps of 16 images at 64 px) reach AP 0.85+ on the shapes' val images in about
half an hour on two CPU cores.

example:
  spatiallock data synth --out data/shapes --train 10000 --val 1000
  spatiallock train detector --data data/shapes --out models/detector
  spatiallock train detector --data data/shapes --out runs/det-gen --arch retinanet --max-train-samples 1000 \
      --extra-data gen/train-layouts
"""


LOCATOR_HELP = """\
Train the location model (where a new object of a class could go in an image) on a shelves data set
(`spatiallock data synth --scene shelves`): an autoregressive transformer over a box's four quantised
coordinates, reading the image with the object removed and the class embedded by the text encoder.

Stage 1 (no --dpo): the likelihood of the positive boxes. Stage 2 (--dpo --init-from STAGE1): Direct
Preference Optimization on a positive against a negative box of the same scene, against a frozen copy of
STAGE1. Writes LOC/config.json + LOC/model.safetensors, then samples --eval-samples boxes on each scene
of --eval-split and prints how often the most likely one, and all of them, keep the rules (the scene's
checker decides); written to LOC/eval.json. Checkpoints and the loss log go to LOC/train/; Ctrl-C writes a
checkpoint and stops; --resume continues.

example:
  spatiallock data synth --out data/shelves --train 5000 --val 300 --scene shelves --min-objects 2
  spatiallock train locator --data data/shelves --out runs/locator
  spatiallock train locator --data data/shelves --out runs/locator-dpo --dpo --init-from runs/locator
"""

LAMA_HELP = """\
Train the LAMA baseline (seed 003), a layout-to-image GAN: each object's mask is generated from its class,
size and noise and put into its box; the Locality-Aware Mask Adaption sharpens where masks overlap; a
mask-to-image generator (ISLA-Norm ResNet blocks) draws the image; an image and an object discriminator
train it. --no-adaption trains the control without the adaption (masks only normalised). Writes
LAMA/config.json + LAMA/model.safetensors (the generator), which `generate`, `evaluate` and
`generate-dataset` take as --model. Checkpoints (both players) and the loss log go to LAMA/train/;
Ctrl-C writes a checkpoint and stops; --resume continues. A loss that becomes NaN stops the run.

example:
  spatiallock train lama --data data/shapes --out runs/lama
  spatiallock train lama --data data/shapes --out runs/lama-no-adaption --no-adaption
  spatiallock generate --model runs/lama --layout examples/two_shapes.json --out outputs --save-masks
"""


def _positive_of(cast, what: str):
    """An argparse type: `cast(text)`, refused with "expected a {what}" unless it is finite and above 0."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}")
        return value

    return parse


_positive = _positive_of(float, "positive number")
_positive_int = _positive_of(int, "positive whole number")


def _share_of(zero_allowed: bool):
    """An argparse type: a number in (0, 1], or in [0, 1] when `zero_allowed`."""
    interval = "[0, 1]" if zero_allowed else "(0, 1]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        if not (0 <= value if zero_allowed else 0 < value) or not value <= 1:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    return parse


_share = _share_of(zero_allowed=False)
_grounding_share = _share_of(zero_allowed=True)


def _loss_weights(text: str) -> tuple[float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers such as 0.5,0.5, got {text!r}") from None
    if len(values) != 2 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected two non-negative numbers such as 0.5,0.5, got {text!r}")
    return values


def _add_loop_options(parser: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    parser.add_argument("--max-steps", type=int, default=steps, metavar="N", help=f"training steps (default: {steps})")
    parser.add_argument(
        "--batch-size", type=int, default=batch, metavar="B", help=f"batch size per process (default: {batch})"
    )
    parser.add_argument("--lr", type=float, default=lr, help=f"learning rate (default: {lr})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--checkpoint-every", type=int, default=500, metavar="K", help="steps between checkpoints")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept (default: 3)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader processes (default: 0)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_number(name: str, value: float, low: float, high: float, *, open_low=False, open_high=False) -> None:
    """`SpatialLockError` naming the option unless `value` is finite and within [low, high] (ends open as asked)."""
    inside = math.isfinite(value) and (value > low if open_low else value >= low)
    inside = inside and (value < high if open_high else value <= high)
    if not inside:
        where = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise SpatialLockError(f"{name}: must be a finite number in {where}, got {value}")


def _check_resolution(name: str, value: int | None, multiple: int = 8) -> None:
    if value is not None and (not 16 <= value <= MAX_RESOLUTION or value % multiple):
        raise SpatialLockError(f"{name}: must be a multiple of {multiple} from 16 to {MAX_RESOLUTION}, got {value}")


def _loop(args: argparse.Namespace, steps: int, batch: int, lr: float, warmup: int = 0, lr_option: str = "--lr"):
    from spatiallock.training.loop import LoopConfig

    for name, value in (
        ("--max-steps", steps),
        ("--batch-size", batch),
        ("--checkpoint-every", args.checkpoint_every),
    ):
        if value < 1:
            raise SpatialLockError(f"{name}: must be at least 1, got {value}")
    for name, value in (("--num-workers", args.num_workers), ("--warmup-steps", warmup)):
        if value < 0:
            raise SpatialLockError(f"{name}: must be 0 or more, got {value}")
    _check_number(lr_option, lr, 0.0, 1.0, open_low=True)
    if not 0 <= args.seed <= MAX_SEED:
        raise SpatialLockError(f"--seed: must be 0 to {MAX_SEED}, got {args.seed}")
    return LoopConfig(
        max_steps=steps, batch_size=batch, learning_rate=lr, warmup_steps=warmup, seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep, num_workers=args.num_workers,
        resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip


def _exit_code(result, message: str) -> int:
    """130 when Ctrl-C stopped the run (a checkpoint is written); else print `message` and give 0."""
    if result.interrupted:
        return 130
    print(message)
    return 0


def run_base(args: argparse.Namespace) -> int:
    from spatiallock.training.base import BaseTrainConfig, train_base

    _check_resolution("--resolution", args.resolution, multiple=16)
    _check_number("--ema-decay", args.ema_decay, 0.0, 1.0, open_high=True)
    config = BaseTrainConfig(
        data=args.data, out=args.out, resolution=args.resolution, init_from=args.init_from,
        mixed_precision=args.mixed_precision, snr_gamma=args.snr_gamma,
        vae=_loop(args, args.vae_steps, args.vae_batch_size, args.vae_lr, lr_option="--vae-lr"),
        unet=_loop(args, args.max_steps, args.batch_size, args.lr, warmup=100),
    )  # fmt: skip
    config.unet.ema_decay = args.ema_decay
    result = train_base(config)
    message = (
        f"base model written to {args.out} ({result.step} U-Net steps, last loss {result.last_losses.get('loss')})"
    )
    return _exit_code(result, message)


def run_adapter(args: argparse.Namespace) -> int:
    from spatiallock.training.adapter import AdapterTrainConfig, train_adapter

    _check_resolution("--resolution", args.resolution)
    config = AdapterTrainConfig(
        base=args.base, data=args.data, out=args.out, variant=args.variant, positions=args.positions,
        loss_weights=args.loss_weights, resolution=args.resolution, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, split=args.split, timestep_sampling=args.timestep_sampling,
        query_positions=args.query_positions, box_attention=args.box_attention, gate_lr_scale=args.gate_lr_scale,
        feed_forward=args.feed_forward, attention_width=args.attention_width, init_from=args.init_from,
        grounding_steps=args.grounding_steps, perception_timesteps=args.perception_timesteps,
        perception_input=args.perception_input,
        max_train_samples=args.max_train_samples,
        loop=_loop(args, args.max_steps, args.batch_size, args.lr, warmup=50),
    )  # fmt: skip
    result = train_adapter(config)
    message = f"adapter written to {args.out} ({result.step} steps, last losses {result.last_losses})"
    return _exit_code(result, message)


def run_decoder(args: argparse.Namespace) -> int:
    from spatiallock.training.decoder import DecoderTrainConfig, train_decoder

    _check_resolution("--resolution", args.resolution)
    config = DecoderTrainConfig(
        base=args.base, data=args.data, out=args.out, resolution=args.resolution, split=args.split,
        mixed_precision=args.mixed_precision, loop=_loop(args, args.max_steps, args.batch_size, args.lr, warmup=50),
    )  # fmt: skip
    result = train_decoder(config)
    message = (
        f"base with the new decoder written to {args.out} ({result.step} steps, last losses {result.last_losses})"
    )
    return _exit_code(result, message)


def run_detector(args: argparse.Namespace) -> int:
    from spatiallock.training.detector import DetectorTrainConfig, evaluate_and_record, train_detector

    _check_number("--image-size", args.image_size, 32, MAX_RESOLUTION)
    _check_number("--weight-decay", args.weight_decay, 0.0, 1.0)
    _check_number("--ema-decay", args.ema_decay, 0.0, 1.0, open_high=True)
    loop = _loop(args, args.max_steps, args.batch_size, args.lr, warmup=args.warmup_steps)
    loop.weight_decay, loop.ema_decay = args.weight_decay, args.ema_decay
    if args.extra_share is not None:
        if not args.extra_data:
            raise SpatialLockError("--extra-share: needs --extra-data")
        _check_number("--extra-share", args.extra_share, 0.0, 1.0, open_low=True, open_high=True)
    config = DetectorTrainConfig(
        data=args.data, out=args.out, split=args.split, arch=args.arch, max_train_samples=args.max_train_samples,
        extra_data=tuple(args.extra_data), extra_share=args.extra_share, image_size=args.image_size,
        flip_prob=args.flip_prob, loop=loop,
    )  # fmt: skip
    result = train_detector(config)
    if _exit_code(result, f"detector written to {args.out} ({result.step} steps, last losses {result.last_losses})"):
        return 130
    metrics = evaluate_and_record(
        args.out, args.data, args.eval_split, steps=result.step, arch=args.arch,
        max_train_samples=args.max_train_samples, extra_data=list(args.extra_data), extra_share=args.extra_share,
    )  # fmt: skip
    if metrics is None:
        print(f"no {args.eval_split} split in {args.data}: not scored")
    else:
        scores = ", ".join(f"{k.upper()} {v:.4f}" for k, v in metrics.items())
        print(f"{args.eval_split} (real images): {scores}; written to {args.out}/eval.json")
    return 0


def run_locator(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from spatiallock.data.cocofile import write_text_atomic
    from spatiallock.location.locator import Locator, plausibility
    from spatiallock.training.locator import LocatorTrainConfig, train_locator

    _check_number("--beta", args.beta, 0.0, 1e3, open_low=True)
    _check_number("--sft-weight", args.sft_weight, 0.0, 1e3)
    if not 2 <= args.bins <= 1024:
        raise SpatialLockError(f"--bins: must be 2 to 1024, got {args.bins}")
    if args.eval_samples < 1:
        raise SpatialLockError(f"--eval-samples: must be at least 1, got {args.eval_samples}")
    if args.init_from and not Path(args.init_from).is_dir():
        raise SpatialLockError(f"--init-from: {args.init_from} is not a locator folder")
    loop = _loop(args, args.max_steps, args.batch_size, args.lr, warmup=100)
    loop.weight_decay = 0.01
    config = LocatorTrainConfig(
        data=args.data, out=args.out, split=args.split, dpo=args.dpo, init_from=args.init_from, beta=args.beta,
        sft_weight=args.sft_weight, bins=args.bins, loop=loop,
    )  # fmt: skip
    result = train_locator(config)
    if _exit_code(result, f"locator written to {args.out} ({result.step} steps, last losses {result.last_losses})"):
        return 130
    if not (Path(args.data) / f"placements_{args.eval_split}.json").is_file():
        print(f"no {args.eval_split} placements in {args.data}: not scored")
        return 0
    scores = plausibility(Locator.from_pretrained(args.out), args.data, args.eval_split, args.eval_samples)
    record = {**scores, "samples": args.eval_samples, "split": args.eval_split, "steps": result.step, "dpo": args.dpo}
    write_text_atomic(Path(args.out) / "eval.json", json.dumps(record, indent=2) + "\n")
    print(
        f"{args.eval_split}: top box plausible on {scores['top1_plausible']:.1%} of {scores['scenes']} scenes, "
        f"{scores['plausible_rate']:.1%} of {args.eval_samples} samples each; written to {args.out}/eval.json"
    )
    return 0


def run_lama(args: argparse.Namespace) -> int:
    from spatiallock.training.lama import LamaTrainConfig, train_lama

    _check_number("--flip-prob", args.flip_prob, 0.0, 1.0)
    _check_number("--d-lr-scale", args.d_lr_scale, 0.0, 1e3, open_low=True)
    _check_number("--alpha-lr-scale", args.alpha_lr_scale, 0.0, 1e4, open_low=True)
    if args.no_adaption and args.alpha_lr_scale != 1.0:
        raise SpatialLockError("--alpha-lr-scale: there is no adaption strength with --no-adaption")
    for name, value in (("--max-objects", args.max_objects), ("--channels", args.channels)):
        if not 1 <= value <= 256:
            raise SpatialLockError(f"{name}: must be 1 to 256, got {value}")
    if args.resolution not in (32, 64, 128, 256):
        raise SpatialLockError(f"--resolution: one of 32, 64, 128, 256, got {args.resolution}")
    loop = _loop(args, args.max_steps, args.batch_size, args.lr)
    loop.betas, loop.max_grad_norm, loop.model_lr_scales = (0.0, 0.999), 0.0, (("discriminator", args.d_lr_scale),)
    config = LamaTrainConfig(
        data=args.data, out=args.out, split=args.split, flip_prob=args.flip_prob, adaption=not args.no_adaption,
        resolution=args.resolution, max_objects=args.max_objects, channels=args.channels, d_channels=args.channels,
        alpha_lr_scale=args.alpha_lr_scale, loop=loop,
    )  # fmt: skip
    result = train_lama(config)
    message = f"LAMA model written to {args.out} ({result.step} steps, last losses {result.last_losses})"
    return _exit_code(result, message)


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="train the small base model, its decoder, an adapter, the shapes detector, the locator or LAMA",
    )
    sub = train.add_subparsers(dest="train_command", metavar="<what>", required=True)
    formatter = argparse.RawDescriptionHelpFormatter

    base = sub.add_parser("base", help="train the small base model", description=BASE_HELP, formatter_class=formatter)
    base.add_argument("--data", required=True, metavar="DIR", help="COCO-format layout folder (train split)")
    base.add_argument("--out", required=True, metavar="MODEL", help="model folder to write")
    base.add_argument("--resolution", type=int, default=64, help="image side in pixels (default: 64)")
    base.add_argument("--vae-steps", type=int, default=1500, metavar="N", help="autoencoder steps (default: 1500)")
    base.add_argument("--vae-batch-size", type=int, default=16, metavar="B", help="autoencoder batch (default: 16)")
    base.add_argument("--vae-lr", type=float, default=1e-3, help="autoencoder learning rate (default: 1e-3)")
    base.add_argument(
        "--ema-decay", type=float, default=0.999, metavar="D",
        help="save the U-Net as a moving average of its weights with this decay; 0: off (default: 0.999)",
    )  # fmt: skip
    base.add_argument(
        "--init-from", default=None, metavar="MODEL",
        help="start from an existing base folder (the shipped one: spatiallock/assets/default): keep its autoencoder "
        "and train its U-Net further",
    )  # fmt: skip
    base.add_argument(
        "--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
        help="autocast; bf16 is about 1.3x faster on CPUs with AMX or AVX-512 BF16 (default: no)",
    )  # fmt: skip
    base.add_argument(
        "--snr-gamma", type=_positive, default=None, metavar="G",
        help="Min-SNR-gamma loss weighting (5 is the usual value): faster convergence (default: plain MSE)",
    )  # fmt: skip
    _add_loop_options(base, steps=5000, batch=32, lr=3e-4)
    base.set_defaults(func=run_base)

    adapter = sub.add_parser(
        "adapter", help="train a SpatialLock or GLIGEN-style adapter", description=ADAPTER_HELP,
        formatter_class=formatter,
    )  # fmt: skip
    adapter.add_argument("--base", required=True, metavar="MODEL", help="base model folder or hub id")
    adapter.add_argument("--data", required=True, metavar="DIR", help="COCO-format layout folder")
    adapter.add_argument("--out", required=True, metavar="ADAPTER", help="adapter folder to write")
    adapter.add_argument(
        "--variant", default="spatiallock", choices=["spatiallock", "poi", "poi-pog", "gligen"], help="what to train"
    )
    adapter.add_argument(
        "--positions", default=None,
        help="attention placement: default, all, down, up, inner, or names such as down_blocks.2.attentions.1",
    )  # fmt: skip
    adapter.add_argument(
        "--loss-weights", type=_loss_weights, default=None, metavar="WD,WP",
        help="fixed diffusion,perception weights (default: learned uncertainty weights)",
    )  # fmt: skip
    adapter.add_argument("--resolution", type=int, default=None, help="image side (default: the base's native size)")
    adapter.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="default: no")
    adapter.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    adapter.add_argument("--split", default="train", help="split of the data folder (default: train)")
    adapter.add_argument(
        "--query-positions", action="store_true",
        help="add each visual token's cell position to its Grounding-Attention query (beyond the paper; for small "
        "bases whose features carry little absolute position)",
    )  # fmt: skip
    adapter.add_argument(
        "--box-attention", action="store_true",
        help="each visual token attends only to the objects whose boxes cover it, plus a learned term for where in "
        "the box it lies (beyond the paper: the attention is told where each object is instead of learning it, and "
        "can trace its outline; places objects in far fewer steps)",
    )  # fmt: skip
    adapter.add_argument(
        "--feed-forward", default="all", choices=["all", "finest", "none"],
        help="which Grounding-Attention blocks keep the paper's gated feed-forward: all (default, the paper's), "
        "finest (only those at the finest latent level, the narrowest) or none (lean blocks: on Stable Diffusion "
        "v1.4 the feed-forward holds 6 of every 7 parameters of a block; see `spatiallock params --config-from`)",
    )  # fmt: skip
    adapter.add_argument(
        "--attention-width", type=_share, default=1.0, metavar="F",
        help="inner width of each Grounding-Attention as a share of its block's width, heads kept and each head "
        "narrower (default: 1, the paper's; 0.5 halves it)",
    )  # fmt: skip
    adapter.add_argument(
        "--grounding-steps", type=_grounding_share, default=1.0, metavar="F",
        help="share of the sampling steps, from the first, the adapter grounds by default (saved in its config; "
        "sampling's --grounding-steps overrides it): 0.3 grounds the first 30%% of the steps, where the layout is "
        "settled, and samples the rest at the base's own speed, as GLIGEN does (default: 1, every step)",
    )  # fmt: skip
    adapter.add_argument(
        "--perception-timesteps", type=_positive_int, default=None, metavar="T",
        help="compute the PoG perception loss only on the images noised at a timestep below T (of the schedule's "
        "1000): the head cannot see objects in nearly pure noise, and there its gradient only competes with the "
        "diffusion loss (default: every timestep, the paper's)",
    )  # fmt: skip
    adapter.add_argument(
        "--perception-input", default="grounded", choices=["grounded", "rendered"],
        help="what the PoG head reads: `grounded` (the paper's: the grounded U-Net's down-block features of the "
        "noisy latents, which carry the requested boxes themselves) or `rendered` (the U-Net's down-block "
        "features, without grounding, of the clean latents the adapter's prediction implies: the loss then "
        "rewards objects drawn where asked, not only asked for; costs one down pass more per step; saved in the "
        "config, and candidate selection and perception guidance read the same) (default: grounded)",
    )  # fmt: skip
    adapter.add_argument(
        "--init-from", default=None, metavar="ADAPTER",
        help="start from the weights of another adapter (`default`, a model folder or an adapter folder) wherever "
        "name and shape match, the rest fresh: continue a trained adapter as a lean one (its feed-forward left "
        "behind) in far fewer steps than from scratch",
    )  # fmt: skip
    adapter.add_argument(
        "--timestep-sampling", default="uniform", choices=["uniform", "cubic"],
        help="training timesteps: uniform, or cubic (t = (1 - u^3) T: more of the noisy steps where layout matters)",
    )  # fmt: skip
    adapter.add_argument(
        "--gate-lr-scale", type=_positive, default=1.0, metavar="F",
        help="the zero-initialised gates learn at F times the learning rate (default: 1): they open sooner",
    )  # fmt: skip
    adapter.add_argument(
        "--max-train-samples", type=_positive_int, default=None, metavar="N",
        help="train on the first N images of the split only: an overfitting check (can the adapter place objects "
        "on layouts it sees again and again?) or a quick trial",
    )  # fmt: skip
    _add_loop_options(adapter, steps=2000, batch=16, lr=1e-4)
    adapter.set_defaults(func=run_adapter)

    decoder = sub.add_parser(
        "decoder", help="sharpen a base's autoencoder (its decoder alone; U-Net and adapters still fit)",
        description=DECODER_HELP, formatter_class=formatter,
    )  # fmt: skip
    decoder.add_argument("--base", required=True, metavar="MODEL", help="model folder whose decoder is trained")
    decoder.add_argument("--data", required=True, metavar="DIR", help="COCO-format layout folder (its images)")
    decoder.add_argument("--out", required=True, metavar="MODEL", help="model folder to write (a copy of the base)")
    decoder.add_argument("--resolution", type=int, default=64, help="image side in pixels (default: 64)")
    decoder.add_argument("--split", default="train", help="split of the data folder (default: train)")
    decoder.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="default: no")
    _add_loop_options(decoder, steps=3000, batch=16, lr=3e-4)
    decoder.set_defaults(func=run_decoder)

    detector = sub.add_parser(
        "detector", help="train the detector of the synthetic domain (layout fidelity, Frechet distance)",
        description=DETECTOR_HELP, formatter_class=formatter,
    )  # fmt: skip
    detector.add_argument("--data", required=True, metavar="DIR", help="COCO-format layout folder")
    detector.add_argument("--out", required=True, metavar="DET", help="detector folder to write")
    detector.add_argument("--split", default="train", help="split to train on (default: train)")
    detector.add_argument(
        "--arch", default="fcos", choices=["fcos", "retinanet", "fasterrcnn", "ssd"],
        help="torchvision detection model on the backbone's pyramid (default: fcos, the shipped detector's)",
    )  # fmt: skip
    detector.add_argument(
        "--max-train-samples", type=_positive_int, default=None, metavar="N",
        help="train on the first N images of --split only (default: all)",
    )  # fmt: skip
    detector.add_argument(
        "--extra-data", action="append", default=[], metavar="DIR",
        help="add the images of this folder (a generate-dataset folder, or a data folder's --split); repeatable",
    )  # fmt: skip
    detector.add_argument(
        "--extra-share", type=float, default=None, metavar="P",
        help="share of training samples drawn from --extra-data, in (0, 1) (default: by image counts)",
    )  # fmt: skip
    detector.add_argument("--eval-split", default="val", help="split to score the result on (default: val)")
    detector.add_argument(
        "--image-size", type=int, default=64, metavar="PX", help="image side for training and detection (default: 64)"
    )
    detector.add_argument("--flip-prob", type=float, default=0.5, help="horizontal flip probability (default: 0.5)")
    detector.add_argument("--warmup-steps", type=int, default=200, metavar="N", help="LR warm-up steps (default: 200)")
    detector.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    detector.add_argument(
        "--ema-decay", type=float, default=0.998, metavar="D",
        help="save a moving average of the weights with this decay; 0: off (default: 0.998)",
    )  # fmt: skip
    _add_loop_options(detector, steps=5000, batch=16, lr=1.5e-3)
    detector.set_defaults(func=run_detector)

    locator = sub.add_parser(
        "locator", help="train the location model (where a new object could go) on a shelves data set",
        description=LOCATOR_HELP, formatter_class=formatter,
    )  # fmt: skip
    locator.add_argument("--data", required=True, metavar="DIR", help="shelves data folder (placements_<split>.json)")
    locator.add_argument("--out", required=True, metavar="LOC", help="locator folder to write")
    locator.add_argument("--split", default="train", help="split to train on (default: train)")
    locator.add_argument("--dpo", action="store_true", help="stage 2: DPO on positive against negative boxes")
    locator.add_argument("--init-from", metavar="LOC", help="locator to start from (with --dpo: also the reference)")
    locator.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta (default: 0.1)")
    locator.add_argument(
        "--sft-weight", type=float, default=0.0, metavar="W",
        help="with --dpo: add W x the positives' negative log-likelihood to the loss (default: 0)",
    )  # fmt: skip
    locator.add_argument("--bins", type=int, default=64, help="tokens per coordinate (default: 64)")
    locator.add_argument("--eval-split", default="val", help="split to score the result on (default: val)")
    locator.add_argument("--eval-samples", type=int, default=10, metavar="N", help="boxes per scene (default: 10)")
    _add_loop_options(locator, steps=3000, batch=32, lr=3e-4)
    locator.set_defaults(func=run_locator)

    lama = sub.add_parser(
        "lama", help="train the LAMA baseline (layout -> masks -> image GAN)", description=LAMA_HELP,
        formatter_class=formatter,
    )  # fmt: skip
    lama.add_argument("--data", required=True, metavar="DIR", help="COCO-format layout folder")
    lama.add_argument("--out", required=True, metavar="LAMA", help="model folder to write")
    lama.add_argument("--split", default="train", help="split to train on (default: train)")
    lama.add_argument("--no-adaption", action="store_true", help="the control: no Locality-Aware Mask Adaption")
    lama.add_argument("--resolution", type=int, default=64, help="image side: 32, 64, 128 or 256 (default: 64)")
    lama.add_argument("--max-objects", type=int, default=8, help="objects per layout, largest first (default: 8)")
    lama.add_argument("--channels", type=int, default=16, help="width of both players (default: 16)")
    lama.add_argument("--flip-prob", type=float, default=0.5, help="horizontal flip probability (default: 0.5)")
    lama.add_argument(
        "--d-lr-scale", type=float, default=3.0, help="discriminator learning rate / --lr (default: 3, the paper's)"
    )
    lama.add_argument(
        "--alpha-lr-scale", type=float, default=1.0, metavar="F",
        help="the adaption strength alpha learns at F x --lr (default: 1; it starts at 0 and, at 1e-4, moves at "
        "most 0.1 in 1,000 steps)",
    )  # fmt: skip
    _add_loop_options(lama, steps=3000, batch=32, lr=1e-4)
    lama.set_defaults(func=run_lama)
