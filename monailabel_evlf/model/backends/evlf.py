"""The native EVLF backend: boxes as integers 0..``box_grid`` of width / height, each number a single token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from monailabel_evlf.imaging.geometry import Box2D
from monailabel_evlf.model.backends.base import HFVLMBackend
from monailabel_evlf.model.detection import DetectionTarget, box_numbers
from monailabel_evlf.model.modeling_evlf import EVLFForConditionalGeneration
from monailabel_evlf.model.processing_evlf import IMAGE_TOKEN, image_to_float_rgb
from monailabel_evlf.model.proposal_decoding import ProposalBoxConstraint
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention


class EVLFBackend(HFVLMBackend):
    """EVLF through peft LoRA on its LLM; both connectors (and, for from-scratch models, the encoders) train fully.

    ``config.train_encoders`` adds the two encoders to the trainable set: right for the random-weight demo model
    (nothing pretrained to preserve), wrong for pretrained encoders, which the paper keeps frozen.
    """

    model_class: ClassVar[type] = EVLFForConditionalGeneration
    default_lora_target_modules: ClassVar[str] = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj)"
    default_connectors: ClassVar[tuple[str, ...]] = ("disease_connector", "pixel_connector")

    def connector_modules(self, model: torch.nn.Module) -> tuple[str, ...]:
        encoders = ("disease_encoder", "pixel_encoder") if model.config.train_encoders else ()
        refiner = ("box_refiner",) if model.config.num_proposals and model.config.refine_proposals else ()
        return (*self.default_connectors, *refiner, *encoders)

    @property
    def box_codec(self) -> BoxCodec:
        """0..100 of width / height (NORMALIZED_100), or, for a model whose ``config.box_grid`` is its slice size,
        pixels of the slice resized to ``box_grid`` square: on a slice of that size, exact pixel edges."""
        grid = self.model.config.box_grid
        if grid == 100:
            return BoxCodec(BoxConvention.NORMALIZED_100)
        return BoxCodec(BoxConvention.ABSOLUTE_MODEL_INPUT, lambda size: (grid, grid))

    def prepare_image(self, image: np.ndarray) -> np.ndarray:
        image_to_float_rgb(image)  # validates grayscale / 16-bit / float / RGB inputs with a clear error
        return image

    def suppressed_token_ids(self) -> list[int]:
        config = self.model.config
        image_token = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        ids = {config.disease_token_id, config.pixel_token_id, image_token}
        if config.num_proposals:
            ids |= {config.region_token_id, config.coordinate_token_id}
        return sorted(ids)

    def decoding_constraints(self, inputs: dict[str, torch.Tensor], rows_per_prompt: int) -> list:
        """With ``config.boxes_from_proposals``, every box an answer writes is one of the proposals the LLM was shown
        (:mod:`~monailabel_evlf.model.proposal_decoding`)."""
        config = self.model.config
        if not (config.num_proposals and config.boxes_from_proposals):
            return []
        proposals, _ = self.model.model.propose(inputs["dense_pixel_values"])
        numbers = box_numbers(proposals.boxes, config.box_grid)
        prompt_length = inputs["input_ids"].shape[1]
        return [ProposalBoxConstraint(self.tokenizer, config.number_token_ids, numbers, prompt_length, rows_per_prompt)]

    @property
    def input_window(self) -> str | None:
        """The window(s) the model was trained on (``EVLFConfig.input_window``), for rendering slices alike."""
        return self.model.config.input_window

    # ----- the detection pixel connector ----------------------------------------------------------------------
    @property
    def has_proposals(self) -> bool:
        """Whether the pixel connector is the detection connector (region proposals as tokens)."""
        return bool(self.model.config.num_proposals)

    def _dense(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.processor.pixel_inputs(list(images))["dense_pixel_values"].to(self.model.device)

    def detector_parameters(self) -> list[torch.nn.Parameter]:
        """The weights that find lesions (pixel encoder + proposal head): what the detection loss trains, and what
        an adapter must carry when corrections teach the model to see something new."""
        names = ("pixel_encoder.", "pixel_connector.modules_to_save", "pixel_connector.head.", "box_refiner.")
        return [
            p
            for name, p in self.peft_model.named_parameters()
            if "original_module" not in name
            and any(key in name for key in names)
            and ("pixel_connector" not in name or ".head." in name)
        ]

    def refiner_parameters(self) -> list[torch.nn.Parameter]:
        """The box refiner's weights among :meth:`detector_parameters` (none for a model without a refiner)."""
        return [
            p
            for name, p in self.peft_model.named_parameters()
            if "box_refiner." in name and "original_module" not in name
        ]

    def detection_loss(
        self, images: Sequence[np.ndarray], targets: Sequence[DetectionTarget], site_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The detection connector's loss terms for slices and their true boxes (fractions of the image)."""
        return self.model.model.detection_loss(self._dense(images), list(targets), site_mask)

    @torch.no_grad()
    def propose(self, images: Sequence[np.ndarray]) -> list[list[Box2D]]:
        """Each slice's region proposals as the LLM reads them: boxes on the model's number grid mapped to pixels,
        best first, scored by the predicted IoU times the centre peak, labelled with the most likely finding."""
        if not self.has_proposals:
            raise ValueError(f"{self.model_id}: no detection pixel connector, so no region proposals")
        proposals, _ = self.model.model.propose(self._dense(images))
        numbers = box_numbers(proposals.boxes, self.model.config.box_grid).cpu().numpy()
        scores = (proposals.scores * proposals.quality).cpu().numpy()
        labels = proposals.label_probs.argmax(-1).cpu().numpy()
        names = self.model.config.finding_labels
        out = []
        for image, rows, row_scores, row_labels in zip(images, numbers, scores, labels, strict=True):
            height, width = np.asarray(image).shape[:2]
            codec = self.box_codec.for_image((width, height))
            out.append(
                [
                    Box2D(*codec.to_pixels(row), names[n], float(p))
                    for row, p, n in zip(rows, row_scores, row_labels, strict=True)
                ]
            )
        return out

    def extra_forward_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Positions counted from the first real token, as ``generate`` does for left-padded prompts."""
        return {"position_ids": (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)}
