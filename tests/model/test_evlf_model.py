"""The EVLF Hugging Face trio: config / model / processor round trips, generate, placeholders, image inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from monailabel_evlf.model.configuration_evlf import EVLFConfig
from monailabel_evlf.model.modeling_evlf import EVLFForConditionalGeneration
from monailabel_evlf.model.processing_evlf import EVLFProcessor, image_to_float_rgb


@pytest.fixture(scope="module")
def evlf(tiny_dirs):
    path = tiny_dirs["evlf"]
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def chat(processor, text: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_auto_classes_resolve_the_saved_directory(tiny_dirs, evlf):
    model, processor = evlf
    config = AutoConfig.from_pretrained(tiny_dirs["evlf"])
    assert isinstance(config, EVLFConfig) and isinstance(model, EVLFForConditionalGeneration)
    assert isinstance(processor, EVLFProcessor)
    assert (tiny_dirs["evlf"] / "model.safetensors").is_file()
    # 64 px / 8 px patches = 8 x 8 grid, pooled by 2 -> 16 pixel tokens; processor agrees with the config
    assert config.num_pixel_tokens == 16 and processor.num_pixel_tokens == 16
    assert processor.num_disease_tokens == config.num_disease_tokens == 4


def test_config_rejects_a_pool_that_does_not_divide_the_grid():
    with pytest.raises(ValueError, match="pixel_pool"):
        EVLFConfig(pixel_config={"model_type": "dinov2", "image_size": 64, "patch_size": 8}, pixel_pool=3)


def test_save_load_round_trip_gives_equal_outputs(evlf, rgb_images, tmp_path):
    model, processor = evlf
    inputs = processor(images=rgb_images, text=[chat(processor, "a"), chat(processor, "where is it")])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    again = AutoProcessor.from_pretrained(tmp_path)(
        images=rgb_images, text=[chat(processor, "a"), chat(processor, "where is it")]
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reloaded(**again).logits)


def test_image_features_reach_the_logits(evlf, rgb_images):
    model, processor = evlf
    text = [chat(processor, "x")]
    with torch.no_grad():
        first = model(**processor(images=rgb_images[:1], text=text)).logits
        second = model(**processor(images=rgb_images[1:], text=text)).logits
    assert not torch.allclose(first[:, -1], second[:, -1])


def test_generate_shapes_and_stop_at_max_new_tokens(evlf, rgb_images):
    model, processor = evlf
    inputs = processor(images=rgb_images, text=[chat(processor, "a"), chat(processor, "a longer question")])
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=True, num_return_sequences=2)
    assert out.shape == (4, inputs["input_ids"].shape[1] + 5)


def test_placeholder_count_mismatch_is_an_error(evlf, rgb_images):
    model, processor = evlf
    with pytest.raises(ValueError, match="placeholders"):
        processor(images=rgb_images, text=[chat(processor, "one image only")])
    inputs = processor(images=rgb_images[:1], text=[chat(processor, "x")])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_numbers_and_reasoning_tags_are_single_tokens(evlf):
    tokenizer = evlf[1].tokenizer
    for text in ("0", "7", "42", "100", "<think>", "</think>", "<answer>", "</answer>"):
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1, text
    ids = tokenizer('{"bbox_2d": [12, 40, 55, 100]}', add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == '{"bbox_2d": [12, 40, 55, 100]}'


def test_image_dtypes_map_to_the_same_float_image():
    gray8 = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    expected = torch.tensor([[0.0, 1.0], [0.2, 0.4]]).expand(3, 2, 2)
    torch.testing.assert_close(image_to_float_rgb(gray8), expected)
    torch.testing.assert_close(image_to_float_rgb(gray8.astype(np.uint16) * 257), expected)
    torch.testing.assert_close(image_to_float_rgb(gray8.astype(np.float32) / 255), expected)
    torch.testing.assert_close(image_to_float_rgb(np.repeat(gray8[..., None], 3, axis=-1)), expected)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((4, 4), dtype=np.int16), "int16"),
        (np.full((4, 4), 2.0, dtype=np.float32), "window"),
        (np.full((4, 4), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "shape"),
    ],
)
def test_bad_images_are_refused(image, match):
    with pytest.raises(ValueError, match=match):
        image_to_float_rgb(image)
