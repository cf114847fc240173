"""Qwen2.5-VL as backbone: boxes in absolute pixels of the image after the processor's ``smart_resize``."""

from __future__ import annotations

from typing import ClassVar

from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from monailabel_evlf.model.backends.base import HFVLMBackend
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention


class Qwen25VLBackend(HFVLMBackend):
    """Any Qwen2.5-VL checkpoint via ``AutoModelForImageTextToText`` / ``AutoProcessor``; LoRA on the language
    model's attention, the vision-language merger trained in full (it is this model's connector)."""

    default_connectors: ClassVar[tuple[str, ...]] = ("merger",)

    @property
    def box_codec(self) -> BoxCodec:
        """Answers are pixels of the resized picture, so the codec carries this processor's resize."""
        return BoxCodec(BoxConvention.ABSOLUTE_MODEL_INPUT, self.model_input_size)

    def model_input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(width, height)`` after the image processor's resize to multiples of patch x merge size."""
        width, height = image_size
        processor = self.processor.image_processor
        resized_height, resized_width = smart_resize(
            height,
            width,
            factor=processor.patch_size * processor.merge_size,
            min_pixels=processor.size["shortest_edge"],
            max_pixels=processor.size["longest_edge"],
        )
        return resized_width, resized_height
