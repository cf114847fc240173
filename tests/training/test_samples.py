"""Samples from phantom ground truth and from corrected boxes: boxes land on the lesion, targets parse back."""

import json
from dataclasses import replace

import numpy as np
import pytest

from monailabel_evlf.data.phantoms import make_phantom
from monailabel_evlf.imaging.geometry import VoxelBox
from monailabel_evlf.imaging.volume import Volume
from monailabel_evlf.tasks.box_codec import BoxCodec, BoxConvention
from monailabel_evlf.training.samples import (
    SampleOptions,
    correction_samples,
    lesion_findings,
    load_samples,
    manifest_samples,
    phantom_samples,
    samples_for_volume,
)

NATIVE = BoxCodec(BoxConvention.NORMALIZED_100)
OPTIONS = SampleOptions(box_codec=NATIVE, size=(96, 96), tasks=("grounding", "diagnosis", "vqa"))


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(3, shape=(48, 48, 16), n_lesions=2, orientation="flipped", study_id="p3")


def bright_box(image):
    """The box of the pixels brighter than the mid-grey: the lesion drawn by the test below."""
    rows, cols = np.nonzero(image[..., 0] > 128)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def test_lesion_findings_are_one_slice_thick(phantom):
    findings = lesion_findings(phantom.ground_truth)
    lesion = phantom.ground_truth["lesions"][0]
    assert sum(f.lesion == lesion["id"] for f in findings) == len(lesion["slice_boxes"])
    for finding in findings:
        assert finding.box.hi[2] - finding.box.lo[2] == 1
        i0, j0, k = finding.box.lo.astype(int)
        i1, j1, _ = finding.box.hi.astype(int)
        # the labelmap has this lesion inside the box on that slice and nowhere outside it
        ids = phantom.labelmap[:, :, k] == finding.lesion
        assert ids[i0:i1, j0:j1].sum() == ids.sum() > 0


def test_grounding_box_covers_the_lesion_pixels():
    # a synthetic volume: a bright 4 x 6 voxel block on slice 5, nothing else
    array = np.full((32, 32, 10), -1000.0, dtype=np.float32)
    array[10:14, 20:26, 5] = 500.0
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # flipped i and j: the display flips both
    volume = Volume(array, affine, {"modality": "CT"})
    box = VoxelBox(lo=[10, 20, 5], hi=[14, 26, 6], label="cyst")
    options = SampleOptions(box_codec=NATIVE, size=(32, 32), window="bone", tasks=("grounding",))
    sample, open_question = correction_samples(volume, [box], options)
    # the app's default open question ("every abnormality") is trained too, with the same answer
    assert "every abnormality" in open_question.prompt and "the cyst" in sample.prompt
    assert open_question.target == sample.target and open_question.label is None
    drawn = sample.boxes[0]
    assert (drawn.x1, drawn.y1, drawn.x2, drawn.y2) == bright_box(sample.image)
    body = json.loads(sample.target.split("<answer>")[1].split("</answer>")[0])
    # NORMALIZED_100 on a 32 px picture: x / 32 * 100, rounded
    assert body == {"label": "cyst", "bbox_2d": [round(drawn.x1 * 100 / 32), round(drawn.y1 * 100 / 32),
                                                 round(drawn.x2 * 100 / 32), round(drawn.y2 * 100 / 32)]}  # fmt: skip


def test_phantom_samples_tasks_and_labels(phantom):
    samples = phantom_samples(phantom.image, phantom.affine, phantom.ground_truth, OPTIONS, normal_slices=1)
    tasks = {s.task for s in samples}
    assert tasks == {"grounding", "diagnosis", "vqa"}
    kinds = {les["label"] for les in phantom.ground_truth["lesions"]}
    assert {s.label for s in samples if s.task == "grounding"} == kinds | {None}
    assert "normal" in {s.label for s in samples if s.task == "diagnosis"}
    for sample in samples:
        assert sample.image.shape == (96, 96, 3) and sample.target.startswith("<think>")
        assert sample.target.endswith("</answer>") and sample.source["study_id"] == "p3"
        if sample.task == "diagnosis":
            assert sample.options[0] == "normal" and "cyst" in sample.options  # every phantom kind offered


def test_lesion_free_slices_never_cut_a_lesion_and_caps_are_taught_on_request():
    # a lesion crossing slices 3..7: a 3 x 3 cap on 3 and 7, 6 x 6 in between; every other slice is lesion-free
    array = np.full((24, 24, 12), -1000.0, dtype=np.float32)
    array[4:20, 4:20, :] = 40.0  # body on every slice
    cuts = [{"axis": 2, "index": k, "box": [10, 10, 13, 13] if k in (3, 7) else [8, 8, 14, 14]} for k in range(3, 8)]
    truth = {"lesions": [{"id": 1, "label": "cyst", "organ": "liver", "finding": "Cyst.", "slice_boxes": cuts}]}
    findings = lesion_findings(truth)
    volume = Volume(array, np.eye(4), {"modality": "CT"})
    options = SampleOptions(box_codec=NATIVE, size=(24, 24), tasks=("diagnosis",))
    for seed in range(8):
        samples = samples_for_volume(volume, findings, options, normal_slices=6, seed=seed)
        normal = {s.source["index"] for s in samples if s.label == "normal"}
        assert len(normal) == 6 and not normal & set(range(3, 8)), (seed, normal)  # caps 3 and 7 are no negatives
        assert {s.source["index"] for s in samples if s.label == "cyst"} == {4, 5, 6}  # central slices only
    every = samples_for_volume(volume, findings, options, min_area_fraction=0.0)
    assert {s.source["index"] for s in every if s.label == "cyst"} == set(range(3, 8))


def test_correction_samples_central_slices():
    array = np.zeros((16, 16, 12), dtype=np.float32)
    volume = Volume(array, np.eye(4), {"modality": "CT"})
    options = SampleOptions(box_codec=NATIVE, size=(16, 16), tasks=("grounding",))
    samples = correction_samples(
        volume, [VoxelBox(lo=[2, 2, 3], hi=[6, 6, 8], label="cyst")], options, slices_per_box=3
    )
    assert [s.source["index"] for s in samples if s.label] == [4, 5, 6]  # + the open question on each slice


def test_correction_samples_reject_bad_boxes():
    volume = Volume(np.zeros((8, 8, 4), dtype=np.float32), np.eye(4))
    options = SampleOptions(box_codec=NATIVE, size=(8, 8))
    with pytest.raises(ValueError, match="no label"):
        correction_samples(volume, [VoxelBox(lo=[0, 0, 0], hi=[2, 2, 2])], options)
    with pytest.raises(ValueError, match="outside"):
        correction_samples(volume, [VoxelBox(lo=[0, 0, 3], hi=[2, 2, 9], label="cyst")], options)


def test_manifest_samples(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((20, 40), dtype=np.uint8)).save(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "task": "grounding", "label": "nodule", "boxes": [[4, 2, 10, 8]], "modality": "XR"},
        {"image": "a.png", "task": "vqa", "question": "Is there a nodule?", "answer": "yes", "options": ["yes", "no"]},
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    grounding, vqa = load_samples(tmp_path, OPTIONS)
    assert grounding.image.shape == (20, 40, 3) and grounding.image_size == (40, 20)
    assert '"bbox_2d": [10, 10, 25, 40]' in grounding.target  # 4/40, 2/20, 10/40, 8/20 of 100
    # a backend answering in pixels of its resized picture: the resize of this 40 x 20 image, not of options.size
    absolute = replace(OPTIONS, box_codec=BoxCodec(BoxConvention.ABSOLUTE_MODEL_INPUT, lambda s: (s[0] * 2, s[1] * 3)))
    assert '"bbox_2d": [8, 6, 20, 24]' in load_samples(tmp_path, absolute)[0].target
    assert vqa.answer == "yes" and vqa.options == ["yes", "no"]
    (tmp_path / "manifest.jsonl").write_text('{"image": "missing.png", "task": "vqa"}\n')
    with pytest.raises(ValueError, match=r"manifest\.jsonl:1"):
        manifest_samples(tmp_path, OPTIONS)


def test_load_samples_rejects_unknown_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_samples(tmp_path, OPTIONS)
