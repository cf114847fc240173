"""``evlf bench infer`` mechanics on the oracle backend (the real numbers come from running it on a model)."""

from __future__ import annotations

import argparse

import pytest

from monailabel_evlf.app.bench import bench_batching, format_report, register
from monailabel_evlf.data.phantoms import make_phantom
from monailabel_evlf.imaging.volume import Volume
from monailabel_evlf.inference import PipelineConfig, VolumePipeline


class CountingBackend:
    """Answers nothing, counts how many images each generate call gets."""

    model_id = "counting"

    def __init__(self):
        from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention

        self.box_codec = BoxCodec(BoxConvention.NORMALIZED_100)
        self.calls: list[int] = []

    def generate(self, images, prompts, n=1, sampling=None):
        self.calls.append(len(images))
        return [["<think>.</think><answer>normal</answer>"] * n for _ in images]


def test_batching_bench_runs_both_ways_on_the_same_slices():
    phantom = make_phantom(3, shape=(32, 32, 12), n_lesions=0, study_id="p3")
    volume = Volume(phantom.image.astype("float32"), phantom.affine)
    backend = CountingBackend()
    pipeline = VolumePipeline(backend, PipelineConfig(image_size=32, batch_size=2, skip_outside_body=False))
    report = bench_batching(pipeline, volume, batch_size=5, repeats=1)
    assert report["slices"] == 12
    # warm-up + 1 repeat, one call per slice; then warm-up + 1 repeat in batches of 5 (5, 5, 2)
    assert backend.calls == [1] * 24 + [5, 5, 2] * 2
    assert pipeline.config.batch_size == 2, "the bench restores the pipeline's own batch size"
    assert report["batch_speedup"] == pytest.approx(report["batched_slices_per_s"] / report["single_slices_per_s"])
    text = format_report({**report, "model": "counting", "study": "p3", "batch_size": 5, "note": ""})
    assert "speedup" in text and "slices/s" in text


def test_cli_registers_bench_infer():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["infer", "data", "--batch-size", "4", "--conf", "window", "lung", "--no-http"])
    assert args.batch_size == 4 and args.conf == [["window", "lung"]] and args.no_http and callable(args.func)
