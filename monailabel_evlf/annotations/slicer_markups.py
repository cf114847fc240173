"""3D Slicer ROI markups JSON: how boxes travel to and from 3D Slicer's MONAI Label module.

A MONAI Label "detection" model answers with one markups JSON holding one ROI markup per box
(``monailabel.utils.others.detection.create_slicer_detection_json``); the Slicer plugin loads it with
``slicer.util.loadMarkups`` and renames every ROI node "Detection ROI - i". On "Save Label" the plugin saves each
ROI node with ``slicer.util.saveNode`` and concatenates the ``markups[0]`` entries into one file
(``onGenerateJSONFromMulipltROIs``). Node names therefore do not survive a round trip through Slicer, but the
control point ``label`` / ``description`` do — that is where the box label, finding text and score are kept.

Slicer writes ``orientation`` row-major with the ROI axes as columns; in an LPS file the first two rows are negated
with respect to RAS, and ``center`` / control points have x and y negated (vtkMRMLMarkupsROIJsonStorageNode).
See docs/conventions.md.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from monailabel_evlf.imaging.geometry import WorldBox, ras_to_lps

logger = logging.getLogger(__name__)

SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
_SCORE_SUFFIX = re.compile(r"\s*\[score (?P<score>[-+0-9.eE]+|nan)\]\s*$")
_UNIT_SCALE_TO_MM = {"mm": 1.0, "um": 1e-3}
_ORTHONORMAL_TOLERANCE = 1e-3


@cache
def _schema_validator() -> jsonschema.Draft7Validator:
    text = resources.files("monailabel_evlf").joinpath("resources/slicer-markups-schema-v1.0.3.json").read_text()
    return jsonschema.Draft7Validator(json.loads(text))


def validate_markups(doc: Mapping[str, Any]) -> None:
    """Check ``doc`` against 3D Slicer's markups schema v1.0.3; raise ``ValueError`` naming the first problem."""
    errors = list(_schema_validator().iter_errors(doc))
    if errors:
        # anyOf failures hide the useful message one level down; best_match digs it out.
        error = jsonschema.exceptions.best_match(errors)
        while error.context:
            error = jsonschema.exceptions.best_match(error.context)
        where = "/".join(str(p) for p in error.absolute_path) or "<root>"
        raise ValueError(f"not a valid Slicer markups document at {where}: {error.message}")


def _roi_markup(box: WorldBox, description: str) -> dict[str, Any]:
    center = [float(v) for v in np.asarray(box.center, dtype=float)]
    size = [float(v) for v in np.asarray(box.size, dtype=float)]
    orientation = [float(v) for v in np.asarray(box.orientation, dtype=float).reshape(9)]
    label = box.label or ""
    if box.score is not None:
        description = f"{description} [score {float(box.score):.4f}]".strip()
    name = label if box.score is None else f"{label} ({float(box.score):.2f})"
    return {
        "type": "ROI",
        "name": name.strip() or "ROI",
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": 1,
        "roiType": "Box",
        "center": center,
        "orientation": orientation,
        "size": size,
        "insideOut": False,
        # Not in the schema (extra keys are allowed): the key MONAI Label's own detection output uses.
        "label": {"value": label},
        "controlPoints": [
            {
                "id": "1",
                "label": label,
                "description": description,
                "position": center,
                "orientation": orientation,
                "selected": True,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined",
            }
        ],
    }


def write_roi_markups(
    world_boxes: Sequence[WorldBox],
    path: str | Path | None = None,
    *,
    descriptions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One Slicer ROI markup per box (LPS, mm), as a MONAI Label detection model returns them.

    ``descriptions`` (e.g. the model's finding sentence) go with the boxes in order; the score is appended to the
    description as ``[score 0.8700]`` because the description is what survives Slicer's load/save cycle.
    Writes the JSON to ``path`` when given and returns the document either way.
    """
    if descriptions is not None and len(descriptions) != len(world_boxes):
        raise ValueError(f"got {len(descriptions)} descriptions for {len(world_boxes)} boxes")
    texts = descriptions if descriptions is not None else [""] * len(world_boxes)
    doc = {"@schema": SCHEMA_URL, "markups": [_roi_markup(b, t) for b, t in zip(world_boxes, texts, strict=True)]}
    validate_markups(doc)
    if path is not None:
        Path(path).write_text(json.dumps(doc, indent=2))
    return doc


def _load_document(json_or_path: Mapping[str, Any] | str | Path | bytes) -> Mapping[str, Any]:
    if isinstance(json_or_path, Mapping):
        return json_or_path
    if isinstance(json_or_path, bytes):
        json_or_path = json_or_path.decode("utf-8")
    if isinstance(json_or_path, str) and json_or_path.lstrip().startswith("{"):
        text, source = json_or_path, "JSON text"
    else:
        path = Path(json_or_path)
        if not path.is_file():
            raise ValueError(f"markups file not found: {path}")
        text, source = path.read_text(), str(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from e
    except RecursionError:  # json nests with the C stack: a 100k-deep document must be a ValueError, not a crash
        raise ValueError(f"{source}: JSON nested too deeply for a markups document") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: a markups document is a JSON object, got {type(doc).__name__}")
    return doc


def _vector(markup: Mapping[str, Any], key: str, n: int, where: str) -> np.ndarray:
    value = np.asarray(markup[key], dtype=float)
    if value.shape != (n,) or not np.all(np.isfinite(value)):
        raise ValueError(f"{where}: '{key}' must be {n} finite numbers, got {markup[key]!r}")
    return value


def _unit_scale(markup: Mapping[str, Any], where: str) -> float:
    units = markup.get("coordinateUnits", "mm")
    unit = units[0] if isinstance(units, list) else units
    if unit not in _UNIT_SCALE_TO_MM:
        raise ValueError(f"{where}: unsupported coordinateUnits {units!r} (expected mm or um)")
    return _UNIT_SCALE_TO_MM[unit]


def _without_auto_number(label: str, label_format: Any) -> str:
    """The node name in a control-point label Slicer generated from the markup's ``labelFormat``.

    Slicer labels a new control point by ``labelFormat`` (default ``%N-%d``: node name, running number), and the
    node name itself is not saved: an ROI a reader draws and names "cyst" is written with the label "cyst-1".
    """
    if not isinstance(label_format, str) or "%N" not in label_format:
        return label
    pattern = re.escape(label_format).replace("%N", "(?P<name>.+?)").replace("%d", "[0-9]+")
    match = re.fullmatch(pattern, label)
    return match["name"] if match else label


def _label_text_score(markup: Mapping[str, Any]) -> tuple[str, float | None]:
    points = markup.get("controlPoints") or [{}]
    label = _without_auto_number(points[0].get("label", ""), markup.get("labelFormat", "%N-%d"))
    if label in ("", "ROI"):  # Slicer's and MONAI Label's placeholder label
        monai_label = markup.get("label")
        label = monai_label.get("value", "") if isinstance(monai_label, Mapping) else ""
    match = _SCORE_SUFFIX.search(points[0].get("description", ""))
    score = float(match["score"]) if match else None
    return str(label), score


def _roi_to_world_box(markup: Mapping[str, Any], where: str) -> WorldBox:
    system = markup.get("coordinateSystem", "LPS")
    scale = _unit_scale(markup, where)
    orientation = _vector(markup, "orientation", 9, where).reshape(3, 3) if "orientation" in markup else np.eye(3)
    if not np.allclose(orientation.T @ orientation, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
        raise ValueError(f"{where}: 'orientation' is not a rotation (columns must be orthonormal)")
    positions = [p["position"] for p in markup.get("controlPoints", []) if "position" in p]
    if "center" in markup and "size" in markup:
        center = _vector(markup, "center", 3, where)
        size = _vector(markup, "size", 3, where)
    elif markup.get("roiType") == "BoundingBox" and positions:
        # Slicer's bounding-box ROI: the box spans the control points in the ROI's own axes.
        local = np.asarray(positions, dtype=float) @ orientation
        lo, hi = local.min(axis=0), local.max(axis=0)
        center, size = orientation @ ((lo + hi) / 2), hi - lo
    elif "size" in markup and positions:
        center, size = np.asarray(positions[0], dtype=float), _vector(markup, "size", 3, where)
    else:
        raise ValueError(f"{where}: an ROI needs 'center' and 'size' (or control points and 'size')")
    if np.any(size < 0):
        raise ValueError(f"{where}: 'size' must not be negative, got {size.tolist()}")
    if system == "RAS":
        center = ras_to_lps(center)
        orientation = np.column_stack([ras_to_lps(axis) for axis in orientation.T])  # flip each axis vector
    label, score = _label_text_score(markup)
    return WorldBox(
        center=np.asarray(center, dtype=float) * scale,
        size=np.asarray(size, dtype=float) * scale,
        orientation=np.asarray(orientation, dtype=float),
        label=label,
        score=score,
    )


def read_roi_markups(json_or_path: Mapping[str, Any] | str | Path | bytes) -> list[WorldBox]:
    """Every ROI markup in a Slicer markups document as a ``WorldBox`` in LPS mm.

    Accepts what 3D Slicer's MONAI Label module sends on "Save Label" for a detection model (all ROI nodes in
    one file), RAS or LPS files, mm or um, with or without orientation. Non-ROI markups (points, lines) are
    skipped with a warning. Anything malformed raises ``ValueError`` saying what and where.
    """
    doc = _load_document(json_or_path)
    validate_markups(doc)
    boxes = []
    for n, markup in enumerate(doc["markups"]):
        where = f"markups[{n}] ({markup.get('name', '')!r})"
        if markup["type"] != "ROI":
            logger.warning("%s: skipping a %s markup, only ROI markups are boxes", where, markup["type"])
            continue
        boxes.append(_roi_to_world_box(markup, where))
    return boxes
