"""EVLF model: disease-level tokens + pixel-level tokens spliced into a causal LM's prompt (LLaVA-style).

f_disease (any HF vision model with one pooled embedding) -> phi_disease -> K exemplar tokens;
f_pixel (any HF vision model with a feature grid) -> optional average pooling -> phi_pixel -> one token per cell.
Both groups replace the processor's placeholder tokens in the prompt embeddings; the LLM does the rest, so
``generate`` with a KV cache, left padding and sampling come from ``transformers`` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from monailabel_evlf.model.configuration_evlf import EVLFConfig


class EVLFDiseaseConnector(nn.Module):
    """phi_disease: one pooled embedding -> ``num_disease_tokens`` tokens in the LLM embedding space."""

    def __init__(self, config: EVLFConfig) -> None:
        super().__init__()
        hidden = config.text_config.hidden_size
        self.num_tokens = config.num_disease_tokens
        self.linear_1 = nn.Linear(config.disease_config.hidden_size, hidden)
        self.act = ACT2FN[config.connector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden * self.num_tokens)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        tokens = self.linear_2(self.act(self.linear_1(pooled)))
        return tokens.view(pooled.shape[0], self.num_tokens, -1)


class EVLFPixelConnector(nn.Module):
    """phi_pixel: a ``(B, C, H, W)`` feature grid -> average pool by ``pixel_pool`` -> one LLM token per cell."""

    def __init__(self, config: EVLFConfig) -> None:
        super().__init__()
        hidden = config.text_config.hidden_size
        self.pool = nn.AvgPool2d(config.pixel_pool) if config.pixel_pool > 1 else nn.Identity()
        self.linear_1 = nn.Linear(config.pixel_config.hidden_size, hidden)
        self.act = ACT2FN[config.connector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        tokens = self.pool(grid).flatten(2).transpose(1, 2)  # (B, h*w, C), row-major over the grid
        return self.linear_2(self.act(self.linear_1(tokens)))


class EVLFPreTrainedModel(PreTrainedModel):
    config: EVLFConfig
    config_class = EVLFConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]  # noqa: RUF012 (transformers API)
    _supports_sdpa = True
    _supports_attention_backend = True


class EVLFModel(EVLFPreTrainedModel):
    """Encoders + connectors + the LLM body (no LM head)."""

    def __init__(self, config: EVLFConfig) -> None:
        super().__init__(config)
        self.disease_encoder = AutoModel.from_config(config.disease_config)
        self.pixel_encoder = AutoModel.from_config(config.pixel_config)
        self.disease_connector = EVLFDiseaseConnector(config)
        self.pixel_connector = EVLFPixelConnector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def pixel_grid(self, dense_pixel_values: torch.Tensor) -> torch.Tensor:
        """The pixel encoder's features as a ``(B, C, H, W)`` grid.

        Token-sequence encoders (ViT, DINOv2) return ``(B, prefix + H*W, C)``: the CLS / register prefix is dropped.
        Convolutional-neck encoders (SAM class) already return ``(B, C, H, W)``.
        """
        hidden = self.pixel_encoder(pixel_values=dense_pixel_values).last_hidden_state
        if hidden.dim() == 4:
            return hidden
        side = self.config.pixel_grid_size
        patches = hidden[:, hidden.shape[1] - side * side :, :]
        return patches.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], side, side)

    def get_image_features(
        self, pixel_values: torch.Tensor, dense_pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Disease tokens ``(B, K, D)`` and pixel tokens ``(B, N, D)`` for a batch of images."""
        output = self.disease_encoder(pixel_values=pixel_values)
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:  # encoders without a pooling head: mean over tokens
            pooled = output.last_hidden_state.mean(dim=1)
        return self.disease_connector(pooled), self.pixel_connector(self.pixel_grid(dense_pixel_values))

    def merge_image_tokens(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        pixel_values: torch.Tensor | None,
        dense_pixel_values: torch.Tensor | None,
        prefill: bool = True,
    ) -> torch.Tensor:
        """Write both token groups into the placeholder positions of the prompt (the prefill step).

        Decoding steps carry no images; a placeholder id there (only an untrained model would sample one) stays an
        ordinary embedding.
        """
        disease_mask = input_ids == self.config.disease_token_id
        pixel_mask = input_ids == self.config.pixel_token_id
        if not (disease_mask.any() or pixel_mask.any()):
            return inputs_embeds
        if pixel_values is None or dense_pixel_values is None:
            if not prefill:
                return inputs_embeds
            raise ValueError("the prompt has image placeholder tokens but no pixel_values / dense_pixel_values")
        disease_tokens, pixel_tokens = self.get_image_features(pixel_values, dense_pixel_values)
        for mask, tokens, name in ((disease_mask, disease_tokens, "disease"), (pixel_mask, pixel_tokens, "pixel")):
            if int(mask.sum()) != tokens.shape[0] * tokens.shape[1]:
                raise ValueError(
                    f"{int(mask.sum())} {name} placeholder tokens in the prompt for {tokens.shape[0]} images x "
                    f"{tokens.shape[1]} tokens"
                )
            expanded = mask.unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(expanded, tokens.to(inputs_embeds.dtype))
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        dense_pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            prefill = past_key_values is None or past_key_values.get_seq_length() == 0
            inputs_embeds = self.merge_image_tokens(
                input_ids, inputs_embeds, pixel_values, dense_pixel_values, prefill=prefill
            )
        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )


class EVLFForConditionalGeneration(EVLFPreTrainedModel, GenerationMixin):
    """EVLF with the LM head: what ``generate``, the backends and fine-tuning use."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: EVLFConfig) -> None:
        super().__init__(config)
        self.model = EVLFModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        dense_pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            dense_pixel_values=dense_pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


AutoModel.register(EVLFConfig, EVLFModel, exist_ok=True)
AutoModelForImageTextToText.register(EVLFConfig, EVLFForConditionalGeneration, exist_ok=True)

__all__ = ["EVLFDiseaseConnector", "EVLFForConditionalGeneration", "EVLFModel", "EVLFPixelConnector"]
