"""Offline builders for tiny models with random weights: what tests, the ``tiny`` preset and the demo model start from.

Nothing here downloads anything: tokenizers are trained in memory with the ``tokenizers`` library on a small
built-in corpus, models are built from small configs of the same Hugging Face classes the real sizes use, and
everything is saved with ``save_pretrained`` so loading goes through the ordinary ``from_pretrained`` path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Dinov2Config,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipVisionConfig,
)

from monailabel_evlf.data.phantoms import LESION_KINDS, NORMAL_LABEL, ORGANS
from monailabel_evlf.model.configuration_evlf import EVLFConfig
from monailabel_evlf.model.dense_encoder import EVLFDenseEncoderConfig
from monailabel_evlf.model.modeling_evlf import EVLFForConditionalGeneration
from monailabel_evlf.model.processing_evlf import (
    CHAT_TEMPLATE,
    COORD_TOKEN,
    DISEASE_TOKEN,
    IMAGE_TOKEN,
    PIXEL_TOKEN,
    REGION_TOKEN,
    EVLFProcessor,
)

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
# Answer-structure tags and the NORMALIZED_100 box numbers are single tokens: short, unambiguous box answers.
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
NUMBER_TOKENS = tuple(str(n) for n in range(101))

_CORPUS = (
    "You are a radiology assistant. Look at the CT slice and answer the question.",
    "Think step by step inside <think> </think>, then give the final answer inside <answer> </answer>.",
    "What is the most likely diagnosis? Choose one of the labels. Locate the lesion and give its bounding box.",
    'Answer with JSON: {"label": "cyst", "bbox_2d": [x1, y1, x2, y2]} in coordinates from 0 to 100.',
    "The image shows a well-defined round hypodense lesion in the liver with no enhancement.",
    "There is a hyperdense focus in the spleen. A ring-enhancing lesion is seen in the right kidney.",
    "No focal abnormality is visible; the organs appear normal. Is there a lesion? yes no",
    "Modality CT MR axial coronal sagittal slice image left right anterior posterior superior inferior",
    "Find the region that matches the description and report it. The answer is the label of the finding.",
    "Is there a lesion in this slice? In which organ is the lesion? On which side? How many lesions are there?",
    "How large is it? about 5 10 15 20 25 30 35 40 mm under over to Which kind of lesion? Where within the organ?",
    "upper lower part medial lateral anterior posterior central What is the modality? In which plane? axial",
    "no finding No focal lesion is seen in this slice.",
)


def _corpus() -> list[str]:
    words = [*LESION_KINDS, *ORGANS, NORMAL_LABEL]
    return [*_CORPUS, " ".join(words), *(f"a {kind} in the {organ}" for kind in LESION_KINDS for organ in ORGANS)]


def build_tokenizer(
    extra_special_tokens: tuple[str, ...] = (),
    vocab_size: int = 600,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory, with special tokens, reasoning tags and 0..100 as tokens.

    Byte-level BPE encodes any text (nothing is ever "unknown"); the small corpus only decides which merges exist.
    """
    specials = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN, *extra_special_tokens]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in (*REASONING_TOKENS, *NUMBER_TOKENS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=list(extra_special_tokens),
        padding_side="left",
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_evlf(
    out_dir: str | Path | None = None,
    *,
    image_size: int = 64,
    disease_image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_disease_tokens: int = 4,
    pixel_pool: int = 2,
    train_encoders: bool = False,
    num_proposals: int = 0,
    box_grid: int = 100,
    refine_proposals: bool = False,
    dense_channels: tuple[int, int, int] = (16, 32, 64),
    dense_hidden_size: int = 48,
    num_heads: int = 4,
    seed: int = 0,
):
    """A tiny EVLF (SigLIP-vision disease encoder, Qwen2 LLM, all random) and its processor.

    The pixel encoder is a tiny DINOv2 with the grid connector (``num_proposals=0``), or with ``num_proposals`` K > 0
    the stride-2 convolutional encoder (:mod:`~monailabel_evlf.model.dense_encoder`, input ``image_size`` px) with the
    detection connector over the phantoms' lesion kinds and organs (with ``refine_proposals``, its second-stage box
    refiner); its box numbers run 0..``box_grid``. With
    ``out_dir`` both are saved there (safetensors) and reloadable with ``from_pretrained``. Returns
    ``(model, processor)``.
    """
    placeholders = (IMAGE_TOKEN, DISEASE_TOKEN, PIXEL_TOKEN, REGION_TOKEN, COORD_TOKEN)
    tokenizer = build_tokenizer(placeholders, chat_template=CHAT_TEMPLATE)
    vision = {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 32, "patch_size": patch_size}
    if num_proposals:
        pixel_config = EVLFDenseEncoderConfig(
            image_size=image_size, stage_channels=list(dense_channels), hidden_size=dense_hidden_size
        )
        detection = {
            "num_proposals": num_proposals,
            "finding_labels": list(LESION_KINDS),
            "finding_sites": list(ORGANS),
            "region_token_id": tokenizer.convert_tokens_to_ids(REGION_TOKEN),
            "coordinate_token_id": tokenizer.convert_tokens_to_ids(COORD_TOKEN),
            "number_token_ids": tokenizer.convert_tokens_to_ids(list(NUMBER_TOKENS)),
            "box_grid": box_grid,
            "refine_proposals": refine_proposals,
        }
    else:
        pixel_config, detection = Dinov2Config(**vision, mlp_ratio=2, image_size=image_size), {}
    config = EVLFConfig(
        disease_config=SiglipVisionConfig(**vision, intermediate_size=64, image_size=disease_image_size),
        pixel_config=pixel_config,
        **detection,
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        num_disease_tokens=num_disease_tokens,
        pixel_pool=pixel_pool,
        disease_token_id=tokenizer.convert_tokens_to_ids(DISEASE_TOKEN),
        pixel_token_id=tokenizer.convert_tokens_to_ids(PIXEL_TOKEN),
        train_encoders=train_encoders,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = EVLFForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = EVLFProcessor.for_config(tokenizer, config)
    if out_dir is not None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# The Qwen-VL chat layout; an image part becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor
# expands to one <|image_pad|> per merged patch.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_vl_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _tiny_text_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _save_vlm(model, processor, tokenizer, out_dir):
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if out_dir is not None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model.eval(), processor


def build_tiny_qwen2_5_vl(out_dir: str | Path | None = None, *, hidden_size: int = 32, seed: int = 0):
    """A Qwen2.5-VL of about 0.1 M parameters with random weights and its processor (images kept small:
    at most 56 x 56 px after smart_resize). Returns ``(model, processor)``."""
    tokenizer = build_tokenizer(QWEN_VISION_TOKENS, chat_template=QWEN_VL_CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config={
            **_tiny_text_config(tokenizer, hidden_size),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [0],
            "window_size": 56,
        },
        **_qwen_vl_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),  # transformers 5.23 wants one even for image-only use
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    return _save_vlm(model, processor, tokenizer, out_dir)


def build_tiny_qwen3_vl(out_dir: str | Path | None = None, *, hidden_size: int = 32, seed: int = 0):
    """A Qwen3-VL (0..1000 box grid) with random weights and its processor; images at most 64 x 64 px."""
    tokenizer = build_tokenizer(QWEN_VISION_TOKENS, chat_template=QWEN_VL_CHAT_TEMPLATE)
    config = Qwen3VLConfig(
        text_config={
            **_tiny_text_config(tokenizer, hidden_size),
            "head_dim": 16,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        **_qwen_vl_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=16, merge_size=2)
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    return _save_vlm(model, processor, tokenizer, out_dir)
