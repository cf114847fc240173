"""How a backend writes boxes in its answers, in one object that prompts, targets, parsing and rewards all ask.

A backend hands out a :class:`BoxCodec` (``backend.box_codec``): its :class:`BoxConvention` and, where answers are
pixels of the resized picture, the rule by which its processor resizes an image. :meth:`BoxCodec.for_image` binds
it to one rendered image as a :class:`SliceCodec`, which maps answer numbers to that image's pixels and back, so no
call site carries ``(convention, image_size, model_input_size)`` around (docs/conventions.md). This module sits in
``tasks/`` and imports nothing from ``model/``: reading and scoring answers does not need a model.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height) in pixels


class BoxConvention(enum.Enum):
    """How a backend writes box coordinates in its answers (see docs/conventions.md)."""

    ABSOLUTE_MODEL_INPUT = "absolute_model_input"  # pixels of the image after the processor's resize
    NORMALIZED_1000 = "normalized_1000"  # 0..1000 of width / height
    NORMALIZED_100 = "normalized_100"  # 0..100 of width / height (native EVLF: one token per number)


_PROMPT_WORDS = {
    BoxConvention.ABSOLUTE_MODEL_INPUT: "as pixel coordinates of the image",
    BoxConvention.NORMALIZED_1000: "scaled to 0-1000 of the image width and height",
    BoxConvention.NORMALIZED_100: "scaled to 0-100 of the image width and height",
}
_NORMALIZED_SCALE = {BoxConvention.NORMALIZED_1000: 1000.0, BoxConvention.NORMALIZED_100: 100.0}


def _size(name: str, size: Sequence[int]) -> Size:
    if len(size) != 2 or size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{name} must be positive (width, height), got {tuple(size)}")
    return size[0], size[1]


def _four(values: Sequence[float]) -> tuple[float, float, float, float]:
    if len(values) != 4:
        raise ValueError(f"a box needs 4 coordinates [x1, y1, x2, y2], got {list(values)!r}")
    x1, y1, x2, y2 = (float(v) for v in values)
    return x1, y1, x2, y2


@dataclass(frozen=True)
class SliceCodec:
    """A box convention bound to one image: answer numbers <-> edge coordinates in pixels of that image.

    All conventions are linear in edge coordinates (0 = left / top edge, full scale = right / bottom edge), so this
    is one scale per axis. ``model_input_size`` is the (width, height) the model saw; only ``ABSOLUTE_MODEL_INPUT``
    answers depend on it. Bad sizes raise ``ValueError`` here, once, not at every box.
    """

    convention: BoxConvention
    image_size: Size
    model_input_size: Size | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "convention", BoxConvention(self.convention))
        object.__setattr__(self, "image_size", _size("image_size", self.image_size))
        if self.convention is BoxConvention.ABSOLUTE_MODEL_INPUT:
            if self.model_input_size is None:
                raise ValueError("ABSOLUTE_MODEL_INPUT boxes need the model_input_size the model saw")
            object.__setattr__(self, "model_input_size", _size("model_input_size", self.model_input_size))

    @property
    def _scale(self) -> tuple[float, float]:
        """Answer units per image pixel along x and y."""
        width, height = self.image_size
        if self.convention is BoxConvention.ABSOLUTE_MODEL_INPUT:
            return self.model_input_size[0] / width, self.model_input_size[1] / height
        full = _NORMALIZED_SCALE[self.convention]
        return full / width, full / height

    def to_pixels(self, numbers: Sequence[float]) -> tuple[float, float, float, float]:
        """An answer's ``[x1, y1, x2, y2]`` -> pixel edge coordinates, corners reordered to ``x1 <= x2, y1 <= y2``."""
        x1, y1, x2, y2 = _four(numbers)
        sx, sy = self._scale
        return min(x1, x2) / sx, min(y1, y2) / sy, max(x1, x2) / sx, max(y1, y2) / sy

    def from_pixels(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """The inverse of :meth:`to_pixels`: a pixel box -> the numbers the backend writes (not rounded)."""
        x1, y1, x2, y2 = _four(box)
        sx, sy = self._scale
        return x1 * sx, y1 * sy, x2 * sx, y2 * sy

    def answer_numbers(self, box: Sequence[float]) -> list[int]:
        """The integers the backend should write for a pixel box: rounded, inside the image and at least one answer
        unit wide and high, so that a tiny lesion never becomes an empty target box."""
        full_x, full_y = (round(v) for v in self.from_pixels((0, 0, *self.image_size))[2:])
        x1, y1, x2, y2 = (round(v) for v in self.from_pixels(box))
        x1, y1 = min(max(x1, 0), full_x - 1), min(max(y1, 0), full_y - 1)
        return [x1, y1, min(max(x2, x1 + 1), full_x), min(max(y2, y1 + 1), full_y)]


@dataclass(frozen=True)
class BoxCodec:
    """What a backend hands out as ``backend.box_codec``: its convention and, for ``ABSOLUTE_MODEL_INPUT``, the
    ``(width, height) -> (width, height)`` resize its processor applies (the normalized conventions ignore it)."""

    convention: BoxConvention
    model_input_size: Callable[[Size], Size] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "convention", BoxConvention(self.convention))
        if self.convention is BoxConvention.ABSOLUTE_MODEL_INPUT and self.model_input_size is None:
            raise ValueError("an ABSOLUTE_MODEL_INPUT codec needs the model_input_size resize rule")

    @property
    def prompt_words(self) -> str:
        """How a grounding prompt names this coordinate system, so the model is asked for what it writes."""
        return _PROMPT_WORDS[self.convention]

    def for_image(self, image_size: Sequence[int]) -> SliceCodec:
        """The codec for one ``(width, height)`` image (the model input size worked out here, where needed)."""
        size = _size("image_size", image_size)
        if self.convention is BoxConvention.ABSOLUTE_MODEL_INPUT:
            return SliceCodec(self.convention, size, self.model_input_size(size))
        return SliceCodec(self.convention, size)
