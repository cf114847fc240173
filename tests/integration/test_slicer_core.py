"""3D Slicer's own MRML code as the viewer: it reads what the server returns and writes what the server takes back.

slicer-core (PyPI: 3D Slicer's MRML and module logic libraries without Qt) loads every ROI markups file the
grounding task returns the way Slicer's "Load markups" does (``vtkSlicerMarkupsLogic.LoadMarkups``, one
``vtkMRMLMarkupsROINode`` per ROI through ``vtkMRMLMarkupsROIJsonStorageNode``), loads the phantom image and its
lesion label map with ``vtkMRMLVolumeArchetypeStorageNode``, and checks in Slicer's RAS, through Slicer's own
``IJKToRAS``, that each ROI covers exactly its lesion on identity, flipped and oblique grids. The server answers
through the ground-truth oracle backend (``tests/app/gt_backend.py``), so the right answer is the lesion itself.
Then a reader's correction is written by Slicer's own writer (``WriteData`` of each ROI node's storage node, put
together as MONAI Label's Slicer module does on "Save Label") and goes through ``save_label`` and ``evlf_train``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from monailabel_evlf.app.bench import running_server
from monailabel_evlf.app.labels import read_label_boxes
from monailabel_evlf.data.phantoms import make_phantom, save_phantom
from monailabel_evlf.imaging.volume import load_volume

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (it is in the test extra: .[test])")
vtk = pytest.importorskip("vtk")
from vtkmodules.util.numpy_support import vtk_to_numpy  # noqa: E402  (vtk comes with slicer-core)

pytestmark = pytest.mark.integration

ORACLE = "tests.app.gt_backend:GroundTruthBackend"
SHAPE = (64, 64, 24)
# study id -> (seed, orientation, lesions); seeds checked to place both lesions on this grid
STUDIES = {
    "slicer_identity": ([11, 1], "identity", 2),
    "slicer_flipped": ([11, 2], "flipped", 2),
    "slicer_oblique": ([11, 1], "oblique", 2),
    "slicer_normal": ([11, 3], "identity", 0),
}
CORRECTED = "slicer_oblique"
MOVE_MM, SHRINK = 3.0, 0.8  # the reader's edit of the first AI ROI: along its own first axis, then scaled

# max ROI centre error (mm) per orientation, filled by the tests and printed at the end of the module (-s)
CENTRE_ERROR_MM: dict[str, float] = {}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slicer-studies")
    for study, (seed, orientation, lesions) in STUDIES.items():
        phantom = make_phantom(seed, shape=SHAPE, n_lesions=lesions, orientation=orientation, study_id=study)
        assert len(phantom.ground_truth["lesions"]) == lesions, f"{study}: a lesion was dropped; pick another seed"
        save_phantom(phantom, root)
    return root


@pytest.fixture(scope="module")
def oracle(dataset) -> str:
    conf = {"backend": ORACLE, "model": str(dataset), "image_size": "64", "batch_size": "8"}
    with running_server(dataset, conf, timeout=300) as url:
        yield url
    if CENTRE_ERROR_MM:
        print("\nmax ROI centre error vs phantom truth (mm, Slicer RAS):", json.dumps(CENTRE_ERROR_MM))


class SlicerScene:
    """An MRML scene with what Slicer's application sets up for the markups module (selection node, logic)."""

    def __init__(self) -> None:
        self.scene = slicer.vtkMRMLScene()
        selection = slicer.vtkMRMLSelectionNode()
        selection.SetSingletonTag("Singleton")  # Slicer's vtkMRMLSelectionNodeSingleton, which the logic looks up
        self.scene.AddNode(selection)
        self.markups = slicer.vtkSlicerMarkupsLogic()
        self.markups.SetMRMLScene(self.scene)  # registers the markups node and storage node classes

    def load_volume(self, path: Path, labelmap: bool = False):
        node = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode")
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(node), f"Slicer could not read {path}"
        node.SetAndObserveStorageNodeID(storage.GetID())
        return node

    def load_rois(self, path: Path) -> list:
        """What ``slicer.util.loadMarkups`` does: one node per markup in the file (here: ROIs only)."""
        types: list[str] = []
        slicer.vtkMRMLMarkupsJsonStorageNode().GetMarkupsTypesInFile(str(path), types)
        assert set(types) <= {"ROI"}, types
        before = self.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode")
        if types:
            assert self.markups.LoadMarkups(str(path)), f"Slicer could not load {path}"
        nodes = [self.scene.GetNthNodeByClass(n, "vtkMRMLMarkupsROINode") for n in range(before, before + len(types))]
        assert all(node.GetStorageNode().IsA("vtkMRMLMarkupsROIJsonStorageNode") for node in nodes)
        return nodes

    def new_roi(self, name: str):
        return self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)

    def save_label_file(self, nodes: list, path: Path, coordinate_systems: list[str]) -> Path:
        """MONAI Label's Slicer module on "Save Label" for a detection model (``onGenerateJSONFromMulipltROIs``):
        every ROI node saved by its own storage node, the ``markups[0]`` of each put into one document."""
        markups = []
        for n, (node, system) in enumerate(zip(nodes, coordinate_systems, strict=True)):
            storage = node.GetStorageNode() or node.CreateDefaultStorageNode()
            if not storage.GetScene():
                self.scene.AddNode(storage)
                node.SetAndObserveStorageNodeID(storage.GetID())
            storage.SetCoordinateSystem(storage.GetCoordinateSystemFromString(system))
            storage.SetFileName(str(path.with_name(f"{path.stem}-node{n}.json")))
            assert storage.WriteData(node), f"Slicer could not write {node.GetName()}"
            markups.append(json.loads(Path(storage.GetFileName()).read_text())["markups"][0])
        path.write_text(json.dumps({"@schema": SCHEMA, "markups": markups}))
        return path


SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)


def matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(volume) -> np.ndarray:
    out = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(out)
    return matrix(out)


def voxels(volume) -> np.ndarray:
    """The node's voxels indexed ``[i, j, k]`` (vtkImageData runs i fastest)."""
    image = volume.GetImageData()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1]).transpose(2, 1, 0)


def lesions_in_ras(image, labelmap) -> list[dict]:
    """Each lesion of the label map Slicer loaded, in Slicer's RAS through the image's own ``IJKToRAS``: its
    voxel-centre extent in IJK, centre and size (mm) along the grid axes."""
    np.testing.assert_allclose(ijk_to_ras(labelmap), ijk_to_ras(image), atol=1e-4)  # one grid for both
    to_ras = ijk_to_ras(image)
    spacing = np.asarray(image.GetSpacing())
    values = voxels(labelmap)
    found = []
    for value in sorted(set(np.unique(values)) - {0}):
        ijk = np.argwhere(values == value)
        first, last = ijk.min(axis=0), ijk.max(axis=0)
        centre = to_ras @ np.append((first + last) / 2.0, 1.0)
        found.append({"value": int(value), "first": first, "last": last, "center": centre[:3]})
        found[-1]["size"] = (last - first + 1) * spacing
    return found


def roi_corners_ijk(roi, image) -> np.ndarray:
    """The ROI's 8 corners in the image's IJK (voxel-centre indices), from the ROI's own axes and size."""
    object_to_ras = matrix(roi.GetObjectToNodeMatrix())
    half = np.asarray(roi.GetSize()) / 2.0
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    corners = (signs * half) @ object_to_ras[:3, :3].T + object_to_ras[:3, 3]
    to_ijk = np.linalg.inv(ijk_to_ras(image))
    return corners @ to_ijk[:3, :3].T + to_ijk[:3, 3]


def sidecar(dataset: Path, study: str) -> dict:
    return json.loads((dataset / "ground_truth" / f"{study}.json").read_text())


@pytest.mark.parametrize("study", list(STUDIES))
def test_slicer_reads_every_grounding_roi_onto_its_lesion(oracle, dataset, tmp_path, study, slicer_client_class):
    client = slicer_client_class(oracle, tmpdir=str(tmp_path))
    result_file, _ = client.infer("evlf_grounding", study, {})
    scene = SlicerScene()
    rois = scene.load_rois(Path(result_file))
    image = scene.load_volume(dataset / f"{study}.nii.gz")
    lesions = lesions_in_ras(image, scene.load_volume(dataset / "ground_truth" / f"{study}_lesions.nii.gz", True))
    truth = sidecar(dataset, study)["lesions"]
    assert len(lesions) == len(truth) == STUDIES[study][2]
    assert len(rois) == len(lesions)

    orientation = STUDIES[study][1]
    errors = []
    for lesion in lesions:
        label = truth[lesion["value"] - 1]["label"]
        roi = min(rois, key=lambda r: np.linalg.norm(np.asarray(r.GetCenter()) - lesion["center"]))
        errors.append(float(np.linalg.norm(np.asarray(roi.GetCenter()) - lesion["center"])))
        assert roi.GetNthControlPointLabel(0) == label
        assert roi.GetNthControlPointDescription(0).startswith(f"{label}: ")  # the reasoning travels with the box
        np.testing.assert_allclose(sorted(roi.GetSize()), sorted(lesion["size"]), atol=1e-3)
        # the ROI covers exactly the lesion's voxels: its corners are the extent's outer voxel faces
        corners = roi_corners_ijk(roi, image)
        np.testing.assert_allclose(corners.min(axis=0), lesion["first"] - 0.5, atol=1e-3)
        np.testing.assert_allclose(corners.max(axis=0), lesion["last"] + 0.5, atol=1e-3)
    spacing = float(np.min(image.GetSpacing()))
    assert max(errors, default=0.0) < 1e-3 * spacing, errors
    if errors:
        CENTRE_ERROR_MM[orientation] = max(CENTRE_ERROR_MM.get(orientation, 0.0), max(errors))


@pytest.fixture(scope="module")
def trainable(dataset, tmp_path_factory) -> tuple[str, Path]:
    """The tiny (random) model's server on a copy of the studies, so its saved labels stay its own."""
    root = tmp_path_factory.mktemp("slicer-train-studies")
    for study in ("slicer_identity", CORRECTED):
        shutil.copy(dataset / f"{study}.nii.gz", root)
    adapters = tmp_path_factory.mktemp("adapters")
    conf = {"model": "tiny", "image_size": "64", "max_slices": "6", "max_new_tokens": "24", "adapters": str(adapters)}
    with running_server(root, conf, timeout=300) as url:
        yield url, root


def test_slicer_written_correction_is_saved_and_trained_on(oracle, trainable, dataset, tmp_path, slicer_client_class):
    url, studies = trainable
    scene = SlicerScene()
    image = scene.load_volume(dataset / f"{CORRECTED}.nii.gz")
    lesions = lesions_in_ras(image, scene.load_volume(dataset / "ground_truth" / f"{CORRECTED}_lesions.nii.gz", True))
    labels = [lesion["label"] for lesion in sidecar(dataset, CORRECTED)["lesions"]]

    # the AI's ROIs loaded as the Slicer module does (renamed "Detection ROI - i"); the reader keeps lesion 1's ROI
    # but moves it along its own first axis and shrinks it, deletes lesion 2's and draws that one anew
    ai_file, _ = slicer_client_class(oracle, tmpdir=str(tmp_path)).infer("evlf_grounding", CORRECTED, {})
    rois = scene.load_rois(Path(ai_file))
    for n, roi in enumerate(rois):
        roi.SetName(f"Detection ROI - {n}")
    near = [min(rois, key=lambda r, le=le: np.linalg.norm(np.asarray(r.GetCenter()) - le["center"])) for le in lesions]
    edited, dropped = near
    axis = matrix(edited.GetObjectToNodeMatrix())[:3, 0]
    edited.SetCenter(*(np.asarray(edited.GetCenter()) + MOVE_MM * axis))
    edited.SetSize(*(np.asarray(edited.GetSize()) * SHRINK))
    scene.scene.RemoveNode(dropped)
    drawn = scene.new_roi(labels[1])  # Slicer labels its control point "<name>-1"
    directions = ijk_to_ras(image)[:3, :3] / np.asarray(image.GetSpacing())
    axes = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            axes.SetElement(r, c, directions[r, c])
    drawn.SetAndObserveObjectToNodeMatrix(axes)
    drawn.SetCenter(*lesions[1]["center"])
    drawn.SetSize(*lesions[1]["size"])
    label_file = scene.save_label_file([edited, drawn], tmp_path / "label.json", ["LPS", "RAS"])
    written = json.loads(label_file.read_text())["markups"]
    assert [m["coordinateSystem"] for m in written] == ["LPS", "RAS"]
    assert [m["controlPoints"][0]["label"] for m in written] == [labels[0], f"{labels[1]}-1"]

    # the app reads Slicer's file as the boxes the reader meant, on the image's voxel grid
    volume = load_volume(dataset / f"{CORRECTED}.nii.gz")
    boxes = read_label_boxes(label_file, volume)
    first, last = lesions[0]["first"], lesions[0]["last"]
    middle = (first + last + 1) / 2.0 + np.array([MOVE_MM / image.GetSpacing()[0], 0.0, 0.0])
    half = (last - first + 1) / 2.0 * SHRINK
    expected = [(labels[0], middle - half, middle + half), (labels[1], lesions[1]["first"], lesions[1]["last"] + 1)]
    assert [b.label for b in boxes] == [labels[0], labels[1]]
    for box, (_, lo, hi) in zip(boxes, expected, strict=True):
        np.testing.assert_allclose(box.lo, lo, atol=1e-4)
        np.testing.assert_allclose(box.hi, hi, atol=1e-4)

    # a Slicer ROI the reader did not name after a finding is refused (422) and nothing is stored
    client = slicer_client_class(url, tmpdir=str(tmp_path))
    unnamed = scene.save_label_file([scene.new_roi("R")], tmp_path / "unnamed.json", ["LPS"])

    with unnamed.open("rb") as handle:
        refused = requests.put(f"{url}/datastore/label", params={"image": CORRECTED}, files={"label": handle})
    assert refused.status_code == 422 and "finding label" in refused.json()["detail"]
    assert not (studies / "labels" / "final").exists() or not any((studies / "labels" / "final").iterdir())

    # Slicer's "Save Label" -> the datastore keeps the file as written; "Train" uses it
    client.save_label(CORRECTED, str(label_file), tag="final")
    stored = studies / "labels" / "final" / f"{CORRECTED}.json"
    assert json.loads(stored.read_text())["markups"] == written
    started = time.monotonic()
    assert client.train_start("evlf_train", {"method": "grpo", "steps": 1, "gate": False})
    while (status := client.train_status())["status"] not in ("DONE", "ERROR"):
        assert time.monotonic() - started < 300, status
        time.sleep(1)
    details = "\n".join(status.get("details", []))
    assert status["status"] == "DONE", details
    assert f"evlf_train: {CORRECTED} -> 2 boxes" in details
    _, params = client.infer("evlf_grounding", CORRECTED, {})
    assert params["model"]["adapter_version"] == "v0001"
