"""The part every Hugging Face backend shares: chat prompts, batched ``generate``, completion log-probs and the
peft LoRA adapter (trainable-parameter policy, reference policy, safetensors save / load).

Subclasses say which model class to load, where LoRA goes, which modules are "connectors" (fully trained and
saved with the adapter through peft's ``modules_to_save``), and how their answers write boxes (``box_codec``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

from monailabel_evlf.model.backend import CompletionLogprobs, SamplingConfig
from monailabel_evlf.parsing import parse_bool
from monailabel_evlf.tasks.box_codec import BoxCodec

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parse_names(name: str, value: Any) -> tuple[str, ...]:
    """A comma-separated string (as MONAI Label ``--conf`` passes it) or a sequence of module names."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(item).strip() for item in items if str(item).strip())
    if not names:
        raise ValueError(f"backend option {name}={value!r} names no module")
    return names


# Options every HF backend accepts (strings from ``--conf backend.<key>`` are converted here).
OPTION_PARSERS = {
    "lora_r": lambda name, v: int(v),
    "lora_alpha": lambda name, v: float(v),
    "lora_dropout": lambda name, v: float(v),
    "lora_seed": lambda name, v: None if v is None or str(v).lower() == "none" else int(v),
    "lora_target_modules": lambda name, v: str(v),
    "extra_trainable": _parse_names,
    "system_prompt": lambda name, v: str(v),
    "local_files_only": lambda name, v: parse_bool(v, f"backend.{name}"),
}


def parse_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate and convert backend options; unknown keys raise a ValueError naming them."""
    unknown = sorted(set(options) - set(OPTION_PARSERS))
    if unknown:
        raise ValueError(f"unknown backend option(s) {unknown}; known: {sorted(OPTION_PARSERS)}")
    parsed = {}
    for key, value in options.items():
        try:
            parsed[key] = OPTION_PARSERS[key](key, value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"backend option {key}={value!r}: {exc}") from exc
    return parsed


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class HFVLMBackend:
    """A ``transformers`` image-text-to-text model + processor behind the :class:`VLMBackend` protocol."""

    box_codec: BoxCodec  # a class attribute, or a property where the codec needs the processor's resize rule
    model_class: ClassVar[type] = AutoModelForImageTextToText
    # regex over module names: LoRA on the language model's attention projections only
    default_lora_target_modules: ClassVar[str] = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    default_connectors: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        model_id: str,
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: str | None = None,
        lora_seed: int | None = 0,
        extra_trainable: Sequence[str] = (),
        system_prompt: str | None = None,
    ) -> None:
        self.model_id = model_id
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"{model_id}: the tokenizer has no pad token (needed for batched generation)")
        self.system_prompt = system_prompt
        self.lora_config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=lora_target_modules or self.default_lora_target_modules,
            modules_to_save=[*self.connector_modules(model), *extra_trainable] or None,
        )
        # get_peft_model freezes every base weight; LoRA and modules_to_save copies are the only trainable ones.
        # LoRA A starts random: from ``lora_seed`` (the global stream untouched), so that the same corrections give
        # the same adapter in every process (the app's train child, the benchmark, a rerun); None: the global stream
        with torch.random.fork_rng(devices=[], enabled=lora_seed is not None):
            if lora_seed is not None:
                torch.manual_seed(lora_seed)
            self.peft_model: PeftModel = get_peft_model(model, self.lora_config)
        self.model = self.peft_model.base_model.model  # LoRA layers live inside it; generate() is the HF one
        self.model.eval()
        self._initial_state = {k: v.detach().clone() for k, v in self._adapter_state().items()}

    # ----- construction -------------------------------------------------------------------------------------
    def connector_modules(self, model: torch.nn.Module) -> tuple[str, ...]:
        """Modules trained in full next to LoRA (the vision-language connectors)."""
        return self.default_connectors

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        adapter: str | Path | None = None,
        **options: Any,
    ) -> HFVLMBackend:
        """Load model + processor from a local directory or hub id, wrap it with LoRA, optionally load an adapter.

        ``local_files_only`` (default True) keeps loading offline; set it False to let ``transformers`` fetch a hub
        id. Remote code runs only with ``trust_remote_code=True``.
        """
        options = parse_options(options)
        local_files_only = options.pop("local_files_only", True)
        load = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
        try:
            model = cls.model_class.from_pretrained(name_or_path, dtype=resolve_dtype(dtype), **load)
            processor = AutoProcessor.from_pretrained(name_or_path, **load)
        except OSError as exc:
            raise ValueError(
                f"cannot load model {name_or_path!r} (local_files_only={local_files_only}): {exc}"
            ) from exc
        backend = cls(model.to(device), processor, model_id=str(name_or_path), **options)
        if adapter is not None:
            backend.load_adapter(Path(adapter))
        return backend

    # ----- prompts ------------------------------------------------------------------------------------------
    def chat_text(self, prompt: str) -> str:
        """The chat-formatted prompt for one image and one user turn, ending where the assistant answers."""
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def model_inputs(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Processor output for a batch, prompts left-padded so every answer starts at the same column."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        inputs = self.processor(
            images=[self.prepare_image(image) for image in images],
            text=[self.chat_text(p) for p in prompts],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        return {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def prepare_image(self, image: np.ndarray) -> Any:
        """What the processor takes as an image (HF VLM processors: RGB uint8)."""
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {array.dtype} {array.shape}")
        return array

    # ----- protocol -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        n: int = 1,
        sampling: SamplingConfig | None = None,
    ) -> list[list[str]]:
        """One ``model.generate`` call for the whole batch (KV cache, one forward per new token for all rows)."""
        sampling = sampling or SamplingConfig()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts and not images:
            return []
        inputs = self.model_inputs(images, prompts)
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "do_sample": sampling.do_sample,
            "num_return_sequences": n if sampling.do_sample else 1,  # greedy answers are identical: decode once
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.stop_token_ids(),
        }
        if suppressed := self.suppressed_token_ids():
            kwargs["suppress_tokens"] = suppressed
        if constraints := self.decoding_constraints(inputs, kwargs["num_return_sequences"]):
            kwargs["logits_processor"] = LogitsProcessorList(constraints)
        if sampling.do_sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        seeded = sampling.seed is not None
        with torch.random.fork_rng(devices=[]) if seeded else nullcontext():
            if seeded:
                torch.manual_seed(sampling.seed)
            output = self.model.generate(**inputs, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if not sampling.do_sample:
            return [[text] * n for text in texts]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    def suppressed_token_ids(self) -> list[int]:
        """Tokens an answer must never contain (image placeholders); none by default."""
        return []

    def decoding_constraints(self, inputs: dict[str, torch.Tensor], rows_per_prompt: int) -> list[LogitsProcessor]:
        """Logits processors for this batch's ``generate`` (``rows_per_prompt`` rows per prompt); none by default."""
        return []

    def stop_token_ids(self) -> list[int]:
        """Token ids that end an answer: the end-of-turn token (and the tokenizer's eos if different)."""
        return sorted({i for i in (self.tokenizer.eos_token_id, self.end_of_turn_id()) if i is not None})

    def completion_logprobs(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], completions: Sequence[str]
    ) -> CompletionLogprobs:
        """Log-probs of each completion's tokens plus the end-of-turn token (so stopping is learned too).

        Sequences are ``[left pad | prompt | completion | right pad]``; only the completion positions get logits
        (``logits_to_keep``), which keeps the vocabulary projection small.
        """
        if len(completions) != len(prompts):
            raise ValueError(f"{len(completions)} completions for {len(prompts)} prompts")
        inputs = self.model_inputs(images, prompts)
        end = self.end_of_turn_id()
        encoded = [self.tokenizer(c, add_special_tokens=False)["input_ids"] + [end] for c in completions]
        length = max(len(ids) for ids in encoded)
        device = inputs["input_ids"].device
        completion_ids = torch.full(
            (len(encoded), length), self.tokenizer.pad_token_id, dtype=torch.long, device=device
        )
        mask = torch.zeros((len(encoded), length), dtype=torch.long, device=device)
        for row, ids in enumerate(encoded):
            completion_ids[row, : len(ids)] = torch.tensor(ids, device=device)
            mask[row, : len(ids)] = 1
        prompt_shape = inputs["input_ids"].shape
        for key, value in inputs.items():  # per-token side inputs (e.g. mm_token_type_ids): completions are text, 0
            side_input = key not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor)
            if side_input and value.shape == prompt_shape:
                inputs[key] = torch.cat([value, torch.zeros_like(completion_ids)], dim=1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], mask], dim=1)
        inputs.update(self.extra_forward_inputs(inputs))
        logits = self.model(**inputs, logits_to_keep=length + 1, use_cache=False).logits[:, :-1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        return CompletionLogprobs(logprobs=logprobs * mask, mask=mask.bool())

    def end_of_turn_id(self) -> int:
        """The chat template's end-of-turn token (``<|im_end|>`` in Qwen-style templates), else eos."""
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            return end_of_turn
        return self.tokenizer.eos_token_id

    def extra_forward_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs a plain forward needs that ``generate`` derives itself (none by default)."""
        return {}

    def reference_policy(self) -> AbstractContextManager[None]:
        """peft's ``disable_adapter()``: LoRA off and connectors back to their base weights, no model copy."""
        return self.peft_model.disable_adapter()

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.peft_model.parameters() if p.requires_grad)

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.peft_model.named_parameters() if p.requires_grad}

    def save_adapter(self, directory: Path) -> None:
        """peft's adapter layout: ``adapter_model.safetensors`` (LoRA + connectors) and ``adapter_config.json``."""
        self.peft_model.save_pretrained(str(directory), safe_serialization=True)

    @torch.no_grad()
    def load_adapter(self, directory: Path | None) -> None:
        """Reset to the base weights, then load ``directory``'s adapter (same LoRA layout required)."""
        state = self._adapter_state()
        for name, value in self._initial_state.items():
            state[name].copy_(value)
        if directory is None:
            return
        directory = Path(directory)
        weights, config_path = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
        if not weights.is_file() or not config_path.is_file():
            raise ValueError(f"{directory} is not an adapter directory (needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
        saved = json.loads(config_path.read_text())
        for key in ("r", "target_modules", "modules_to_save"):
            mine = getattr(self.lora_config, key)
            mine = sorted(mine) if isinstance(mine, set | list) else mine
            theirs = sorted(saved.get(key) or []) if isinstance(saved.get(key), list) else saved.get(key)
            if (mine or None) != (theirs or None):
                raise ValueError(f"adapter {directory}: {key}={theirs!r} does not match this model's {mine!r}")
        result = set_peft_model_state_dict(self.peft_model, load_file(str(weights)))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"adapter {directory} has weights this model lacks: {unexpected[:5]}")

    def train(self, mode: bool = True) -> HFVLMBackend:
        self.model.train(mode)
        return self

    def eval(self) -> HFVLMBackend:
        return self.train(False)
