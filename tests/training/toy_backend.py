"""A VLMBackend small enough to learn in a few steps: answers are fixed-length strings over {"a", "b"}.

Per-position logits = frozen base + a trainable "adapter" delta; the reference policy zeroes the delta, like
peft's ``disable_adapter()``. Images are ignored.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from monailabel_evlf.model.backend import CompletionLogprobs, SamplingConfig
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention

ALPHABET = "ab"


class ToyBackend(torch.nn.Module):
    model_id = "toy"
    box_codec = BoxCodec(BoxConvention.NORMALIZED_100)

    def __init__(self, length: int = 6, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.base = torch.nn.Parameter(
            torch.randn(length, len(ALPHABET), generator=generator) * 0.1, requires_grad=False
        )
        self.delta = torch.nn.Parameter(torch.zeros(length, len(ALPHABET)))
        self._adapter_on = True

    def logits(self) -> torch.Tensor:
        return self.base + (self.delta if self._adapter_on else 0.0)

    def generate(self, images, prompts, n=1, sampling=None):
        sampling = sampling or SamplingConfig()
        generator = torch.Generator().manual_seed(sampling.seed or 0)
        probs = torch.softmax(self.logits().detach() / sampling.temperature, dim=-1)
        out = []
        for _ in prompts:
            if sampling.do_sample:
                tokens = torch.multinomial(probs, n, replacement=True, generator=generator).T
            else:
                tokens = probs.argmax(-1).expand(n, -1)
            out.append(["".join(ALPHABET[t] for t in row) for row in tokens.tolist()])
        return out

    def completion_logprobs(self, images, prompts, completions):
        logp = torch.log_softmax(self.logits(), dim=-1)
        index = torch.tensor([[ALPHABET.index(c) for c in text] for text in completions])
        positions = torch.arange(index.shape[1]).expand_as(index)
        return CompletionLogprobs(logprobs=logp[positions, index], mask=torch.ones_like(index))

    @contextmanager
    def reference_policy(self):
        self._adapter_on = False
        try:
            yield
        finally:
            self._adapter_on = True

    def trainable_parameters(self):
        return iter([self.delta])

    def save_adapter(self, directory: Path) -> None:
        save_file({"delta": self.delta.detach().contiguous()}, str(Path(directory) / "adapter_model.safetensors"))

    def load_adapter(self, directory: Path | None) -> None:
        with torch.no_grad():
            if directory is None:
                self.delta.zero_()
            else:
                self.delta.copy_(load_file(str(Path(directory) / "adapter_model.safetensors"))["delta"])
