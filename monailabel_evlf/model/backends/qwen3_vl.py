"""Qwen3-VL as backbone: boxes on a 0..1000 grid of the image's width and height.

Chosen as the 0-1000 family because it builds tiny and offline from transformers' own classes; InternVL's
3.x checkpoints use the same convention and fit :class:`Qwen3VLBackend`'s recipe with their own processor.
"""

from __future__ import annotations

from typing import ClassVar

from monailabel_evlf.model.backends.qwen2_5_vl import Qwen25VLBackend
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention


class Qwen3VLBackend(Qwen25VLBackend):
    """Any Qwen3-VL checkpoint via the auto classes; same LoRA / merger policy as Qwen2.5-VL."""

    # replaces Qwen2.5-VL's codec property: 0..1000 of the picture whatever its resize
    box_codec: ClassVar[BoxCodec] = BoxCodec(BoxConvention.NORMALIZED_1000)
