"""What builds a LAMA generator and its discriminator (`LamaConfig`), as its model folder's config.json records it."""

from __future__ import annotations

from dataclasses import dataclass, fields

BACKGROUND = "__image__"  # the whole-image object every layout starts with
CLASS_NAME = "LamaGenerator"
ARCHITECTURE = "authors-2021"  # the modules of ZejianLi/LAMA; folders without it hold an earlier, other build
TRUNCATION = 2.0  # the authors' test-time truncation of the object and image noise


@dataclass
class LamaConfig:
    """What builds a LAMA generator (and its discriminator), written to the model folder's config.json."""

    categories: list[str]
    image_size: int = 64
    max_objects: int = 8  # objects of a layout, the background not counted
    embed_dim: int = 64  # d_y, the class embedding
    z_dim: int = 64  # d_z, each object's noise
    image_z_dim: int = 128  # the image noise the generator starts from
    mask_size: int = 16  # side of each object's mask before it is put into its box
    channels: int = 16  # generator width: 8c at 4 px, then 8c, 4c, 2c, c
    # discriminator base width: c, 2c, 4c, 8c, 16c; half the generator's, so the widest layers of both players
    # match (8 x 16 = 16 x 8 = 128), as the authors' do (16 x 64 = 1024 each)
    d_channels: int = 8
    adaption: bool = True  # False: the control without LAMA (the raw mask, normalised)
    local_query: bool = True  # False: the paper's Table 5 ablation, matching on the pixel query only
    truncation: float | None = TRUNCATION  # sampling: object and image noise beyond it drawn again once
    lambda_image: float = 0.1
    lambda_object: float = 1.0
    architecture: str = ARCHITECTURE
    _class_name: str = CLASS_NAME

    def __post_init__(self):
        if not self.categories or not all(isinstance(c, str) and c for c in self.categories):
            raise ValueError("categories: a non-empty list of names")
        if BACKGROUND in self.categories:
            raise ValueError(f"categories: {BACKGROUND!r} is reserved for the background")
        if self.image_size < 16 or self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size: a power of two of at least 16, got {self.image_size}")
        if self.mask_size < 4 or self.mask_size & (self.mask_size - 1):
            raise ValueError(f"mask_size: a power of two of at least 4, got {self.mask_size}")
        if self.truncation is not None and not self.truncation > 0:
            raise ValueError(f"truncation: a positive number or null, got {self.truncation}")
        if self.architecture != ARCHITECTURE:
            raise ValueError(
                f"architecture: {self.architecture!r}; this version builds {ARCHITECTURE!r} LAMA models "
                "(the authors' modules): train the model again with `spatiallock train lama`"
            )
        for name in ("max_objects", "embed_dim", "z_dim", "image_z_dim", "channels", "d_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict) -> LamaConfig:
        if values.get("_class_name") != CLASS_NAME:
            raise ValueError(f"_class_name is {values.get('_class_name')!r}, not {CLASS_NAME!r}")
        if "architecture" not in values:
            raise ValueError(
                "architecture: none recorded, so this LAMA folder was written by an earlier build of LAMA whose "
                "modules differ from the authors'; train it again with `spatiallock train lama`"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def object_dim(self) -> int:
        """d = d_y + d_z + 2 (box width and height)."""
        return self.embed_dim + self.z_dim + 2

    @property
    def style_dim(self) -> int:
        """What ISLA-Norm reads of an object: [y, z]."""
        return self.embed_dim + self.z_dim
