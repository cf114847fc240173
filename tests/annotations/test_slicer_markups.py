"""Slicer ROI markups: schema-valid output, hand-computed RAS -> LPS reading, round trips, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from monailabel_evlf.annotations.slicer_markups import read_roi_markups, validate_markups, write_roi_markups
from monailabel_evlf.imaging.geometry import WorldBox

REFERENCE_SCHEMA = Path("/work/shared/reference/slicer-markups-schema-v1.0.3.json")
PACKAGED_SCHEMA = Path(__file__).parents[2] / "monailabel_evlf" / "resources" / "slicer-markups-schema-v1.0.3.json"

# What 3D Slicer 5 writes with saveNode() for one ROI node in an RAS file, after MONAI Label's module renamed it
# "Detection ROI - 1", for a rotated ROI: its x axis points A, its y axis R and its z axis I.
SLICER_RAS_FILE = {
    "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
    "Schema/markups-schema-v1.0.3.json#",
    "markups": [
        {
            "type": "ROI",
            "coordinateSystem": "RAS",
            "coordinateUnits": "mm",
            "locked": False,
            "fixedNumberOfControlPoints": False,
            "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": 1,
            "roiType": "Box",
            "center": [10.0, -20.0, 30.0],
            "orientation": [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0],
            "size": [12.0, 8.0, 5.0],
            "insideOut": False,
            "controlPoints": [
                {
                    "id": "1",
                    "label": "cyst",
                    "description": "Round hypodense lesion. [score 0.9100]",
                    "associatedNodeID": "vtkMRMLScalarVolumeNode1",
                    "position": [10.0, -20.0, 30.0],
                    "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                    "selected": True,
                    "locked": False,
                    "visibility": True,
                    "positionStatus": "defined",
                }
            ],
            "measurements": [{"name": "volume", "enabled": False, "units": "cm3", "printFormat": "%-#4.4g%s"}],
            "display": {"visibility": True, "opacity": 1.0, "color": [0.4, 1.0, 1.0], "glyphType": "Sphere3D"},
        }
    ],
}


def _box(center=(1.0, 2.0, 3.0), size=(4.0, 5.0, 6.0), orientation=None, label="nodule", score=0.75) -> WorldBox:
    return WorldBox(
        center=np.asarray(center, dtype=float),
        size=np.asarray(size, dtype=float),
        orientation=np.eye(3) if orientation is None else np.asarray(orientation, dtype=float),
        label=label,
        score=score,
    )


def test_written_document_is_valid_under_slicers_own_schema(tmp_path: Path) -> None:
    doc = write_roi_markups([_box(), _box(label="cyst", score=None)], tmp_path / "boxes.json")
    schema = json.loads(REFERENCE_SCHEMA.read_text() if REFERENCE_SCHEMA.exists() else PACKAGED_SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(doc)
    assert json.loads((tmp_path / "boxes.json").read_text()) == doc
    first = doc["markups"][0]
    assert first["type"] == "ROI" and first["coordinateSystem"] == "LPS" and first["roiType"] == "Box"
    assert first["center"] == [1.0, 2.0, 3.0] and first["size"] == [4.0, 5.0, 6.0]
    assert first["controlPoints"][0]["label"] == "nodule"
    assert first["controlPoints"][0]["description"] == "[score 0.7500]"
    assert first["label"] == {"value": "nodule"}  # MONAI Label's detection key


def test_packaged_schema_is_slicers_schema() -> None:
    if not REFERENCE_SCHEMA.exists():
        pytest.skip("reference schema not on this machine")
    assert json.loads(PACKAGED_SCHEMA.read_text()) == json.loads(REFERENCE_SCHEMA.read_text())


def test_slicer_ras_file_reads_as_hand_computed_lps(tmp_path: Path) -> None:
    path = tmp_path / "label.json"
    path.write_text(json.dumps(SLICER_RAS_FILE))
    (box,) = read_roi_markups(path)
    # RAS (10, -20, 30) is LPS (-10, 20, 30); each axis vector (column) has its R and A components negated.
    np.testing.assert_allclose(box.center, [-10.0, 20.0, 30.0])
    np.testing.assert_allclose(box.size, [12.0, 8.0, 5.0])
    np.testing.assert_allclose(box.orientation, [[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    assert box.label == "cyst"
    assert box.score == pytest.approx(0.91)


def test_lps_file_of_the_same_roi_reads_the_same() -> None:
    lps = json.loads(json.dumps(SLICER_RAS_FILE))
    markup = lps["markups"][0]
    markup["coordinateSystem"] = "LPS"
    markup["center"] = [-10.0, 20.0, 30.0]
    markup["orientation"] = [0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # Slicer negates the first two rows
    (from_lps,) = read_roi_markups(lps)
    (from_ras,) = read_roi_markups(SLICER_RAS_FILE)
    np.testing.assert_allclose(from_lps.center, from_ras.center)
    np.testing.assert_allclose(from_lps.orientation, from_ras.orientation)


def test_reads_monai_labels_own_detection_output() -> None:
    from monailabel.utils.others.detection import create_slicer_detection_json

    path, count = create_slicer_detection_json(
        {"image": "/data/study_1.nii.gz", "box": [[1.0, 2.0, 3.0, 10.0, 20.0, 30.0]], "label": ["nodule"]}
    )
    boxes = read_roi_markups(path)
    Path(path).unlink()
    assert count == 1 and len(boxes) == 1
    np.testing.assert_allclose(boxes[0].center, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(boxes[0].size, [10.0, 20.0, 30.0])
    assert boxes[0].label == "nodule"  # from MONAI Label's "label": {"value": ...}; its control point says "ROI"


def test_all_rois_of_a_save_label_file_are_read_and_other_markups_skipped() -> None:
    doc = write_roi_markups([_box(label="a"), _box(center=(5, 5, 5), label="b")])
    doc["markups"].insert(1, {"type": "Fiducial", "controlPoints": [{"position": [0, 0, 0]}]})
    for n, markup in enumerate(doc["markups"]):
        markup["name"] = f"Detection ROI - {n}"  # Slicer's module renames ROI nodes; labels survive in control points
    assert [b.label for b in read_roi_markups(json.dumps(doc))] == ["a", "b"]


@pytest.mark.parametrize(
    ("label", "label_format", "finding"),
    [
        ("cyst-1", "%N-%d", "cyst"),  # what Slicer 5.13 writes for a new ROI node named "cyst"
        ("hyperdense lesion-12", "%N-%d", "hyperdense lesion"),
        ("ring-enhancing lesion", "%N-%d", "ring-enhancing lesion"),  # a set label is kept as it is
        ("cyst_3", "%N_%d", "cyst"),
        ("cyst-1", "%d", "cyst-1"),  # a format without the node name: nothing to undo
    ],
)
def test_slicers_automatic_control_point_label_gives_the_node_name(label, label_format, finding) -> None:
    doc = json.loads(json.dumps(SLICER_RAS_FILE))
    doc["markups"][0]["labelFormat"] = label_format
    doc["markups"][0]["controlPoints"][0]["label"] = label
    assert read_roi_markups(doc)[0].label == finding


def test_micrometre_units_and_bounding_box_rois() -> None:
    doc = {
        "@schema": "x",
        "markups": [
            {
                "type": "ROI",
                "coordinateUnits": ["um", "UCUM", "micrometer"],
                "center": [1000, 0, 0],
                "size": [500, 500, 500],
            },
            {
                "type": "ROI",
                "coordinateSystem": "LPS",
                "roiType": "BoundingBox",
                "controlPoints": [{"position": [0, 0, 0]}, {"position": [4, -2, 6]}, {"position": [1, 1, 1]}],
            },
        ],
    }
    micro, bounding = read_roi_markups(doc)
    np.testing.assert_allclose(micro.center, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(micro.size, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(bounding.center, [2.0, -0.5, 3.0])
    np.testing.assert_allclose(bounding.size, [4.0, 3.0, 6.0])


rotations = st.tuples(*[st.floats(-np.pi, np.pi)] * 3).map(lambda a: Rotation.from_euler("zyx", a).as_matrix())
vectors = st.tuples(*[st.floats(-500, 500)] * 3)
sizes = st.tuples(*[st.floats(0.1, 200)] * 3)


@settings(max_examples=40, deadline=None)
@given(center=vectors, size=sizes, orientation=rotations, score=st.none() | st.floats(0, 1))
def test_write_read_round_trip(center, size, orientation, score) -> None:
    box = _box(center, size, orientation, label="ground glass", score=score)
    (back,) = read_roi_markups(write_roi_markups([box], descriptions=["A finding."]))
    np.testing.assert_allclose(back.center, center, atol=1e-9)
    np.testing.assert_allclose(back.size, size, atol=1e-9)
    np.testing.assert_allclose(back.orientation, orientation, atol=1e-9)
    assert back.label == "ground glass"
    assert back.score == (None if score is None else pytest.approx(score, abs=1e-4))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"@schema": "x"}', "markups"),
        ({"@schema": "x", "markups": [{"type": "ROI", "center": [0, 0], "size": [1, 1, 1]}]}, "center"),
        ({"@schema": "x", "markups": [{"type": "ROI", "center": [0, 0, 0], "size": [1, -1, 1]}]}, "negative"),
        ({"@schema": "x", "markups": [{"type": "ROI", "center": [0, 0, 0]}]}, "needs 'center' and 'size'"),
        (
            {
                "@schema": "x",
                "markups": [{"type": "ROI", "center": [0, 0, 0], "size": [1, 1, 1], "orientation": [1] * 9}],
            },
            "orthonormal",
        ),
        ({"@schema": "x", "markups": [{"type": "ROI", "coordinateSystem": "XYZ"}]}, "coordinateSystem"),
        ("/no/such/file.json", "not found"),
    ],
)
def test_malformed_input_raises_value_error(doc, message) -> None:
    with pytest.raises(ValueError, match=message):
        read_roi_markups(doc)


def test_validate_markups_names_the_problem() -> None:
    with pytest.raises(ValueError, match=r"markups/0/size"):
        validate_markups({"@schema": "x", "markups": [{"type": "ROI", "size": [1, 2]}]})


def test_descriptions_must_match_boxes() -> None:
    with pytest.raises(ValueError, match="2 descriptions for 1 boxes"):
        write_roi_markups([_box()], descriptions=["a", "b"])
