"""The learning loop through the MONAI Label train task: corrections of a kind the demo model handles badly ->
``evlf_train`` -> a promoted adapter that grounds better on held-out studies; and the gate keeping a worse one out.

The shift is the learning-loop benchmark's (configs/training/learning-loop.yaml): a contrast-enhanced protocol.
Corrections are the phantoms' true boxes, saved through the 3D Slicer client as a radiologist's ROI markups.
Held-out studies are other seeds, scored in this process with the promoted adapter and without it.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from monailabel_evlf.annotations.slicer_markups import write_roi_markups
from monailabel_evlf.app.bench import running_server
from monailabel_evlf.data.phantoms import make_phantom, save_phantom
from monailabel_evlf.imaging.geometry import VoxelBox, WorldBox
from monailabel_evlf.imaging.volume import Volume
from monailabel_evlf.model.backends.evlf import EVLFBackend
from monailabel_evlf.training.adapters import AdapterRegistry
from monailabel_evlf.training.config import DetectorConfig, SFTConfig
from monailabel_evlf.training.evaluate import evaluate
from monailabel_evlf.training.finetune import finetune_adapter
from monailabel_evlf.training.learning_loop import load_learning_loop_config
from monailabel_evlf.training.samples import SampleOptions, correction_samples

# a few minutes: the train child fits the detector and the LoRA adapter on the demo model
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHIFT = load_learning_loop_config(REPO / "configs" / "training" / "learning-loop.yaml")
CORRECTED, HELD_OUT = 64, 32  # the learning-loop benchmark's 64-case row and its held-out set


def shifted_phantom(stream: int, index: int):
    return make_phantom(
        [SHIFT.seed, stream, index],
        shape=SHIFT.phantom_shape,
        kinds=SHIFT.kinds,
        organs=SHIFT.organs,
        n_lesions=1,
        noise_sd_hu=SHIFT.noise_sd_hu,
        organ_enhancement_hu=SHIFT.organ_enhancement_hu,
        study_id=f"shifted_{stream}_{index:03d}",
    )


def lesion_phantoms(stream: int, count: int) -> list:
    found, index = [], 0
    while len(found) < count:
        phantom = shifted_phantom(stream, index)
        index += 1
        if phantom.ground_truth["lesions"]:  # the generator may find no room for the lesion
            found.append(phantom)
    return found


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shifted-studies")
    for phantom in lesion_phantoms(1, CORRECTED):
        save_phantom(phantom, root)
    return root


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def held_out() -> list:
    backend = EVLFBackend.from_pretrained(str(REPO / "models" / "evlf-demo"))
    options = SampleOptions(
        box_codec=backend.box_codec, size=tuple(SHIFT.size), window=backend.input_window, tasks=("grounding",)
    )
    samples = []
    for n, phantom in enumerate(lesion_phantoms(2, HELD_OUT)):
        boxes = [
            VoxelBox(lo=les["voxel_box"]["lo"], hi=les["voxel_box"]["hi"], label=les["label"])
            for les in phantom.ground_truth["lesions"]
        ]
        samples += correction_samples(Volume(phantom.image, phantom.affine, {"modality": "CT"}), boxes, options, seed=n)
    return samples


def grounding_acc(adapter: Path | None, samples: list) -> float:
    backend = EVLFBackend.from_pretrained(str(REPO / "models" / "evlf-demo"))
    backend.load_adapter(adapter)
    return evaluate(backend, samples).flat()["acc@0.5"]


# About 5 minutes on 2 cores. Deterministic since LoRA A is drawn from lora_seed (before, each process drew its own
# init and the same corrections gave 0.234, 0.156, 0.078 or 0.172 on the low-dose shift of the time).
def test_corrections_through_the_train_task_make_a_better_promoted_adapter(
    studies, adapters, held_out, tmp_path, slicer_client_class
):
    conf = {"adapters": str(adapters), "torch_threads": "2"}  # the app's defaults: detector, then SFT then GRPO
    with running_server(studies, conf, timeout=240) as url:
        client = slicer_client_class(url, tmpdir=str(tmp_path))
        for sidecar in sorted((studies / "ground_truth").glob("shifted_*.json")):
            truth = json.loads(sidecar.read_text())
            markups = tmp_path / f"{truth['study_id']}.json"
            corrected = [WorldBox.from_dict({**les["world_box"], "label": les["label"]}) for les in truth["lesions"]]
            write_roi_markups(corrected, markups)
            client.save_label(truth["study_id"], str(markups), tag="final")
        assert client.train_start("evlf_train", {"method": "sft+grpo", "steps": 30})
        deadline = time.monotonic() + 900
        while (status := client.train_status())["status"] not in ("DONE", "ERROR"):
            assert time.monotonic() < deadline, status
            time.sleep(5)
        assert status["status"] == "DONE", "\n".join(status.get("details", []))

    (model_dir,) = [p for p in adapters.iterdir() if p.is_dir()]  # the served model's registry
    registry = AdapterRegistry(adapters, model_dir.name)
    promoted = registry.promoted()
    assert promoted is not None and promoted.name == "v0001"
    before, after = grounding_acc(None, held_out), grounding_acc(promoted.path, held_out)
    print(f"held-out shifted Acc@0.5: demo model {before:.3f}, promoted adapter {after:.3f} (n={len(held_out)})")
    # measured here (2026-12-07, refiner demo model, 80-90 HU): 0.281 -> 0.562 (48 of the 64 corrections train, the
    # rest gate; the benchmark's 64-case rows, all 64 training: 0.563-0.609). +0.10 (7 of the 64 held-out samples)
    # asks for a lift well past noise while leaving room for another CPU's arithmetic to take a different training path
    assert after >= before + 0.10


def test_the_gate_refuses_an_adapter_trained_on_wrong_boxes(held_out, tmp_path):
    """Corrections whose boxes sit a third of the image away from every lesion teach the detector the wrong place;
    the gate measures on true held-out boxes and must keep the current version."""
    registry = AdapterRegistry(tmp_path / "adapters", "evlf-demo")
    backend = EVLFBackend.from_pretrained(str(REPO / "models" / "evlf-demo"))
    train_good, gate = held_out[: len(held_out) // 2], held_out[len(held_out) // 2 :]

    def round_on(samples, detector_steps: int, learning_rate: float):
        detector = DetectorConfig(steps=detector_steps, batch_size=16, learning_rate=learning_rate)
        return finetune_adapter(
            backend, samples, gate, registry, detector=detector, sft=SFTConfig(epochs=2), gate_metric="acc@0.5"
        )

    first = round_on(train_good, 60, 1e-3)
    assert first.promoted  # nothing promoted before: the first version always is
    wrong = []
    for sample in train_good:
        width, _ = sample.image_size
        shifts = [width / 3 if b.x1 < width / 2 else -width / 3 for b in sample.boxes]
        moved = [replace(b, x1=b.x1 + dx, x2=b.x2 + dx) for b, dx in zip(sample.boxes, shifts, strict=True)]
        wrong.append(replace(sample, boxes=moved))
    worse = round_on(wrong, 150, 3e-3)
    assert worse.metrics["acc@0.5"] < worse.baseline_metrics["acc@0.5"]
    assert not worse.promoted and registry.promoted().name == first.version.name
