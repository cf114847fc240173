"""EVLF configuration: two vision encoders, two connectors and a causal LM, each a Hugging Face sub-config.

Like LLaVA's config, the encoders and the LLM are any ``AutoConfig`` model type, so a real-size EVLF is assembled
from public checkpoints' configs (see docs/models.md) and the tiny test model from small configs of the same classes.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class EVLFConfig(PreTrainedConfig):
    r"""
    disease_config: vision model giving one pooled embedding per image (SigLIP / CLIP vision class).
    pixel_config: vision model giving a feature grid (ViT / DINOv2 class; SAM-style ``(B, C, H, W)`` also works).
    text_config: the causal language model.
    num_disease_tokens: K, the "exemplar" tokens the disease connector makes from the pooled embedding.
    pixel_pool: average-pooling factor over the pixel encoder's grid, bounding the pixel token count.
    disease_token_id / pixel_token_id: placeholder token ids the processor expands and the model fills.
    train_encoders: let the encoders train with the connectors. Off for pretrained encoders (the paper freezes
        them); on only for the from-scratch demo model, whose random encoders have nothing to preserve.
    num_proposals: 0: phi_pixel projects the whole (pooled) grid to tokens. K > 0: phi_pixel is a detection
        connector (monailabel_evlf.model.detection) handing the LLM its top-K region proposals, each as one region
        token followed by the proposal's four box numbers as the LLM's own number-token embeddings.
    finding_labels / finding_sites: the detection connector's label and site classes (lesion kinds, organs).
    region_token_id / coordinate_token_id: the placeholders of a proposal's region token and its four numbers.
    number_token_ids: the token ids of "0".."100" (the box numbers) for the coordinate tokens.
    box_grid: box numbers run 0..box_grid over the image width and height (<= 100, one token each). 100: the
        NORMALIZED_100 convention. The slice size in pixels (e.g. 96): numbers are the rendered slice's own pixel
        edges, so a box on voxel edges is written exactly (a 3-voxel lesion loses ~0.2 IoU to the 0..100 grid).
    boxes_from_proposals: answers write each box as one of the proposals shown to the LLM (constrained decoding,
        :mod:`~monailabel_evlf.model.proposal_decoding`): the LLM chooses, the numbers are copied exactly.
    flip_average: average the proposal maps of the slice and its mirror image (test-time flip) when proposing.
    refine_proposals: a second detector stage (:class:`~monailabel_evlf.model.detection.BoxRefiner`) re-measures
        each proposal's box on the full-resolution input around it before the LLM sees it.
    input_window: how slices were windowed for this model in training (``imaging.windowing.window_channels``
        syntax, e.g. ``"abdomen/liver/40,80"``, one window per RGB channel); the app renders the same way unless
        told otherwise. ``None``: not recorded.
    """

    model_type = "evlf"

    sub_configs_defaults = {  # noqa: RUF012 (the transformers config API)
        "disease_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "pixel_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    disease_config: dict | PreTrainedConfig | None = None
    pixel_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_disease_tokens: int = 4
    pixel_pool: int = 2
    disease_token_id: int = 0
    pixel_token_id: int = 0
    connector_hidden_act: str = "gelu"
    train_encoders: bool = False
    num_proposals: int = 0
    finding_labels: list[str] | None = None
    finding_sites: list[str] | None = None
    region_token_id: int = 0
    coordinate_token_id: int = 0
    number_token_ids: list[int] | None = None
    box_grid: int = 100
    boxes_from_proposals: bool = True
    flip_average: bool = True
    refine_proposals: bool = False
    input_window: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_disease_tokens < 1:
            raise ValueError(f"num_disease_tokens must be >= 1, got {self.num_disease_tokens}")
        if self.pixel_pool < 1:
            raise ValueError(f"pixel_pool must be >= 1, got {self.pixel_pool}")
        grid = self.pixel_grid_size
        if grid % self.pixel_pool:
            raise ValueError(f"pixel encoder grid {grid} is not divisible by pixel_pool {self.pixel_pool}")
        if self.num_proposals < 0:
            raise ValueError(f"num_proposals must be >= 0, got {self.num_proposals}")
        if self.num_proposals and (len(self.number_token_ids or ()) != 101 or not self.finding_labels):
            raise ValueError("a detection pixel connector needs 101 number_token_ids and finding_labels")
        if not 1 <= self.box_grid <= 100:
            raise ValueError(f"box_grid must be 1..100 (one number token each), got {self.box_grid}")
        if self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True

    @property
    def pixel_grid_size(self) -> int:
        """Side of the pixel encoder's patch grid (square inputs)."""
        return int(self.pixel_config.image_size) // int(self.pixel_config.patch_size)

    @property
    def num_pixel_tokens(self) -> int:
        """Pixel tokens per image: ``(grid / pixel_pool) ** 2``, or 5 per proposal (region + four numbers)."""
        if self.num_proposals:
            return 5 * self.num_proposals
        return (self.pixel_grid_size // self.pixel_pool) ** 2


AutoConfig.register("evlf", EVLFConfig, exist_ok=True)

__all__ = ["EVLFConfig"]
