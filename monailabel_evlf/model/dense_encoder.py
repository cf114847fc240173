"""A small convolutional pixel-level encoder at stride 2, registered with the ``transformers`` auto classes.

Why our own: the Hugging Face vision classes are ViTs or stride-32 CNNs; none keeps a stride-2 feature grid, and a
lesion of 4-8 px on a 96 px slice needs one (measured: a DINOv2-class patch-8 grid and a stride-8 CNN both stayed
at grounding Acc@0.5 0.0 on the demo data). It is the tiny demo model's f_pixel; real-size models use DINOv2 /
SAM-class encoders through the same ``pixel_config`` slot. GroupNorm rather than BatchNorm, so a frozen encoder
behaves the same in ``train()`` and ``eval()`` (no running statistics drift while the LM trains).
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput


@strict
class EVLFDenseEncoderConfig(PreTrainedConfig):
    r"""
    image_size: square input side in pixels.
    stage_channels: channels at strides 1, 2 and 4.
    hidden_size: channels of the fused output grid.
    patch_size: the output stride (2): the grid is ``image_size // patch_size`` cells a side.
    """

    model_type = "evlf_dense_encoder"

    image_size: int = 128
    num_channels: int = 3
    stage_channels: list[int] | tuple[int, ...] = (16, 32, 64)
    hidden_size: int = 48
    patch_size: int = 2

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.stage_channels = [int(c) for c in self.stage_channels]
        if len(self.stage_channels) != 3 or self.patch_size != 2 or self.image_size % 8:
            raise ValueError("EVLFDenseEncoderConfig needs 3 stage_channels, patch_size 2, image_size % 8 == 0")


def init_conv(module: nn.Conv2d) -> None:
    """He (Kaiming) init for a convolution followed by ReLU, zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _conv(inputs: int, outputs: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(min(8, outputs // 4), outputs),
        nn.ReLU(inplace=True),
    )


class EVLFDenseEncoder(PreTrainedModel):
    """Stride-1 stem, a dilated stride-2 stage and a dilated stride-4 stage fused into one stride-2 grid."""

    config: EVLFDenseEncoderConfig
    config_class = EVLFDenseEncoderConfig
    main_input_name = "pixel_values"
    base_model_prefix = "dense_encoder"

    def __init__(self, config: EVLFDenseEncoderConfig) -> None:
        super().__init__(config)
        c1, c2, c3 = config.stage_channels
        self.stem = _conv(config.num_channels, c1)
        self.stage2 = nn.Sequential(_conv(c1, c2, stride=2), _conv(c2, c2, dilation=2))
        self.stage3 = nn.Sequential(_conv(c2, c3, stride=2), _conv(c3, c3, dilation=2), _conv(c3, c3, dilation=4))
        # 1x1 fusion: the dilated stages already give each cell its context; a 3x3 here would cost most of the FLOPs
        self.fuse = nn.Sequential(
            nn.Conv2d(c2 + c3, config.hidden_size, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(config.hidden_size, config.hidden_size, 1),
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            init_conv(module)
        else:
            super()._init_weights(module)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutput:
        mid = self.stage2(self.stem(pixel_values))
        deep = nn.functional.interpolate(self.stage3(mid), size=mid.shape[-2:], mode="bilinear", align_corners=False)
        return BaseModelOutput(last_hidden_state=self.fuse(torch.cat([mid, deep], dim=1)))


AutoConfig.register("evlf_dense_encoder", EVLFDenseEncoderConfig, exist_ok=True)
AutoModel.register(EVLFDenseEncoderConfig, EVLFDenseEncoder, exist_ok=True)

__all__ = ["EVLFDenseEncoder", "EVLFDenseEncoderConfig"]
