"""Paper sizing of one TRL GRPO step on the 7-8B presets: GPU memory per process, with and without vLLM.

``python -m monailabel_evlf.training.trl_sizing [--slice-px 512] [--check-layer]`` prints the table in
docs/scale.md. Parameter counts are exact: each preset's model is built from its published config on the ``meta``
device (no download, no memory) and our adapter layout is counted on it (LoRA r=8 on the LLM's q/k/v/o, the
connector trained in full through peft's ``modules_to_save``). Activation bytes per token and decoder layer come
from a measurement, not a rule of thumb: ``--check-layer`` runs one full-width decoder layer of each LLM on the CPU
with peft LoRA, bf16, and records every tensor autograd saves for backward (``saved_tensors_hooks``, storages
counted once); without it the numbers measured that way on this code are used (``MEASURED_LAYER_BYTES``).

What is assumed (each is a line in :func:`sizing`): one process per GPU (DDP; ZeRO-2 shards only the few
trainable MB), the default GRPO config (4 prompts x G=8 = 32 completions per step, ``micro_batch_size`` 32, so one
micro-batch of 32 sequences), 64 new tokens, a ~100-token text prompt plus the image tokens of one slice, TRL's fused
LM head (logits in ``4096 x 32768`` fp32 tiles, never whole), the frozen vision tower saving nothing for backward
(no parameter of it trains), 2 GiB of CUDA context and allocator slack, and ``vllm_gpu_memory_utilization`` 0.3 of an
80 GiB GPU in colocate mode (TRL's default fraction).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import AttentionInterface, AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen3VLConfig

GIB = 2**30
LORA_R = 8
LORA_TARGET = re.compile(r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$")
# bytes saved for backward per token and decoder layer, bf16 weights + bf16 autocast, LoRA r=8 on q/k/v/o
# (measured with --check-layer on this code: torch 2.14, peft 0.21, transformers 5.23; CPU, SDPA)
MEASURED_LAYER_BYTES: dict[str, float] = {"qwen2_5_vl": 216_824, "qwen3_vl": 213_928}


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str  # qwen2_5_vl | qwen3_vl
    connector: str  # module trained in full (modules_to_save)
    patch: int  # vision patch size x spatial merge = pixels per image token side
    extra_encoder_params: int = 0  # EVLF: encoders the Qwen config does not hold
    connector_params: int | None = None  # EVLF: its two connectors (estimated); None: counted on the model
    image_tokens: int | None = None  # EVLF: fixed (disease + pixel tokens)


PRESETS = (
    Preset("qwen2_5_vl-7b", "qwen2_5_vl", "merger", 28),
    Preset("qwen3_vl-8b", "qwen3_vl", "merger", 32),
    # evlf-8b: Qwen2.5-7B-Instruct as LLM (the same decoder as Qwen2.5-VL-7B's) + MedSigLIP-448's vision tower
    # (~0.43 B) + DINOv2-base (86 M); 8 disease + 64 pixel tokens per image (configs/models/evlf-8b.yaml); its two
    # MLP connectors (1152 / 4 x 768 -> 3584 -> 3584) estimated at 40 M
    Preset(
        "evlf-8b",
        "qwen2_5_vl",
        "merger",
        28,
        extra_encoder_params=430_000_000 + 86_000_000,
        connector_params=40_000_000,
        image_tokens=72,
    ),
)


def published_config(model_type: str) -> Any:
    """The published architecture of Qwen2.5-VL-7B-Instruct / Qwen3-VL-8B-Instruct (their config.json values)."""
    if model_type == "qwen2_5_vl":
        return Qwen2_5_VLConfig(
            text_config={
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "vocab_size": 152064,
                "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                "tie_word_embeddings": False,
            },
            vision_config={
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 3584,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "fullatt_block_indexes": [7, 15, 23, 31],
            },
            tie_word_embeddings=False,
        )

    return Qwen3VLConfig(
        text_config={
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "out_hidden_size": 4096,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        tie_word_embeddings=False,
    )


def parameter_counts(preset: Preset) -> dict[str, int]:
    """Exact counts on the meta device: whole model, LoRA (r x (in + out) per targeted linear), the connector."""
    config = published_config(preset.model_type)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    lora = sum(
        LORA_R * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and LORA_TARGET.match(name)
    )
    connector = sum(p.numel() for name, p in model.named_parameters() if f".{preset.connector}." in f".{name}")
    vision = sum(p.numel() for name, p in model.named_parameters() if ".visual." in f".{name}")
    if preset.image_tokens is not None:  # EVLF: the Qwen2.5 LLM with its own encoders instead of Qwen's ViT
        vision_and_merger = vision
        total = total - vision_and_merger + preset.extra_encoder_params + preset.connector_params
        vision, connector = preset.extra_encoder_params, preset.connector_params
    text = config.get_text_config()
    return {
        "total": total,
        "vision": vision,
        "lora": lora,
        "connector": connector,
        "layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "kv_bytes_per_token": text.num_hidden_layers * 2 * text.num_key_value_heads * config_head_dim(text) * 2,
        "vocab": text.vocab_size,
    }


def config_head_dim(text: Any) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _flash_like_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention that saves for backward what FlashAttention-2 / SDPA's efficient kernels save on a GPU (q, k, v,
    the output and one log-sum-exp per row), not the ``L x L`` probabilities the math fallback keeps on ``meta``."""

    class Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q).transpose(1, 2).contiguous()  # (batch, tokens, heads, head_dim)
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, _, _ = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    return Flash.apply(query, key, value), None


def measure_layer_bytes(model_type: str, tokens: int = 4096) -> float:
    """Bytes autograd saves per token for one full-width decoder layer with peft LoRA (r=8, q/k/v/o; LoRA weights
    fp32 as peft makes them) and bf16 base weights: run on the ``meta`` device (shapes only, no memory, no time),
    every tensor saved for backward recorded once per storage, weights excluded."""
    AttentionInterface.register("evlf_kernel_like", _flash_like_attention)
    config = published_config(model_type)
    text = config.get_text_config()
    text._attn_implementation = "evlf_kernel_like"
    with torch.device("meta"):
        full = AutoModelForImageTextToText.from_config(config)
        layer_class = type(full.model.language_model.layers[0])
        rotary = type(full.model.language_model.rotary_emb)(text)
        layer = layer_class(text, 0).to(torch.bfloat16)

        class Holder(torch.nn.Module):  # names like the model's, so LORA_TARGET finds q/k/v/o
            def __init__(self) -> None:
                super().__init__()
                self.language_model = torch.nn.ModuleDict({"layer": layer})

        holder = inject_adapter_in_model(
            LoraConfig(r=LORA_R, lora_alpha=16, target_modules=LORA_TARGET.pattern), Holder()
        )
        for name, p in holder.named_parameters():
            p.requires_grad_("lora_" in name)
        hidden = torch.empty(1, tokens, text.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1)
        cos, sin = rotary(hidden, positions)
    weights = {p.untyped_storage()._cdata for p in holder.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        holder.language_model["layer"](hidden, position_embeddings=(cos.to(torch.bfloat16), sin.to(torch.bfloat16)))
    return sum(saved.values()) / tokens


def sizing(preset: Preset, counts: dict[str, int], layer_bytes: float, slice_px: int, gpu_gib: float = 80.0):
    """GiB per GPU for one GRPO step, each term separately (module docstring for the assumptions)."""
    completions, micro, new_tokens, text_tokens = 32, 32, 64, 100
    image_tokens = preset.image_tokens or (slice_px // preset.patch) ** 2
    seq = text_tokens + image_tokens + new_tokens
    tokens = micro * seq
    weights_bf16 = counts["total"] * 2
    connector_copy = counts["connector"] * 2  # modules_to_save: a trainable copy beside the frozen original
    trainable = counts["lora"] + counts["connector"]
    optimiser = trainable * (4 + 4 + 8)  # fp32 param (LoRA), grad, Adam m + v: upper bound for the bf16 copy
    layer_input = counts["hidden"] * 2  # what gradient checkpointing keeps per token and layer (bf16)
    acts_full = tokens * layer_bytes * counts["layers"]
    acts_ckpt = tokens * (layer_input * counts["layers"] + layer_bytes)  # + one layer recomputed in backward
    working = 2 * tokens * counts["hidden"] * 2 * 4  # transient outputs / grads of the layer being run (rough)
    head = min(completions * new_tokens, 4096) * 32768 * 4  # TRL's fused LM head tile (fp32)
    kv = completions * seq * counts["kv_bytes_per_token"]  # transformers generate: the whole generation batch
    fixed = weights_bf16 + connector_copy + optimiser + 2 * GIB
    train_ckpt = fixed + acts_ckpt + working + head
    train_full = fixed + acts_full + working + head
    generate = fixed + kv
    vllm = 0.3 * gpu_gib * GIB
    return {
        "seq": seq,
        "weights": weights_bf16 / GIB,
        "trainable_M": trainable / 1e6,
        "optimiser": (optimiser + connector_copy) / GIB,
        "acts_ckpt": acts_ckpt / GIB,
        "acts_full": acts_full / GIB,
        "kv": kv / GIB,
        "ckpt": max(train_ckpt, generate) / GIB,
        "no_ckpt": max(train_full, generate) / GIB,
        "ckpt_vllm_colocate": (max(train_ckpt, generate - kv) + vllm) / GIB,
        "ckpt_vllm_server": train_ckpt / GIB,
        "vllm_server_gpu": (weights_bf16 + 2 * GIB + kv) / GIB,
        "fp32_weights_extra": weights_bf16 / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slice-px", type=int, default=512, help="slice width = height in pixels (default 512)")
    parser.add_argument("--check-layer", action="store_true", help="measure the per-layer bytes here (CPU, ~1 min)")
    args = parser.parse_args(argv)
    layer_bytes = dict(MEASURED_LAYER_BYTES)
    if args.check_layer or not layer_bytes:
        for model_type in ("qwen2_5_vl", "qwen3_vl"):
            layer_bytes[model_type] = measure_layer_bytes(model_type)
            print(f"measured {model_type}: {layer_bytes[model_type]:.0f} B saved per token and decoder layer")
    print(
        "| preset | params B | LoRA+connector M | seq tokens | weights bf16 | activations ckpt / none | KV (gen) "
        "| per GPU: ckpt | no ckpt | ckpt + vLLM colocate | ckpt, vLLM server (+ its GPU) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset in PRESETS:
        counts = parameter_counts(preset)
        s = sizing(preset, counts, layer_bytes[preset.model_type], args.slice_px)
        print(
            f"| {preset.name} | {counts['total'] / 1e9:.2f} | {s['trainable_M']:.1f} | {s['seq']} "
            f"| {s['weights']:.1f} | {s['acts_ckpt']:.1f} / {s['acts_full']:.1f} | {s['kv']:.1f} "
            f"| {s['ckpt']:.0f} | {s['no_ckpt']:.0f} | {s['ckpt_vllm_colocate']:.0f} "
            f"| {s['ckpt_vllm_server']:.0f} (+{s['vllm_server_gpu']:.0f}) |"
        )
    print(
        f"GiB per GPU, {args.slice_px} px slices; fp32 base weights (evlf train's default --dtype float32) add "
        "the weights again"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
