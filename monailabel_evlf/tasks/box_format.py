"""Box coordinates as a backend writes them in its answers <-> pixels of the image we rendered.

Each backend declares a :class:`~monailabel_evlf.model.backend.BoxConvention`; these two functions are the only
place the conventions are interpreted, so parsing (answers -> pixels) and target writing (pixels -> answers for
SFT) can never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.model.backend import BoxConvention

_NORMALIZED_SCALE = {BoxConvention.NORMALIZED_1000: 1000.0, BoxConvention.NORMALIZED_100: 100.0}


def _scales(
    convention: BoxConvention, image_size: tuple[int, int], model_input_size: tuple[int, int] | None
) -> tuple[float, float]:
    """Pixels of the rendered image per unit of answer coordinate, along x and y."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if convention is BoxConvention.ABSOLUTE_MODEL_INPUT:
        seen_w, seen_h = model_input_size or image_size
        return width / seen_w, height / seen_h
    scale = _NORMALIZED_SCALE[convention]
    return width / scale, height / scale


def decode_box(
    numbers: Sequence[float],
    convention: BoxConvention,
    image_size: tuple[int, int],
    model_input_size: tuple[int, int] | None = None,
    **box_fields,
) -> Box2D:
    """Four answer numbers (corners in any order) -> a box in rendered-image pixels (not clipped)."""
    sx, sy = _scales(convention, image_size, model_input_size)
    x_a, y_a, x_b, y_b = (float(v) for v in numbers)
    return Box2D(min(x_a, x_b) * sx, min(y_a, y_b) * sy, max(x_a, x_b) * sx, max(y_a, y_b) * sy, **box_fields)


def encode_box(
    box: Box2D,
    convention: BoxConvention,
    image_size: tuple[int, int],
    model_input_size: tuple[int, int] | None = None,
) -> list[int]:
    """A box in rendered-image pixels -> the integers a backend of ``convention`` should write (SFT targets)."""
    sx, sy = _scales(convention, image_size, model_input_size)
    limit_x, limit_y = image_size[0] / sx, image_size[1] / sy
    values = [box.x1 / sx, box.y1 / sy, box.x2 / sx, box.y2 / sy]
    limits = [limit_x, limit_y, limit_x, limit_y]
    return [int(min(max(round(v), 0), round(limit))) for v, limit in zip(values, limits, strict=True)]
