"""A real-size EVLF is assembled from pretrained parts; here the parts are tiny local checkpoints."""

from __future__ import annotations

import torch
from transformers import (
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from monailabel_evlf.model import load_backend
from monailabel_evlf.model.assemble import assemble_evlf
from monailabel_evlf.model.modeling_evlf import EVLFForConditionalGeneration
from monailabel_evlf.model.tiny import build_tokenizer


def test_assembled_model_keeps_every_pretrained_weight(tmp_path, rgb_images):
    torch.manual_seed(0)
    vision = {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 32, "patch_size": 8}
    siglip = SiglipVisionModel(SiglipVisionConfig(**vision, intermediate_size=64, image_size=32))
    dinov2 = Dinov2Model(Dinov2Config(**vision, mlp_ratio=2, image_size=64))
    tokenizer = build_tokenizer()
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for name, model, processor in (
        ("siglip", siglip, SiglipImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)),
        ("dinov2", dinov2, BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
        ("llm", llm, tokenizer),
    ):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)

    out = assemble_evlf(
        str(tmp_path / "siglip"),
        str(tmp_path / "dinov2"),
        str(tmp_path / "llm"),
        tmp_path / "evlf",
        num_disease_tokens=2,
        pixel_pool=4,
        dtype="float32",
    )
    body = EVLFForConditionalGeneration.from_pretrained(out).model
    for part, original in (
        (body.disease_encoder, siglip),
        (body.pixel_encoder, dinov2),
        (body.language_model, llm.model),
    ):
        loaded = part.state_dict()
        for key, value in original.state_dict().items():
            if key != "embed_tokens.weight":  # grown by the 3 placeholder tokens
                torch.testing.assert_close(loaded[key], value, msg=key)
    grown = body.language_model.embed_tokens.weight
    torch.testing.assert_close(grown[: len(tokenizer)], llm.model.embed_tokens.weight[: len(tokenizer)])
    backend = load_backend("evlf", str(out))
    assert backend.processor.pixel_mean == [0.485, 0.456, 0.406] and backend.processor.num_pixel_tokens == 4
    answers = backend.generate(rgb_images, ["where?", "what?"])
    assert len(answers) == 2
