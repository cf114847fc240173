"""A backend that answers the TRUE phantom boxes: the app's user-supplied backend path, and an oracle that makes
every geometry step between a slice box and a Slicer ROI checkable end to end.

Load it with ``--conf backend tests.app.gt_backend:GroundTruthBackend --conf model <phantom dataset dir>``. It
recognises each rendered slice it is shown by rendering every phantom slice the same way (the pipeline's
renderer, at the size of the image it receives) and answers that slice's ground-truth boxes from the sidecar,
mapped into the image through the inverse of ``pixel_to_plane``: if the pipeline's way back (parse -> voxel box
-> 3D box -> LPS) is right, the result equals the sidecar's boxes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from monailabel_evlf.imaging.slicing import RenderedSlice, choose_axis, render_slices
from monailabel_evlf.imaging.volume import load_volume
from monailabel_evlf.model.backend import SamplingConfig
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


class GroundTruthBackend:
    box_codec = BoxCodec(BoxConvention.ABSOLUTE_MODEL_INPUT, lambda size: size)  # pixels of the image it got

    def __init__(self, dataset_dir: Path, window: str = "abdomen") -> None:
        self.dataset_dir = dataset_dir
        self.model_id = f"ground-truth-oracle:{dataset_dir.name}"
        self.window = window
        self.sidecars = {
            p.stem: json.loads(p.read_text()) for p in sorted((dataset_dir / "ground_truth").glob("*.json"))
        }
        if not self.sidecars:
            raise ValueError(f"no phantom ground truth in {dataset_dir / 'ground_truth'}")
        self._index: dict[tuple[int, int], dict[str, list[tuple[str, RenderedSlice]]]] = {}
        self.calls: list[int] = []  # batch size of every generate call

    @classmethod
    def from_pretrained(
        cls, name_or_path, *, device="cpu", dtype="float32", trust_remote_code=False, adapter=None, **options
    ):
        path = Path(name_or_path)
        if not path.is_dir():
            raise ValueError(f"GroundTruthBackend needs a phantom dataset directory, got {name_or_path!r}")
        return cls(path, **options)

    def _slices_of_size(self, size: tuple[int, int]) -> dict[str, list[tuple[str, RenderedSlice]]]:
        if size not in self._index:
            index: dict[str, list[tuple[str, RenderedSlice]]] = {}
            for study_id in self.sidecars:
                volume = load_volume(self.dataset_dir / f"{study_id}.nii.gz")
                axis = choose_axis(volume.affine)
                rendered = render_slices(volume, range(volume.shape[axis]), axis=axis, size=size, window=self.window)
                for item in rendered:
                    index.setdefault(_digest(item.image), []).append((study_id, item))
            self._index[size] = index
        return self._index[size]

    def truth(self, image: np.ndarray) -> list[dict]:
        """Ground-truth boxes (label, bbox_2d in image pixels) of the phantom slice ``image`` shows."""
        height, width = image.shape[:2]
        matches = self._slices_of_size((width, height)).get(_digest(image), [])
        if not matches:
            raise ValueError("image is not a rendered slice of any phantom in the dataset")
        study_id, rendered = matches[0]
        to_image = np.linalg.inv(rendered.pixel_to_plane)
        boxes = []
        for lesion in self.sidecars[study_id]["lesions"]:
            for entry in lesion["slice_boxes"]:
                if entry["axis"] != rendered.axis or entry["index"] != rendered.index:
                    continue
                a1, b1, a2, b2 = entry["box"]
                corners = to_image @ np.array([[a1, a2], [b1, b2], [1.0, 1.0]])
                x1, x2 = sorted(corners[0])
                y1, y2 = sorted(corners[1])
                boxes.append({"label": lesion["label"], "bbox_2d": [round(v, 3) for v in (x1, y1, x2, y2)]})
        return boxes

    def answer(self, image: np.ndarray, prompt: str) -> str:
        boxes = self.truth(image)
        labels = list(dict.fromkeys(b["label"] for b in boxes)) or ["normal"]
        text = prompt.lower()
        if "locate" in text or "box" in text or "ground" in text:
            body = json.dumps(boxes)
            reasoning = f"Ground truth shows {len(boxes)} lesion(s) on this slice."
        elif "diagnos" in text:
            body = labels[0]
            reasoning = f"Ground truth label on this slice: {labels[0]}."
        else:
            body = "yes" if boxes else "no"
            reasoning = "Answering whether this slice shows a lesion."
        return f"<think>{reasoning}</think><answer>{body}</answer>"

    def generate(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], n: int = 1, sampling: SamplingConfig | None = None
    ):
        self.calls.append(len(images))
        return [[self.answer(image, prompt)] * n for image, prompt in zip(images, prompts, strict=True)]

    def completion_logprobs(self, images, prompts, completions):
        raise NotImplementedError("the ground-truth oracle cannot be trained")

    def reference_policy(self):
        return nullcontext()

    def trainable_parameters(self):
        return iter(())

    def save_adapter(self, directory: Path) -> None:
        raise NotImplementedError("the ground-truth oracle has no adapter")

    def load_adapter(self, directory: Path | None) -> None:
        if directory is not None:
            raise NotImplementedError("the ground-truth oracle has no adapter")

    def train(self, mode: bool = True):
        return self

    def eval(self):
        return self
