"""EVLF model: disease-level tokens + pixel-level tokens spliced into a causal LM's prompt (LLaVA-style).

f_disease (any HF vision model with one pooled embedding) -> phi_disease -> K exemplar tokens;
f_pixel (any HF vision model with a feature grid) -> phi_pixel, either the grid connector (optional average pooling,
one token per cell) or the detection connector (top-K region proposals, each a region token + its four box
numbers as number-token embeddings, see :mod:`monailabel_evlf.model.detection`).
Both groups replace the processor's placeholder tokens in the prompt embeddings; the LLM does the rest, so
``generate`` with a KV cache, left padding and sampling come from ``transformers`` unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import fields, replace

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
from monailabel_evlf.model.dense_encoder import init_conv
from monailabel_evlf.model.detection import (
    CENTRE_PRIOR_LOGIT,
    BoxRefiner,
    DetectionHead,
    DetectionTarget,
    Proposals,
    box_numbers,
    decode_proposals,
    detection_loss,
    mirror_maps,
    refinement_loss,
    refinement_pairs,
)


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


class EVLFProposalConnector(nn.Module):
    """phi_pixel as a detector: grid -> proposal maps -> top-K proposals -> one region token per proposal.

    The region token is an MLP over the grid feature at the proposal's centre and what the head says about it (peak
    score, predicted IoU, box, label and site probabilities); the four box numbers follow it as number tokens.
    Everything goes through ``forward`` because peft wraps a trained connector (``modules_to_save``) and only
    forwards calls.
    """

    def __init__(self, config: EVLFConfig) -> None:
        super().__init__()
        hidden = config.text_config.hidden_size
        channels = config.pixel_config.hidden_size
        self.num_proposals = config.num_proposals
        self.num_labels, self.num_sites = len(config.finding_labels), len(config.finding_sites or ())
        self.head = DetectionHead(channels, self.num_labels, self.num_sites)
        summary = channels + 2 + 4 + self.num_labels + self.num_sites
        self.linear_1 = nn.Linear(summary, hidden)
        self.act = ACT2FN[config.connector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(
        self,
        grid: torch.Tensor | None = None,
        mirrored_grid: torch.Tensor | None = None,
        maps_only: bool = False,
        proposals: Proposals | None = None,
    ) -> torch.Tensor | tuple[Proposals, torch.Tensor]:
        """``maps_only``: the head's raw maps (training); else ``(proposals, region tokens (B, K, D))``, from the
        grid or from ``proposals`` already made (a frozen detector's cache)."""
        if proposals is None:
            maps = self.head(grid)
            if maps_only:
                return maps
            mirrored = None if mirrored_grid is None else mirror_maps(self.head(mirrored_grid))
            proposals = decode_proposals(maps, grid, self.num_proposals, self.num_labels, self.num_sites, mirrored)
        summary = torch.cat(
            [
                proposals.features,
                proposals.scores.unsqueeze(-1),
                proposals.quality.unsqueeze(-1),
                proposals.boxes,
                proposals.label_probs,
                proposals.site_probs,
            ],
            dim=-1,
        )
        return proposals, self.linear_2(self.act(self.linear_1(summary)))


class EVLFPreTrainedModel(PreTrainedModel):
    config: EVLFConfig
    config_class = EVLFConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]  # noqa: RUF012 (transformers API)
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The transformers default (normal, std 0.02) everywhere except the convolutional parts: He init for
        convolutions (std 0.02 leaves a ReLU conv stack nearly silent; measured: a detector trained from it
        reached top-1 Acc@0.5 0.20 where He init does far better), CenterNet's centre prior (p = 0.1) and a box
        refiner's last layer at zero (an untrained refiner changes no box)."""
        if isinstance(module, nn.Conv2d):
            init_conv(module)
            if getattr(module, "centre_prior", False):
                module.bias[0] = CENTRE_PRIOR_LOGIT
        elif getattr(module, "zero_init", False):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class EVLFModel(EVLFPreTrainedModel):
    """Encoders + connectors + the LLM body (no LM head)."""

    def __init__(self, config: EVLFConfig) -> None:
        super().__init__(config)
        self.disease_encoder = AutoModel.from_config(config.disease_config)
        self.pixel_encoder = AutoModel.from_config(config.pixel_config)
        self.disease_connector = EVLFDiseaseConnector(config)
        self.pixel_connector = EVLFProposalConnector(config) if config.num_proposals else EVLFPixelConnector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.box_refiner = None
        if config.num_proposals and config.refine_proposals:
            # built on a forked random stream and registered last (weight init runs in registration order), so that
            # adding a refiner leaves every other weight's random init as it was: a clean comparison of recipes
            with torch.random.fork_rng():
                self.box_refiner = BoxRefiner(config.pixel_config.num_channels)
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

    def propose(self, dense_pixel_values: torch.Tensor) -> tuple[Proposals, torch.Tensor]:
        """The detection connector's top-K proposals (flip-averaged if ``config.flip_average``, re-measured by the box
        refiner if the model has one) and their region tokens."""
        if not self.config.num_proposals:
            raise ValueError("this EVLF model has a grid pixel connector: it makes no region proposals")
        cache = getattr(self, "_frozen_proposals", None)
        if cache is None:
            return self.pixel_connector(proposals=self._proposals(dense_pixel_values))
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in dense_pixel_values.cpu()]
        missing = [n for n, key in enumerate(keys) if key not in cache]
        if missing:
            found = self._proposals(dense_pixel_values[missing])
            for row, n in enumerate(missing):
                cache[keys[n]] = Proposals(*(getattr(found, f.name)[row].detach() for f in fields(Proposals)))
        stacked = Proposals(*(torch.stack([getattr(cache[k], f.name) for k in keys]) for f in fields(Proposals)))
        return self.pixel_connector(proposals=stacked)

    def _proposals(self, dense_pixel_values: torch.Tensor) -> Proposals:
        grid = self.pixel_grid(dense_pixel_values)
        maps = self.pixel_connector(grid, maps_only=True)
        mirrored = None
        if self.config.flip_average:
            mirrored = mirror_maps(self.pixel_connector(self.pixel_grid(dense_pixel_values.flip(-1)), maps_only=True))
        labels, sites = len(self.config.finding_labels), len(self.config.finding_sites or ())
        proposals = decode_proposals(maps, grid, self.config.num_proposals, labels, sites, mirrored)
        if self.box_refiner is None:
            return proposals
        return replace(proposals, boxes=self.box_refiner(dense_pixel_values, proposals.boxes))

    @contextlib.contextmanager
    def frozen_detector(self) -> Iterator[None]:
        """Reuse each image's proposals while the detector (pixel encoder + proposal head) is not training, as in
        the later stages of a build: they are then a pure function of the image, and computing them is most of a
        training step's time. Only the region-token MLP, which reads them, keeps training."""
        head = [p for name, p in self.pixel_connector.named_parameters() if "head." in name]
        refiner = [] if self.box_refiner is None else list(self.box_refiner.parameters())
        if any(p.requires_grad for p in [*self.pixel_encoder.parameters(), *head, *refiner]):
            raise ValueError("the pixel encoder or proposal head is trainable: its proposals cannot be cached")
        self._frozen_proposals: dict[bytes, Proposals] | None = {}
        try:
            yield
        finally:
            self._frozen_proposals = None

    def detection_loss(
        self,
        dense_pixel_values: torch.Tensor,
        targets: list[DetectionTarget],
        site_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The detection connector's training loss terms on a batch of images and their true boxes; with a box
        refiner, ``"refine"`` too (on the head's own proposals, detached, and on jittered true boxes)."""
        grid = self.pixel_grid(dense_pixel_values)
        maps = self.pixel_connector(grid, maps_only=True).float()
        labels, sites = len(self.config.finding_labels), len(self.config.finding_sites or ())
        losses = detection_loss(maps, targets, labels, sites, site_mask)
        if self.box_refiner is not None:
            proposals = decode_proposals(maps.detach(), grid.detach(), self.config.num_proposals, labels, sites)
            starts, truth = refinement_pairs(proposals.boxes, targets)
            refined = self.box_refiner(dense_pixel_values, starts) if starts.shape[1] else starts
            losses["refine"] = refinement_loss(refined.float(), truth)
        return losses

    def pixel_tokens(self, dense_pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)``: grid-cell tokens, or per proposal its region token then its four box-number embeddings."""
        if not self.config.num_proposals:
            return self.pixel_connector(self.pixel_grid(dense_pixel_values))
        proposals, region = self.propose(dense_pixel_values)
        number_ids = torch.tensor(self.config.number_token_ids, device=region.device)
        numbers = self.get_input_embeddings()(
            number_ids[box_numbers(proposals.boxes, self.config.box_grid)]
        )  # (B, K, 4, D)
        return torch.cat([region.unsqueeze(2), numbers.to(region.dtype)], dim=2).flatten(1, 2)

    def get_image_features(
        self, pixel_values: torch.Tensor, dense_pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Disease tokens ``(B, K, D)`` and pixel tokens ``(B, N, D)`` for a batch of images."""
        output = self.disease_encoder(pixel_values=pixel_values)
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:  # encoders without a pooling head: mean over tokens (or over a conv grid's cells)
            hidden = output.last_hidden_state
            pooled = hidden.mean(dim=(-2, -1)) if hidden.dim() == 4 else hidden.mean(dim=1)
        return self.disease_connector(pooled), self.pixel_tokens(dense_pixel_values)

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
        if self.config.num_proposals:
            pixel_mask = (input_ids == self.config.region_token_id) | (input_ids == self.config.coordinate_token_id)
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

__all__ = [
    "EVLFDiseaseConnector",
    "EVLFForConditionalGeneration",
    "EVLFModel",
    "EVLFPixelConnector",
    "EVLFProposalConnector",
]
