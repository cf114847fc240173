"""Intensity windows: CT presets in HU and percentile windows for MR and other modalities, mapped to [0, 1].

A vision-language model sees 8-bit pictures, so which HU range becomes grey matters as much as for a reader:
a nodule is invisible in a brain window. Windows are resolved once per volume (percentiles over the whole volume,
not per slice) so neighbouring slices keep the same contrast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from monai.transforms import ScaleIntensityRange

__all__ = [
    "CT_WINDOWS",
    "Channel",
    "PercentileWindow",
    "Window",
    "apply_window",
    "parse_window",
    "resolve_window",
    "window_bounds",
    "window_channels",
]


class Window(NamedTuple):
    """A fixed window, ``level`` (centre) and ``width`` in image units (HU for CT)."""

    level: float
    width: float

    @property
    def bounds(self) -> tuple[float, float]:
        return self.level - self.width / 2, self.level + self.width / 2


class PercentileWindow(NamedTuple):
    """A window from the volume's own intensity percentiles (MR, PET, X-ray: no absolute units)."""

    lower: float = 0.5
    upper: float = 99.5


# Common reading-room values (level, width) in HU, as listed in Radiopaedia's "Windowing (CT)" article.
CT_WINDOWS: dict[str, Window] = {
    "lung": Window(-600.0, 1500.0),
    "mediastinum": Window(50.0, 350.0),
    "soft_tissue": Window(40.0, 400.0),
    "abdomen": Window(40.0, 400.0),
    "liver": Window(30.0, 150.0),
    "bone": Window(400.0, 1800.0),
    "brain": Window(40.0, 80.0),
}

WindowSpec = str | Window | PercentileWindow | tuple[float, float]
CHANNEL_SEPARATOR = "/"  # "abdomen/liver/40,80": one window per RGB channel
OFFSET_SEPARATOR = "@"  # "liver@-1/liver/liver@1": each channel's slice, counted from the rendered one


class Channel(NamedTuple):
    """One picture channel: its window, and the slice it shows, ``offset`` slices from the rendered one toward the
    patient's head for axial cuts (``slicing.render_slices`` says which way for the others). Neighbouring slices
    as channels (2.5D input, as in DeepLesion's 3DCE) let a 2D model tell a lesion two voxels wide, present above
    and below, from noise on one slice."""

    window: WindowSpec
    offset: int = 0


MODEL_WINDOW = "model"  # "the window the model was trained with" (a model records it; see resolve_window)
FALLBACK_WINDOW = "abdomen"  # for models that record none (any Hugging Face VLM)


def resolve_window(spec: str, model_window: str | None) -> str:
    """``spec``, or for :data:`MODEL_WINDOW` the model's own ``model_window`` (else :data:`FALLBACK_WINDOW`):
    slices must be rendered the way the model saw them in training."""
    return (model_window or FALLBACK_WINDOW) if spec == MODEL_WINDOW else spec


def window_channels(spec: WindowSpec | Sequence[WindowSpec | Channel], modality: str = "CT") -> list[Channel]:
    """The :class:`Channel` of each picture channel: one (a grey picture) or three (RGB), each window checked by
    :func:`parse_window`. Three windows let a model see subtle contrast (a narrow window) and the whole soft-tissue
    range at once, as multi-window CT inputs do; a string names them ``"abdomen/liver/40,80"``, and a channel
    written ``"liver@1"`` shows the next slice toward the head in the liver window."""
    if isinstance(spec, str):
        parts: list[WindowSpec] = [part.strip() for part in spec.split(CHANNEL_SEPARATOR)]
    elif isinstance(spec, list | tuple) and len(spec) == 3:
        parts = list(spec)
    else:
        parts = [spec]
    if len(parts) not in (1, 3):
        raise ValueError(f"give one window or three (one per RGB channel, '/'-separated), got {spec!r}")
    channels = [_channel(part) for part in parts]
    for channel in channels:
        parse_window(channel.window, modality)
    return channels


def _channel(part: WindowSpec | Channel) -> Channel:
    if isinstance(part, Channel):
        return part
    if not isinstance(part, str) or OFFSET_SEPARATOR not in part:
        return Channel(part)
    window, offset = part.split(OFFSET_SEPARATOR, 1)
    try:
        return Channel(window.strip(), int(offset))
    except ValueError:
        raise ValueError(f"channel {part!r}: the slice offset after '@' must be a whole number of slices") from None


def parse_window(spec: WindowSpec, modality: str = "CT") -> Window | PercentileWindow:
    """Resolve a preset name, ``"auto"``, ``"percentile"`` / ``"percentile:1,99"``, ``"level,width"`` or a tuple.

    ``"auto"`` is the soft-tissue window for CT and a 0.5-99.5 percentile window otherwise. Strings come from
    configuration files, so they are parsed, never evaluated.
    """
    if isinstance(spec, Window | PercentileWindow):
        window = spec
    elif isinstance(spec, str):
        window = _parse_window_string(spec.strip().lower(), modality)
    elif isinstance(spec, Sequence) and len(spec) == 2:
        window = Window(float(spec[0]), float(spec[1]))
    else:
        raise ValueError(f"cannot read a window from {spec!r}")
    _check(window)
    return window


def _parse_window_string(text: str, modality: str) -> Window | PercentileWindow:
    if text == "auto":
        return CT_WINDOWS["soft_tissue"] if modality.upper() == "CT" else PercentileWindow()
    if text in CT_WINDOWS:
        return CT_WINDOWS[text]
    if text.startswith("percentile"):
        numbers = text.removeprefix("percentile").lstrip(":")
        return PercentileWindow(*_numbers(numbers, text)) if numbers else PercentileWindow()
    try:
        return Window(*_numbers(text, text))
    except ValueError:
        raise ValueError(
            f"unknown window {text!r}: use one of {sorted(CT_WINDOWS)}, 'auto', 'percentile[:lo,hi]' or 'level,width'"
        ) from None


def _numbers(text: str, spec: str) -> tuple[float, float]:
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if len(parts) != 2:
        raise ValueError(f"window {spec!r} needs two numbers")
    return float(parts[0]), float(parts[1])


def _check(window: Window | PercentileWindow) -> None:
    if not all(np.isfinite(window)):
        raise ValueError(f"window values must be finite, got {window}")
    if isinstance(window, Window) and window.width <= 0:
        raise ValueError(f"window width must be positive, got {window.width}")
    if isinstance(window, PercentileWindow) and not 0 <= window.lower < window.upper <= 100:
        raise ValueError(f"percentiles need 0 <= lower < upper <= 100, got {window}")


def window_bounds(array: np.ndarray, spec: WindowSpec = "auto", modality: str = "CT") -> tuple[float, float]:
    """Intensity ``(low, high)`` that map to 0 and 1; percentiles are taken over all of ``array``."""
    window = parse_window(spec, modality)
    if isinstance(window, Window):
        return window.bounds
    # Bounds come from the whole volume while only a few slices get scaled, so MONAI's
    # ScaleIntensityRangePercentiles (which scales the array it measures) does not fit here.
    low, high = (float(v) for v in np.percentile(np.asarray(array), [window.lower, window.upper]))
    return (low, high) if high > low else (low, low + 1.0)  # a constant image maps to 0, not NaN


def apply_window(array: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Scale ``array`` linearly so ``bounds`` map to [0, 1], clipped, as float32."""
    low, high = bounds
    if not high > low:
        raise ValueError(f"window bounds need low < high, got {bounds}")
    scaled = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)(array)
    return np.asarray(scaled, dtype=np.float32)
