"""Captions for synthetic scenes: name every object with colour and shape, sometimes a coarse relation.

Captions never give coordinates; relations are the four words a horizontal or vertical look can settle
("left of", "right of", "above", "below"), said only when the two objects are unique in the scene and
clearly apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "gradient": ("a gradient background", "a softly graded background", "a shaded background"),
    "stripes": ("a striped background", "a background of faint stripes", "pale stripes"),
    "checker": ("a checkered background", "a faint checkerboard", "a checkered pattern"),
    "noise": ("a mottled background", "a noisy background", "a blotchy background"),
}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below",),
}
INTROS = ("a picture of", "an image of", "a drawing of", "a scene with", "a rendering of", "a simple image of")


@dataclass(frozen=True)
class CaptionObject:
    """What a caption may say about one object: its colour, shape and box (x0, y0, x1, y1) in pixels."""

    colour: str
    shape: str
    box: tuple[float, float, float, float]


def count_phrase(count: int, colour: str, shape: str) -> str:
    """ "a red circle", "two yellow triangles"."""
    number = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
    return f"{number} {colour} {shape}{'s' if count > 1 else ''}"


def join_words(items: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relation(a: CaptionObject, b: CaptionObject, size: int) -> str | None:
    """Where `a` lies relative to `b` ("left", "right", "above", "below"), or None when too close to say."""
    dx = (a.box[0] + a.box[2] - b.box[0] - b.box[2]) / 2.0
    dy = (a.box[1] + a.box[3] - b.box[1] - b.box[3]) / 2.0
    if max(abs(dx), abs(dy)) < 0.15 * size or abs(abs(dx) - abs(dy)) < 0.05 * size:
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


class _Scene:
    """Counts and phrases of one scene, shared by the caption templates."""

    def __init__(self, objects: Sequence[CaptionObject], background: str, size: int, rng: np.random.Generator):
        self.objects, self.background, self.size, self.rng = objects, background, size, rng
        self.counts: dict[tuple[str, str], int] = {}
        for obj in objects:
            self.counts[(obj.colour, obj.shape)] = self.counts.get((obj.colour, obj.shape), 0) + 1

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def listing(self, exclude: Sequence[tuple[str, str]] = ()) -> str:
        groups = [count_phrase(n, *key) for key, n in self.counts.items() if key not in exclude]
        order = self.rng.permutation(len(groups))
        return join_words([groups[i] for i in order]) if groups else ""

    def background_words(self) -> str:
        return self.pick(BACKGROUND_WORDS[self.background])

    def related_pair(self) -> tuple[CaptionObject, CaptionObject, str] | None:
        unique = [o for o in self.objects if self.counts[(o.colour, o.shape)] == 1]
        pairs = [(a, b) for a in unique for b in unique if a is not b]
        for i in self.rng.permutation(len(pairs)):
            a, b = pairs[i]
            where = relation(a, b, self.size)
            if where is not None:
                return a, b, where
        return None


def _plain(s: _Scene) -> str | None:
    return s.listing()


def _on_background(s: _Scene) -> str | None:
    return f"{s.listing()} on {s.background_words()}"


def _intro(s: _Scene) -> str | None:
    tail = f" on {s.background_words()}" if s.rng.random() < 0.5 else ""
    return f"{s.pick(INTROS)} {s.listing()}{tail}"


def _counted(s: _Scene) -> str | None:
    n = len(s.objects)
    if n == 1:
        return f"a single {s.listing().removeprefix('a ')} against {s.background_words()}"
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} shapes: {s.listing()}"


def _related(s: _Scene) -> str | None:
    found = s.related_pair()
    if found is None:
        return None
    a, b, where = found
    text = f"{count_phrase(1, a.colour, a.shape)} {s.pick(RELATION_WORDS[where])} {count_phrase(1, b.colour, b.shape)}"
    rest = s.listing(exclude=[(a.colour, a.shape), (b.colour, b.shape)])
    if rest:
        text += f"{s.pick((', with ', ' and ', ', plus '))}{rest}"
    return text if s.rng.random() < 0.5 else f"{text} on {s.background_words()}"


def _related_reversed(s: _Scene) -> str | None:
    found = s.related_pair()
    if found is None:
        return None
    a, b, where = found
    side = {"left": "to its left", "right": "to its right", "above": "above it", "below": "below it"}[where]
    text = f"{count_phrase(1, b.colour, b.shape)} with {count_phrase(1, a.colour, a.shape)} {side}"
    rest = s.listing(exclude=[(a.colour, a.shape), (b.colour, b.shape)])
    return f"{text}, and also {rest}" if rest else text


TEMPLATES: tuple[Callable[[_Scene], str | None], ...] = (
    _plain,
    _on_background,
    _intro,
    _counted,
    _related,
    _related_reversed,
)


def make_captions(
    objects: Sequence[CaptionObject], background: str, size: int, rng: np.random.Generator, count: int = 5
) -> list[str]:
    """`count` different captions naming every object with its colour and shape, in varied sentences."""
    scene = _Scene(objects, background, size, rng)
    captions: list[str] = []
    for _ in range(8 * count):
        for i in rng.permutation(len(TEMPLATES)):
            text = TEMPLATES[i](scene)
            if text is not None and text not in captions:
                captions.append(text)
            if len(captions) == count:
                return captions
    while len(captions) < count:  # a scene too plain for `count` distinct sentences repeats the first
        captions.append(captions[0])
    return captions
