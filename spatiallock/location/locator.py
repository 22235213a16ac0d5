"""Where should it go: a generative location model for new objects in an existing image.

`Locator` is an autoregressive transformer over a box's four quantised coordinates (x0, y0, x1, y1, each one of
`bins` tokens), conditioned on the background image (a small residual encoder, torchvision's `BasicBlock`, read
by cross-attention) and on the object's class (its label embedded by the project's text encoder, stored with
the model). It is trained on positive boxes first (`spatiallock train locator`), then refined with Direct
Preference Optimization on positive against negative boxes (`--dpo`, `dpo_loss`) against a frozen copy of
itself.

Coordinates are normalised to [0, 1]. A box's tokens are the bins its edges fall into: x0 and y0 the bin holding
the edge, x1 and y1 the bin holding the last covered point, so the tokens of any box satisfy x1 >= x0 and
y1 >= y0, and sampling keeps those (and an optional region) by masking the logits. Log-probabilities are those
of the masked distributions, the same ones sampling draws from.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from spatiallock.checkpoint import read_model_folder, write_model_folder
from spatiallock.data.cocofile import MAX_SIDE
from spatiallock.errors import SpatialLockError, first_line
from spatiallock.files import read_rgb

KIND = "spatiallock-locator"


class BoxTokenizer:
    """Normalised xyxy boxes <-> four tokens in [0, bins). `encode(decode(t)) == t` for any valid tokens, and
    `decode(encode(b))` is the smallest bin-aligned box containing `b`."""

    def __init__(self, bins: int):
        if bins < 2:
            raise ValueError(f"bins: at least 2, got {bins}")
        self.bins = bins

    def encode(self, boxes: torch.Tensor) -> torch.Tensor:
        boxes = torch.as_tensor(boxes, dtype=torch.float64).clamp(0.0, 1.0)
        low = torch.floor(boxes[..., :2] * self.bins + 1e-6)
        high = torch.ceil(boxes[..., 2:] * self.bins - 1e-6) - 1
        tokens = torch.cat([low, torch.maximum(high, low)], dim=-1)
        return tokens.clamp(0, self.bins - 1).long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = torch.as_tensor(tokens).long()
        return torch.cat([tokens[..., :2] / self.bins, (tokens[..., 2:] + 1) / self.bins], dim=-1).float()


@dataclass
class LocatorConfig:
    """The architecture. `labels`: the classes it places, in the order of its label table (their text-encoder
    embeddings are stored with the weights); `bins`: tokens per coordinate."""

    labels: list[str]
    label_dim: int = 384
    bins: int = 64
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    stem_stride: int = 2
    dim: int = 128
    layers: int = 3
    heads: int = 4
    dropout: float = 0.1
    kind: str = KIND

    @classmethod
    def from_dict(cls, values: dict) -> LocatorConfig:
        if values.get("kind") != KIND:
            raise ValueError(f"kind is {values.get('kind')!r}, not {KIND!r}")
        values = dict(values)
        values["channels"] = tuple(values.get("channels", cls.channels))
        return cls(**values)


def _norm(channels: int) -> nn.Module:
    return nn.GroupNorm(min(8, channels), channels)


class ImageEncoder(nn.Module):
    """A residual conv encoder (a strided stem, then torchvision `BasicBlock`s that halve the grid, group norm):
    (B, 3, S, S) in [-1, 1] -> (B, T, dim) tokens of its last grid (8x8 at 64 px), with learned position
    embeddings."""

    def __init__(self, config: LocatorConfig):
        super().__init__()
        c = config.channels
        stem = nn.Conv2d(3, c[0], 3, stride=config.stem_stride, padding=1, bias=False)
        layers: list[nn.Module] = [stem, _norm(c[0]), nn.ReLU(inplace=True)]
        for before, after in zip(c[:-1], c[1:]):
            down = nn.Sequential(nn.Conv2d(before, after, 1, stride=2, bias=False), _norm(after))
            layers.append(BasicBlock(before, after, stride=2, downsample=down, norm_layer=_norm))
        self.body = nn.Sequential(*layers)
        side = -(-config.image_size // config.stem_stride)  # each strided conv gives ceil(side / stride)
        for _ in c[1:]:
            side = -(-side // 2)
        self.project = nn.Linear(c[-1], config.dim)
        self.position = nn.Parameter(torch.randn(side * side, config.dim) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.body(images)
        tokens = self.project(grid.flatten(2).transpose(1, 2))
        return tokens + self.position[: tokens.shape[1]]


class Locator(nn.Module):
    """p(box | image, label) = prod over x0, y0, x1, y1 of p(token | image, label, earlier tokens)."""

    def __init__(self, config: LocatorConfig, label_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = BoxTokenizer(config.bins)
        table = torch.zeros(len(config.labels), config.label_dim)
        if label_embeddings is not None:
            table = torch.as_tensor(label_embeddings, dtype=torch.float32).reshape(len(config.labels), -1)
        self.register_buffer("label_embeddings", table)
        self.encoder = ImageEncoder(config)
        self.label = nn.Linear(config.label_dim, config.dim)
        self.tokens = nn.Embedding(4 * config.bins, config.dim)  # slot k's token t is row k * bins + t
        self.slots = nn.Parameter(torch.randn(4, config.dim) * 0.02)
        layer = nn.TransformerDecoderLayer(
            config.dim, config.heads, 4 * config.dim, config.dropout, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, config.layers)
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, 4 * config.bins)
        self.register_buffer("_causal", torch.triu(torch.full((4, 4), float("-inf")), diagonal=1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def label_index(self, labels: Sequence[str], what: str = "label") -> torch.Tensor:
        """Indices of `labels` in the label table; `SpatialLockError` naming the first it does not know."""
        known = {name: i for i, name in enumerate(self.config.labels)}
        for label in labels:
            if label not in known:
                raise SpatialLockError(
                    f"{what} {label!r}: not a class of this locator; it knows {', '.join(self.config.labels[:8])}"
                    f"{' ...' if len(known) > 8 else ''}"
                )
        return torch.tensor([known[label] for label in labels], dtype=torch.long, device=self.device)

    def logits(self, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n, bins) logits of the first n = tokens.shape[1] + 1 (at most 4) coordinates, given the first
        tokens.shape[1] of them (teacher forcing)."""
        memory = self.encoder(images)
        start = self.label(self.label_embeddings[labels]).unsqueeze(1)
        if tokens.shape[1] > 3:
            raise ValueError(f"tokens: at most 3 given coordinates, got {tokens.shape[1]}")
        offsets = torch.arange(tokens.shape[1], device=tokens.device) * self.config.bins
        inputs = torch.cat([start, self.tokens(tokens + offsets)], dim=1)
        length = inputs.shape[1]
        inputs = inputs + self.slots[:length]
        hidden = self.norm(self.decoder(inputs, memory, tgt_mask=self._causal[:length, :length], tgt_is_causal=True))
        out = self.head(hidden).view(hidden.shape[0], length, 4, self.config.bins)
        return out[:, torch.arange(length), torch.arange(length)]  # slot k's own bins

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, region: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`log_prob`: what training calls (through the accelerator's wrapper)."""
        return self.log_prob(images, labels, boxes, region)

    def _masks(self, tokens: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
        """(B, 4, bins) bool: the tokens allowed at each slot given the others (x1 >= x0, y1 >= y0, inside
        `region`, (B, 4) tokens of the region's box)."""
        batch, bins = tokens.shape[0], self.config.bins
        index = torch.arange(bins, device=tokens.device).expand(batch, bins)
        low = torch.zeros(batch, 4, dtype=torch.long, device=tokens.device)
        high = torch.full((batch, 4), bins - 1, dtype=torch.long, device=tokens.device)
        if region is not None:
            low[:, :2], high[:, :2] = region[:, :2], region[:, 2:]
            low[:, 2:], high[:, 2:] = region[:, :2], region[:, 2:]
        low[:, 2:] = torch.maximum(low[:, 2:], tokens[:, :2])
        return (index.unsqueeze(1) >= low.unsqueeze(2)) & (index.unsqueeze(1) <= high.unsqueeze(2))

    def log_prob(
        self, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, region: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) log-probability of each box (normalised xyxy, (B, 4)) under the masked distributions."""
        tokens = self.tokenizer.encode(boxes).to(self.device)
        logits = self.logits(images, labels, tokens[:, :3])
        logits = logits.masked_fill(~self._masks(tokens, region), float("-inf"))
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return picked.sum(dim=1)

    @torch.no_grad()
    def sample(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        region: Sequence[float] | None = None,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One box per row of `images`: (B, 4) normalised xyxy and their (B,) log-probabilities (at temperature
        1). `region`: normalised xyxy the boxes must lie in."""
        batch = images.shape[0]
        bins = self.config.bins
        tokens = torch.zeros(batch, 4, dtype=torch.long, device=self.device)
        area = None
        if region is not None:
            area = self.tokenizer.encode(torch.tensor(region, dtype=torch.float64)).to(self.device).expand(batch, 4)
        total = torch.zeros(batch, device=self.device)
        for slot in range(4):
            logits = self.logits(images, labels, tokens[:, :slot])[:, slot]
            allowed = self._masks(tokens, area)[:, slot]
            logits = logits.float().masked_fill(~allowed, float("-inf"))
            probabilities = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
            chosen = torch.multinomial(probabilities.cpu(), 1, generator=generator).squeeze(1).to(self.device)
            tokens[:, slot] = chosen.clamp(0, bins - 1)
            total += torch.log_softmax(logits, dim=-1).gather(1, chosen.unsqueeze(1)).squeeze(1)
        return self.tokenizer.decode(tokens), total

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` (weights and the label table) to `folder`."""
        write_model_folder(folder, self.state_dict(), asdict(self.config))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> Locator:
        """The locator saved in `folder`, in eval mode."""
        return read_model_folder(folder, "locator", lambda values: cls(LocatorConfig.from_dict(values))).to(device)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Direct Preference Optimization: mean of -log sigmoid(beta * margin), margin = how much more the policy
    than the reference prefers the chosen (positive) box to the rejected (negative) one, in log-probability.
    Measured from its value at the reference (log 2), so it is zero when the policy is the reference and falls
    below zero as the policy comes to prefer the positives; the gradient is DPO's."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return (F.softplus(-beta * margin) - math.log(2.0)).mean()


SHELVES_HINT = "write a shelves data set with `spatiallock data synth --scene shelves`"


def _describe(value: object) -> str:
    """A JSON value in a few words, for a message."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    text = json.dumps(value)  # as the file spells it
    kind = "string" if isinstance(value, str) else "value" if value is None or isinstance(value, bool) else "number"
    return f"the {kind} {text if len(text) <= 40 else text[:36] + '...'}"


@dataclass
class _Fields:
    """The checks of one JSON file's fields; every refusal is `SpatialLockError` "<file>: <field path>: <problem>"."""

    path: Path

    KINDS = {  # kind: (test, what is expected)
        "list": (lambda v: isinstance(v, list), "a list"),
        "string": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
        "id": (lambda v: type(v) is int, "an integer"),  # not a bool
        "size": (lambda v: type(v) is int and 0 < v <= MAX_SIDE, f"an integer from 1 to {MAX_SIDE}"),
    }

    def error(self, where: str, problem: str) -> SpatialLockError:
        return SpatialLockError(f"{self.path}: {where}: {problem}")

    def get(self, parent: dict, key: str, where: str, kind: str):
        """`parent[key]` when it is a value of `kind` (a key of `KINDS`)."""
        where, (fits, expected) = f"{where}.{key}" if where else key, self.KINDS[kind]
        if key not in parent:
            raise self.error(where, "missing")
        if not fits(parent[key]):
            raise self.error(where, f"{_describe(parent[key])}, expected {expected}")
        return parent[key]

    def items(self, parent: dict, key: str) -> list[tuple[str, dict]]:
        """The entries of the list `parent[key]`, each an object, with their field paths."""
        for i, value in enumerate(values := self.get(parent, key, "", "list")):
            if not isinstance(value, dict):
                raise self.error(f"{key}[{i}]", f"{_describe(value)}, expected an object")
        return [(f"{key}[{i}]", value) for i, value in enumerate(values)]

    def numbers(self, value: object, where: str, names: str) -> list:
        """`value`, a list of finite numbers, as many as `names` (comma-separated) says."""
        if not isinstance(value, list) or len(value) != names.count(",") + 1:
            raise self.error(where, f"{_describe(value)}, expected {names.count(',') + 1} numbers {names}")
        for k, number in enumerate(value):  # comparisons, not float(): an integer of 400 digits is no number here
            if not isinstance(number, (int, float)) or isinstance(number, bool) or not -1e300 < number < 1e300:
                raise self.error(f"{where}[{k}]", f"{_describe(number)}, expected a finite number")
        return value

    def box(self, value: object, where: str) -> None:
        """`value` is a normalised xyxy box: four numbers, 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1."""
        x0, y0, x1, y1 = self.numbers(value, where, "x0, y0, x1, y1")
        if not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
            raise self.error(where, f"{value}: expected 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1 (normalised xyxy)")

    def image(self, folder: Path, entry: dict, where: str) -> Path:
        """The file `entry["file_name"]` names inside `folder` (resolved), read once to know it is an image."""
        name, where = self.get(entry, "file_name", where, "string"), f"{where}.file_name"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise self.error(where, f"{name!r} leaves the data folder (a path relative to it without '..')")
        try:
            path = (folder / name).resolve()
            inside = path.is_relative_to(folder.resolve())
        except (OSError, RuntimeError, ValueError) as err:  # a loop of links, a NUL byte
            raise self.error(where, f"{name!r} cannot be resolved ({first_line(err)})") from None
        if not inside:
            raise self.error(where, f"{name!r} is a link that leaves the data folder (to {path})")
        if not path.is_file():
            raise self.error(where, f"{folder / name} {'is not a file' if path.exists() else 'not found'}")
        try:
            read_rgb(path)
        except (OSError, ValueError) as err:
            raise self.error(where, f"{folder / name} is not a readable image ({first_line(err)})") from None
        return path


INSTANCE_FIELDS = {
    "categories": {"id": "id", "name": "string"},
    "images": {"id": "id", "width": "size", "height": "size", "shelves": "list"},
    "annotations": {"image_id": "id", "category_id": "id", "bbox": "list"},
}


def read_instances(folder: str | os.PathLike, split: str) -> dict:
    """A shelves split's COCO instances file (`instances_<split>.json`), checked for what the locator's commands
    read (`INSTANCE_FIELDS`; boards of four numbers, boxes of four, categories that exist): `SpatialLockError`
    "<file>: <field path>: <problem>" at the first fault."""
    from spatiallock.data.cocofile import read_coco_json

    path = Path(folder) / f"instances_{split}.json"
    data, fields = read_coco_json(path, "instances"), _Fields(path)
    for key, needs in INSTANCE_FIELDS.items():
        for where, item in fields.items(data, key):
            for name, kind in needs.items():
                fields.get(item, name, where, kind)
            for k, shelf in enumerate(item["shelves"] if key == "images" else []):
                fields.numbers(shelf, f"{where}.shelves[{k}]", "x0, x1, y, thickness")
    known = {category["id"] for category in data["categories"]}
    for where, annotation in fields.items(data, "annotations"):
        fields.numbers(annotation["bbox"], f"{where}.bbox", "x, y, width, height")
        if annotation["category_id"] not in known:
            raise fields.error(f"{where}.category_id", f"{annotation['category_id']} is not the id of a category")
    return data


@dataclass
class Placements:
    """A shelves data set's placement examples (`placements_<split>.json`): per example the image with the
    object removed, its label, and positive and negative boxes (normalised xyxy); `paths`: their image files."""

    folder: Path
    entries: list[dict] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    @classmethod
    def read(
        cls, folder: str | os.PathLike, split: str, labels: Sequence[str] | None = None, known: str = "",
        instances: dict | None = None,
    ) -> Placements:  # fmt: skip
        """The examples with positive and negative boxes, every entry checked and every image read before any is
        used: `SpatialLockError` "<file>: <field path>: <problem>" at the first fault. `labels`: the classes a
        label must be one of (`known` says whose); `instances` (`read_instances`), to score on the split: each
        `image_id` and `removed` object must be in it, each label name a shape the shelves checker knows."""
        from spatiallock.data.shelves import shape_of
        from spatiallock.files import read_json

        folder = Path(folder)
        path = folder / f"placements_{split}.json"
        fields, kept = _Fields(path), cls(folder)
        if not path.is_file():
            raise SpatialLockError(f"data: {path} not found ({SHELVES_HINT})")
        data = read_json(path, "placements file", bad_json="not a JSON file")
        if not isinstance(data, dict):
            raise fields.error("top level", f"{_describe(data)}, expected an object with `placements`")
        objects = Counter(a["image_id"] for a in instances["annotations"]) if instances else Counter()
        for where, entry in fields.items(data, "placements"):
            label = fields.get(entry, "label", where, "string")
            if labels is not None and label not in labels:
                raise fields.error(f"{where}.label", f"{label!r} is not {known or 'a known class'}")
            for key in ("positives", "negatives"):
                for k, box in enumerate(fields.get(entry, key, where, "list")):
                    fields.box(box, f"{where}.{key}[{k}]")
            if instances is not None:
                try:
                    shape_of(label)
                except ValueError as err:
                    raise fields.error(f"{where}.label", first_line(err)) from None
                if (image_id := fields.get(entry, "image_id", where, "id")) not in objects:
                    raise fields.error(f"{where}.image_id", f"{image_id}: no image of instances_{split}.json has it")
                if not 0 <= (removed := fields.get(entry, "removed", where, "id")) < objects[image_id]:
                    raise fields.error(
                        f"{where}.removed", f"{removed}: image {image_id} has {objects[image_id]} objects"
                    )
            image = fields.image(folder, entry, where)
            if entry["positives"] and entry["negatives"]:
                kept.entries.append(entry)
                kept.paths.append(image)
        return kept


def load_background(path, image_size: int, name: str = "image") -> torch.Tensor:
    """An image file (or an RGB image already read) as (3, S, S) in [-1, 1] at the locator's size;
    `SpatialLockError` naming it when the file is missing or not an image."""
    from PIL import Image

    from spatiallock.files import read_image_option

    image = path if isinstance(path, Image.Image) else read_image_option(path, name)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def held_out(
    data: str | os.PathLike, split: str = "val", limit: int | None = None, labels: Sequence[str] | None = None,
    known: str = "",
) -> tuple[list[dict], list]:  # fmt: skip
    """A shelves split's placement entries (the first `limit`) and each one's checker scene, the object removed;
    both files and every image checked first (`read_instances`, `Placements.read` with `labels` and `known`)."""
    from spatiallock.data.shelves import scene_from_coco

    folder = Path(data)
    instances = read_instances(folder, split)
    entries = Placements.read(folder, split, labels, known, instances).entries[:limit]
    names = {c["id"]: c["name"] for c in instances["categories"]}
    images = {image["id"]: image for image in instances["images"]}
    per_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    scenes = [
        scene_from_coco(images[e["image_id"]], per_image[e["image_id"]], names).without(e["removed"]) for e in entries
    ]
    return entries, scenes
