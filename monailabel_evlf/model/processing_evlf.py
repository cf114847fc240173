"""EVLF processor: chat text -> token ids with expanded image placeholders; slices -> each encoder's input.

Medical slices arrive as grayscale or RGB, 8-bit, 16-bit or float arrays already windowed to [0, 1]. Hugging Face
image processors assume 8-bit display images, so the scaling to [0, 1] happens once here, explicitly by dtype, and
only then each encoder gets its own resize and normalisation (two encoders, two input sizes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, BatchFeature, ProcessorMixin

from monailabel_evlf.model.configuration_evlf import EVLFConfig

IMAGE_TOKEN = "<|image|>"
DISEASE_TOKEN = "<|disease|>"
PIXEL_TOKEN = "<|pixel|>"
REGION_TOKEN = "<|region|>"  # a proposal's region token (detection pixel connector)
COORD_TOKEN = "<|coord|>"  # one of a proposal's four box numbers

# Qwen-style turns; ``<|image|>`` marks where the processor expands an image's disease + pixel tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image_to_float_rgb(image: np.ndarray) -> torch.Tensor:
    """An image array -> ``(3, H, W)`` float32 in [0, 1].

    uint8 / uint16 scale by their full range; float images must already be windowed to [0, 1]; signed integers
    (raw HU) are refused because no scaling of them is right without a window.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected a (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {array.shape}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        scaled = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        scaled = array.astype(np.float32) / 65535.0
    elif array.dtype == np.bool_:
        scaled = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        scaled = array.astype(np.float32)
        if not np.isfinite(scaled).all():
            raise ValueError("float image has NaN or infinite values")
        if scaled.min() < -1e-3 or scaled.max() > 1 + 1e-3:
            raise ValueError(
                f"float image values span [{scaled.min():.3g}, {scaled.max():.3g}]; window them to [0, 1] first"
            )
        scaled = np.clip(scaled, 0.0, 1.0)
    else:
        raise ValueError(f"unsupported image dtype {array.dtype}: window to float [0, 1] or render to uint8 first")
    return torch.from_numpy(np.ascontiguousarray(scaled)).permute(2, 0, 1)


def encoder_input(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> bilinear (antialiased) resize to ``size`` x ``size``, then normalise."""
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=resized.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=resized.dtype).view(1, 3, 1, 1)
    return (resized - mean_t) / std_t


class EVLFProcessor(ProcessorMixin):
    """Tokenizer + chat template + the two encoders' image preparation, saved as one processor directory."""

    def __init__(
        self,
        tokenizer=None,
        chat_template: str | None = None,
        num_disease_tokens: int = 4,
        num_pixel_tokens: int = 16,
        num_proposals: int = 0,
        disease_size: int = 32,
        disease_mean: Sequence[float] = (0.5, 0.5, 0.5),
        disease_std: Sequence[float] = (0.5, 0.5, 0.5),
        pixel_size: int = 64,
        pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
        pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        self.num_disease_tokens = int(num_disease_tokens)
        self.num_pixel_tokens = int(num_pixel_tokens)
        self.num_proposals = int(num_proposals)
        self.disease_size = int(disease_size)
        self.disease_mean = list(disease_mean)
        self.disease_std = list(disease_std)
        self.pixel_size = int(pixel_size)
        self.pixel_mean = list(pixel_mean)
        self.pixel_std = list(pixel_std)
        super().__init__(tokenizer, chat_template=chat_template if chat_template is not None else CHAT_TEMPLATE)

    @classmethod
    def for_config(cls, tokenizer, config: EVLFConfig, **image_options) -> EVLFProcessor:
        """A processor matching a model config's token counts and encoder input sizes."""
        return cls(
            tokenizer,
            num_disease_tokens=config.num_disease_tokens,
            num_pixel_tokens=config.num_pixel_tokens,
            num_proposals=config.num_proposals,
            disease_size=int(config.disease_config.image_size),
            pixel_size=int(config.pixel_config.image_size),
            **image_options,
        )

    @property
    def image_expansion(self) -> str:
        if self.num_proposals:
            return DISEASE_TOKEN * self.num_disease_tokens + (REGION_TOKEN + COORD_TOKEN * 4) * self.num_proposals
        return DISEASE_TOKEN * self.num_disease_tokens + PIXEL_TOKEN * self.num_pixel_tokens

    def pixel_inputs(self, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """``pixel_values`` (disease encoder) and ``dense_pixel_values`` (pixel encoder) for a list of images."""
        pixel_values, dense = [], []
        for image in images:  # one at a time: slices in a batch may differ in size
            rgb = image_to_float_rgb(image).unsqueeze(0)
            pixel_values.append(encoder_input(rgb, self.disease_size, self.disease_mean, self.disease_std))
            dense.append(encoder_input(rgb, self.pixel_size, self.pixel_mean, self.pixel_std))
        return {"pixel_values": torch.cat(pixel_values), "dense_pixel_values": torch.cat(dense)}

    def __call__(
        self,
        images: Sequence[np.ndarray] | np.ndarray | None = None,
        text: str | Sequence[str] | None = None,
        padding: bool | str = True,
        padding_side: str = "left",
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Chat-formatted ``text`` (one ``<|image|>`` per image, in order) and ``images`` -> model inputs."""
        if text is None:
            raise ValueError("EVLFProcessor needs text (apply the chat template first)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = []
        elif isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.shape[-1] in (1, 3, 4):
            images = [images]
        placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
        if placeholders != len(images):
            raise ValueError(f"{placeholders} {IMAGE_TOKEN} placeholders in the text for {len(images)} images")
        expanded = [t.replace(IMAGE_TOKEN, self.image_expansion) for t in texts]
        encoding = self.tokenizer(
            expanded,
            padding=padding,
            padding_side=padding_side,
            return_tensors=return_tensors,
            add_special_tokens=False,
            **kwargs,
        )
        data = dict(encoding)
        if len(images):
            data.update(self.pixel_inputs(images))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "dense_pixel_values"]


AutoProcessor.register(EVLFConfig, EVLFProcessor, exist_ok=True)

__all__ = [
    "CHAT_TEMPLATE",
    "COORD_TOKEN",
    "DISEASE_TOKEN",
    "IMAGE_TOKEN",
    "PIXEL_TOKEN",
    "REGION_TOKEN",
    "EVLFProcessor",
    "image_to_float_rgb",
]
