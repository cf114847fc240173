"""The native EVLF backend: boxes as integers 0..100 of width / height, each number a single token."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from monailabel_evlf.model.backend import BoxConvention
from monailabel_evlf.model.backends.base import HFVLMBackend
from monailabel_evlf.model.modeling_evlf import EVLFForConditionalGeneration
from monailabel_evlf.model.processing_evlf import IMAGE_TOKEN, image_to_float_rgb


class EVLFBackend(HFVLMBackend):
    """EVLF through peft LoRA on its LLM; both connectors (and, for from-scratch models, the encoders) train fully.

    ``config.train_encoders`` adds the two encoders to the trainable set: right for the random-weight demo model
    (nothing pretrained to preserve), wrong for pretrained encoders, which the paper keeps frozen.
    """

    box_convention: ClassVar[BoxConvention] = BoxConvention.NORMALIZED_100
    model_class: ClassVar[type] = EVLFForConditionalGeneration
    default_lora_target_modules: ClassVar[str] = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj)"
    default_connectors: ClassVar[tuple[str, ...]] = ("disease_connector", "pixel_connector")

    def connector_modules(self, model: torch.nn.Module) -> tuple[str, ...]:
        encoders = ("disease_encoder", "pixel_encoder") if model.config.train_encoders else ()
        return (*self.default_connectors, *encoders)

    def prepare_image(self, image: np.ndarray) -> np.ndarray:
        image_to_float_rgb(image)  # validates grayscale / 16-bit / float / RGB inputs with a clear error
        return image

    def suppressed_token_ids(self) -> list[int]:
        config = self.model.config
        image_token = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        return sorted({config.disease_token_id, config.pixel_token_id, image_token})

    def model_input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The pixel encoder's square input (both encoders resize the whole slice; answers are 0..100 anyway)."""
        return self.processor.pixel_size, self.processor.pixel_size

    def extra_forward_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Positions counted from the first real token, as ``generate`` does for left-padded prompts."""
        return {"position_ids": (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)}
