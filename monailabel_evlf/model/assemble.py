"""Assemble a real-size EVLF from public checkpoints: pretrained encoders + pretrained LLM + fresh connectors.

The result is an ordinary EVLF directory (safetensors, tokenizer with the image placeholder and reasoning tokens,
processor with each encoder's own normalisation) that ``EVLFBackend.from_pretrained`` serves and stage-1 training
(connectors + LoRA) makes useful. The prompt format is the processor's Qwen-style chat template (``<|im_start|>``
turns), right for Qwen2.5 LLMs; edit ``chat_template.jinja`` in the output for another LLM family. Hub ids resolve
through ``from_pretrained``; ``local_files_only=True`` (default) uses only what is already in the Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from monailabel_evlf.model.backends.base import resolve_dtype
from monailabel_evlf.model.configuration_evlf import EVLFConfig
from monailabel_evlf.model.modeling_evlf import EVLFDiseaseConnector, EVLFForConditionalGeneration, EVLFPixelConnector
from monailabel_evlf.model.processing_evlf import DISEASE_TOKEN, IMAGE_TOKEN, PIXEL_TOKEN, EVLFProcessor
from monailabel_evlf.model.tiny import REASONING_TOKENS


def _vision_config(name: str, load: dict[str, Any]):
    """A vision tower's config; dual-encoder checkpoints (CLIP, SigLIP) contribute their ``vision_config``."""
    config = AutoConfig.from_pretrained(name, **load)
    return getattr(config, "vision_config", config)


def _image_stats(name: str, load: dict[str, Any]) -> tuple[list[float], list[float]]:
    processor = AutoImageProcessor.from_pretrained(name, **load)
    return list(processor.image_mean), list(processor.image_std)


def assemble_evlf(
    disease_encoder: str,
    pixel_encoder: str,
    language_model: str,
    out_dir: str | Path,
    *,
    num_disease_tokens: int = 8,
    pixel_pool: int = 2,
    dtype: str = "bfloat16",
    local_files_only: bool = True,
    trust_remote_code: bool = False,
) -> Path:
    """Write an EVLF checkpoint to ``out_dir`` from three pretrained components; returns ``out_dir``."""
    load = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    torch_dtype = resolve_dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(language_model, **load)
    tokenizer.add_tokens([IMAGE_TOKEN, DISEASE_TOKEN, PIXEL_TOKEN], special_tokens=True)
    tokenizer.add_tokens([t for t in REASONING_TOKENS if t not in tokenizer.get_vocab()])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = EVLFConfig(
        disease_config=_vision_config(disease_encoder, load),
        pixel_config=_vision_config(pixel_encoder, load),
        text_config=AutoConfig.from_pretrained(language_model, **load),
        num_disease_tokens=num_disease_tokens,
        pixel_pool=pixel_pool,
        disease_token_id=tokenizer.convert_tokens_to_ids(DISEASE_TOKEN),
        pixel_token_id=tokenizer.convert_tokens_to_ids(PIXEL_TOKEN),
    )
    with torch.device("meta"):  # skeleton only: every part is replaced below, so nothing is initialised twice
        model = EVLFForConditionalGeneration(config)
    body = model.model
    body.disease_encoder = AutoModel.from_pretrained(
        disease_encoder, config=config.disease_config, dtype=torch_dtype, **load
    )
    body.pixel_encoder = AutoModel.from_pretrained(pixel_encoder, config=config.pixel_config, dtype=torch_dtype, **load)
    llm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch_dtype, **load)
    llm.resize_token_embeddings(len(tokenizer))
    body.language_model, model.lm_head = llm.model, llm.lm_head
    config.text_config.vocab_size = len(tokenizer)
    body.disease_connector = EVLFDiseaseConnector(config).to(torch_dtype)
    body.pixel_connector = EVLFPixelConnector(config).to(torch_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>") or tokenizer.eos_token_id
    disease_mean, disease_std = _image_stats(disease_encoder, load)
    pixel_mean, pixel_std = _image_stats(pixel_encoder, load)
    processor = EVLFProcessor.for_config(
        tokenizer,
        config,
        disease_mean=disease_mean,
        disease_std=disease_std,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
