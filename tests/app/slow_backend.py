"""The ground-truth oracle, slowed down: each ``generate`` call sleeps like a real model's forward pass, so tests
can see whether the server still answers other requests while inference runs."""

from __future__ import annotations

import time

from tests.app.gt_backend import GroundTruthBackend


class SlowBackend(GroundTruthBackend):
    def __init__(self, dataset_dir, window: str = "abdomen", delay: str = "0.2") -> None:
        super().__init__(dataset_dir, window)
        self.delay = float(delay)
        self.model_id = f"slow-{self.model_id}"

    def generate(self, images, prompts, n=1, sampling=None):
        time.sleep(self.delay)
        return super().generate(images, prompts, n, sampling)
