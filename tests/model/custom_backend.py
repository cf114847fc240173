"""A user's own backend, loaded by import path ``tests.model.custom_backend:EchoBackend``."""

from __future__ import annotations

from contextlib import nullcontext

from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention


class EchoBackend:
    box_codec = BoxCodec(BoxConvention.NORMALIZED_1000)

    def __init__(self, model_id: str, greeting: str) -> None:
        self.model_id = model_id
        self.greeting = greeting

    @classmethod
    def from_pretrained(
        cls, name_or_path, *, device="cpu", dtype="float32", trust_remote_code=False, adapter=None, greeting="hello"
    ):
        return cls(str(name_or_path), greeting)

    def generate(self, images, prompts, n=1, sampling=None):
        return [[f"<think>{self.greeting}</think><answer>{p}</answer>"] * n for p in prompts]

    def completion_logprobs(self, images, prompts, completions):
        raise NotImplementedError

    def reference_policy(self):
        return nullcontext()

    def trainable_parameters(self):
        return iter(())

    def save_adapter(self, directory):
        pass

    def load_adapter(self, directory):
        pass

    def train(self, mode=True):
        return self

    def eval(self):
        return self
