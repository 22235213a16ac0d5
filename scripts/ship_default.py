"""Write the shipped default models into the package (`spatiallock/assets/`), weights in fp16.

    python scripts/ship_default.py --base models/base --adapter models/spatiallock --detector models/detector
    python scripts/ship_default.py --base models/base --adapter models/spatiallock \
        --base-runs runs/ae-32x32x4 runs/base32 runs/base32-dec    # a base put together from several runs
    python scripts/ship_default.py --locator runs/locator-dpo        # only the location model
    python scripts/ship_default.py --judge runs/det-reward           # only the judge

Each part given is written: `default` (--base with its --adapter), `detector`, `judge`, `locator`; the others stay
as they are. `--model default`, `--detector default`, `--judge default` (and `train adapter --reward-detector
default`) and `locate`/`insert` without --model/--locator load them (in fp32).
Each part gets its provenance: the folders it came from and their training configs (for a locator trained in two
stages, both). The whole of `spatiallock/assets/` must stay under 40 MB: the script prints the sizes and refuses to
write more.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from spatiallock.base.folders import base_fingerprint
from spatiallock.checkpoint import refuse_fp16_overflow
from spatiallock.errors import SpatialLockError
from spatiallock.evaluation.detector import Detector
from spatiallock.location.locator import Locator
from spatiallock.pipelines.diffusion import SpatialLockPipeline

ASSETS = Path(__file__).resolve().parent.parent / "spatiallock" / "assets"
LIMIT_MB = 40.0
PARTS = ("default", "detector", "judge", "locator")


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def training_config(folder: str | Path) -> dict | None:
    log = Path(folder) / "train" / "config.json"
    return json.loads(log.read_text()) if log.is_file() else None


def training_commands(folder: str | Path) -> list[str] | None:
    """The command lines that started and resumed the run in `folder` (`train/commands.txt`), if it kept them."""
    log = Path(folder) / "train" / "commands.txt"
    return log.read_text().splitlines() if log.is_file() else None


ADAPTER_RECORDS = (
    "adapter", "adapter_training", "adapter_commands", "previous_adapter_training", "earlier_adapter_training"
)  # fmt: skip


def ship_model(args, staging: Path) -> None:
    """The base with its adapter. A new adapter on the shipped base itself (--base spatiallock/assets/default)
    keeps the base's record and the sampling defaults the shipped adapter was given (`adapter_config_added`), and
    moves the adapter it replaces into the record of earlier adapters."""
    shipped = Path(args.out) / "default"
    old_record = shipped / "provenance.json"
    same_base = Path(args.base).resolve() == shipped.resolve() and old_record.is_file()
    old = json.loads(old_record.read_text()) if same_base else {}
    pipe = SpatialLockPipeline.from_pretrained(args.base, adapter=args.adapter)
    added = {k: v for k, v in old.get("adapter_config_added", {}).items() if k in ("ground_unconditional",)}
    if added:
        pipe.adapter.register_to_config(**added)
    for name in ("unet", "vae", "adapter"):
        refuse_fp16_overflow(getattr(pipe, name), name)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(staging)
    provenance = {k: v for k, v in old.items() if k not in ADAPTER_RECORDS}
    detector = args.detector or old.get("detector")  # the detector its numbers were scored with
    provenance.update({"base": old.get("base", args.base), "adapter": args.adapter, "detector": detector})
    names = ("adapter", "detector") if same_base else ("base", "adapter", "detector")
    for name in names:
        config = training_config(getattr(args, name)) if getattr(args, name) else None
        if config is not None:
            provenance[f"{name}_training"] = config
        commands = training_commands(getattr(args, name)) if getattr(args, name) else None
        if commands is not None:
            provenance[f"{name}_commands"] = commands
    if args.base_runs and not same_base:  # a base assembled from several runs: each one's config and commands
        provenance["base_stages"] = [
            {"run": folder, "training": training_config(folder), "commands": training_commands(folder)}
            for folder in args.base_runs
        ]
    provenance["base_fingerprint"] = base_fingerprint(staging)  # of the fp16 weights shipped: rows made on it match
    if old.get("adapter_training"):
        provenance["previous_adapter_training"] = old["adapter_training"]
        earlier = old.get("earlier_adapter_training", [])
        provenance["earlier_adapter_training"] = earlier + [old[k] for k in ("previous_adapter_training",) if k in old]
    if args.benchmark:
        provenance["benchmark"] = args.benchmark
    (staging / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def ship_detector(args, staging: Path, folder: str | None = None) -> None:
    folder = folder or args.detector
    Detector.from_pretrained(folder).half().save_pretrained(staging)
    if (Path(folder) / "eval.json").is_file():
        shutil.copy(Path(folder) / "eval.json", staging / "eval.json")
    config = training_config(folder)
    if config is not None:
        (staging / "provenance.json").write_text(json.dumps({"detector": folder, "training": config}, indent=2) + "\n")


def ship_judge(args, staging: Path) -> None:
    ship_detector(args, staging, args.judge)


def ship_locator(args, staging: Path) -> None:
    Locator.from_pretrained(args.locator).half().save_pretrained(staging)
    provenance: dict = {"locator": args.locator}
    stages = []  # this locator's training, then the one it started from (--init-from), and so on
    folder: str | None = args.locator
    while folder is not None and len(stages) < 5:
        config = training_config(folder)
        if config is None:
            break
        stages.append(config)
        folder = config.get("init_from")
    if stages:
        provenance["training"] = stages[::-1]  # first stage first
    if (Path(args.locator) / "eval.json").is_file():
        provenance["eval"] = json.loads((Path(args.locator) / "eval.json").read_text())
        shutil.copy(Path(args.locator) / "eval.json", staging / "eval.json")
    if args.benchmark:
        provenance["benchmark"] = args.benchmark
    (staging / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="small base model folder (with --adapter)")
    parser.add_argument("--adapter", help="adapter folder trained on that base")
    parser.add_argument(
        "--base-runs", nargs="+", metavar="RUN", default=[],
        help="with --base: the training runs the base was put together from (e.g. its autoencoder, its U-Net, its "
        "decoder), in order; each run's config and command lines go into provenance.json as `base_stages`",
    )  # fmt: skip
    parser.add_argument("--detector", help="detector folder")
    parser.add_argument("--judge", help="detector folder for the judge (trained apart from --detector's)")
    parser.add_argument("--locator", help="location model folder (`spatiallock train locator`)")
    parser.add_argument(
        "--benchmark", help="with --locator or --adapter: where its measured numbers are (kept in provenance)"
    )
    parser.add_argument("--out", default=str(ASSETS), help=f"assets folder (default: {ASSETS})")
    args = parser.parse_args()
    if bool(args.base) != bool(args.adapter):
        parser.error("--base and --adapter go together")
    if args.base_runs and not args.base:
        parser.error("--base-runs: goes with --base")
    for run in args.base_runs:
        if training_config(run) is None and training_commands(run) is None:
            parser.error(f"--base-runs: {run} holds no training record (train/config.json or train/commands.txt)")
    writers = {
        "default": ship_model if args.base else None, "detector": ship_detector if args.detector else None,
        "judge": ship_judge if args.judge else None, "locator": ship_locator if args.locator else None,
    }  # fmt: skip
    writers = {name: write for name, write in writers.items() if write is not None}
    if not writers:
        parser.error("nothing to ship: give --base and --adapter, --detector, --judge or --locator")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ship-", dir=out))
    try:
        for name, write in writers.items():
            (staging / name).mkdir()
            try:
                write(args, staging / name)
            except SpatialLockError as err:
                raise SystemExit(f"ship_default: error: {err}") from None
        sizes = {
            name: folder_mb(staging / name if name in writers else out / name)
            for name in PARTS
            if name in writers or (out / name).is_dir()
        }
        total = sum(sizes.values())
        print(", ".join(f"{name}: {mb:.1f} MB" for name, mb in sizes.items()) + f"; total {total:.1f} MB")
        if total > LIMIT_MB:
            raise SystemExit(f"assets would take {total:.1f} MB, more than {LIMIT_MB} MB: not written")
        for name in writers:
            if (out / name).exists():
                shutil.rmtree(out / name)
            (staging / name).rename(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print("wrote " + " and ".join(str(out / name) for name in writers))


if __name__ == "__main__":
    main()
