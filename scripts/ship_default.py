"""Write the shipped default model and detector into the package (`spatiallock/assets/`), weights in fp16.

    python scripts/ship_default.py --base models/base --adapter models/spatiallock --detector models/detector

`--model default` and `--detector default` load them (in fp32). The whole of `spatiallock/assets/` must stay
under 30 MB: the script prints the sizes and refuses to write more.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from spatiallock.evaluation.detector import Detector
from spatiallock.pipelines.diffusion import SpatialLockPipeline

ASSETS = Path(__file__).resolve().parent.parent / "spatiallock" / "assets"
LIMIT_MB = 30.0


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="small base model folder")
    parser.add_argument("--adapter", required=True, help="adapter folder trained on that base")
    parser.add_argument("--detector", required=True, help="detector folder")
    parser.add_argument("--out", default=str(ASSETS), help=f"assets folder (default: {ASSETS})")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ship-", dir=out))
    try:
        pipe = SpatialLockPipeline.from_pretrained(args.base, adapter=args.adapter)
        pipe.to(dtype=torch.float16)
        pipe.save_pretrained(staging / "default")
        detector = Detector.from_pretrained(args.detector).half()
        detector.save_pretrained(staging / "detector")
        provenance = {"base": args.base, "adapter": args.adapter, "detector": args.detector}
        for name in ("adapter", "detector"):
            log = Path(getattr(args, name)) / "train" / "config.json"
            if log.is_file():
                provenance[f"{name}_training"] = json.loads(log.read_text())
        (staging / "default" / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if (Path(args.detector) / "eval.json").is_file():
            shutil.copy(Path(args.detector) / "eval.json", staging / "detector" / "eval.json")
        sizes = {name: folder_mb(staging / name) for name in ("default", "detector")}
        total = sum(sizes.values())
        print(", ".join(f"{name}: {mb:.1f} MB" for name, mb in sizes.items()) + f"; total {total:.1f} MB")
        if total > LIMIT_MB:
            raise SystemExit(f"assets would take {total:.1f} MB, more than {LIMIT_MB} MB: not written")
        for name in sizes:
            if (out / name).exists():
                shutil.rmtree(out / name)
            (staging / name).rename(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out / 'default'} and {out / 'detector'}")


if __name__ == "__main__":
    main()
