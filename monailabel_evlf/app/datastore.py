"""The local studies folder as the EVLF app serves it: every id, tag and upload checked, every write atomic.

MONAI Label's ``LocalDatastore`` joins client-given ids and tags onto its folders, copies whatever bytes arrive
into them and rewrites ``datastore_v2.json`` in place. Here ids and tags go through one validator
(:mod:`monailabel_evlf.app.security`), nothing is read, written or deleted outside the studies folder, uploads are
checked for what they claim (3D, voxel and byte caps, geometry of the image, labels training can use) and land by
temp file + rename, and a torn index left by a crash is set aside and rebuilt from the files instead of stopping
the server.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from monailabel_evlf.annotations import formats
from monailabel_evlf.app.config import DEFAULT_LABELS
from monailabel_evlf.app.security import (
    VOLUME_SUFFIXES,
    Limits,
    check_id,
    check_json_object,
    check_tag,
    check_volume_file,
    contained,
    parse_bool,
    refuse,
    volume_suffix,
)
from monailabel_evlf.atomic import write_atomic
from monailabel_evlf.imaging.volume import load_volume

logger = logging.getLogger(__name__)


def label_suffix(name: str) -> str:
    """The label format's suffix of a file name; 415 for anything the train task cannot read."""
    try:
        return formats.label_suffix(name)
    except formats.LabelRefused as exc:
        raise refuse(exc.status, str(exc)) from None


def check_label_file(
    label_path: str, image_path: str, targets: Sequence[str] = DEFAULT_LABELS, limits: Limits = Limits()
) -> None:
    """4xx unless the label is something training can use on this image: Slicer ROI markups naming known
    findings inside the image, an integer label map on the image's grid, or a DICOM SR / SEG of a DICOM study
    (each format's checks: :mod:`monailabel_evlf.annotations.formats`)."""
    try:
        formats.check_label(label_path, formats.LabelCheck(image_path, targets, limits))
    except formats.LabelRefused as exc:
        raise refuse(exc.status, str(exc)) from None


class CheckedLocalDatastore(LocalDatastore):
    """``LocalDatastore`` with one id / tag validator, upload checks and atomic writes (see the module doc)."""

    def __init__(
        self, datastore_path: str, *args: Any, targets: Sequence[str] = (), limits: Limits = Limits(), **kwargs: Any
    ) -> None:
        self.targets = tuple(targets)
        self.limits = limits
        _set_aside_torn_index(Path(datastore_path) / kwargs.get("datastore_config", "datastore_v2.json"))
        super().__init__(datastore_path, *args, **kwargs)
        self._root = Path(datastore_path).resolve()
        for stale in [*self._root.glob(".*.tmp"), *self._root.glob("labels/*/.*.tmp")]:
            stale.unlink(missing_ok=True)  # write_atomic temp files a kill left behind; never renamed into place

    # -- reads: ids validated, unknown ids are 404 ------------------------------------------------------------

    def _known(self, image_id: str) -> Any:
        obj = self._datastore.objects.get(check_id(image_id))
        if not obj:
            raise refuse(404, f"image {image_id!r} is not in the datastore")
        return obj

    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(check_id(image_id))
        return str(contained(self._root, uri)) if uri else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        uri = super().get_label_uri(check_id(label_id, "label id"), check_tag(label_tag))
        return str(contained(self._root, uri)) if uri else ""

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        self._known(image_id)
        return super().get_image_info(image_id)

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        return super().get_label_info(check_id(label_id, "label id"), check_tag(label_tag))

    # -- writes ------------------------------------------------------------------------------------------------

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """A new study: refused if the id exists (no overwrite) or the file is not an honest 3D volume."""
        suffix = volume_suffix(image_filename)
        check_id(image_id)
        if image_id in self._datastore.objects or any(
            (self._root / f"{image_id}{ext}").exists() for ext in VOLUME_SUFFIXES
        ):
            raise refuse(409, f"image {image_id!r} already exists; delete it first or choose another id")
        check_volume_file(image_filename, self.limits)
        try:
            load_volume(image_filename)
        except Exception as exc:  # ITK raises RuntimeError on corrupt data, ValueError on non-3D
            raise refuse(422, f"unreadable image ({type(exc).__name__}): {_first_line(exc)}") from None
        info = check_json_object(dict(image_info or {}), "image info", self.limits)
        name = self._filename(image_id, suffix)
        dest = contained(self._root, Path(self._datastore.image_path()) / name)
        with FileLock(self._lock_file):
            write_atomic(dest, source=image_filename)
            info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=suffix))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """A label for a known image, checked for training, written by temp file + rename."""
        obj = self._known(image_id)
        check_tag(label_tag)
        suffix = label_suffix(label_filename)
        info = check_json_object(dict(label_info or {}), "label params", self.limits)
        check_label_file(label_filename, self.get_image_uri(image_id), self.targets, self.limits)
        label_dir = contained(self._root, self._datastore.label_path(label_tag))
        name = self._filename(image_id, suffix)
        with FileLock(self._lock_file):
            label_dir.mkdir(parents=True, exist_ok=True)
            previous = obj.labels.get(label_tag)
            write_atomic(label_dir / name, source=label_filename)
            if previous and previous.ext != suffix:  # one label per image and tag: drop the other format
                (label_dir / self._filename(image_id, previous.ext)).unlink(missing_ok=True)
            info.update(ts=int(time.time()), name=name)
            obj.labels[label_tag] = DataModel(info=info, ext=suffix)
            self._update_datastore_file(lock=False)
        return image_id

    def remove_image(self, image_id: str) -> None:
        self._known(image_id)
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if not self.get_label_uri(label_id, label_tag):
            raise refuse(404, f"no label {label_id!r} under tag {label_tag!r}")
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self._known(image_id)
        super().update_image_info(image_id, check_json_object(info, "image info", self.limits))

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        if not self._datastore.label(check_id(label_id, "label id"), check_tag(label_tag)):
            raise refuse(404, f"no label {label_id!r} under tag {label_tag!r}")
        super().update_label_info(label_id, label_tag, check_json_object(info, "label info", self.limits))

    def _update_datastore_file(self, lock: bool = True) -> None:
        """The index by temp file + rename: a kill mid-write leaves the old index, never half a file."""

        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            write_atomic(self._datastore_config_path, text.encode())
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


def _first_line(exc: BaseException) -> str:
    """An exception message without the server paths readers like to include."""
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _set_aside_torn_index(index: Path) -> None:
    """A ``datastore_v2.json`` that is not valid JSON (torn by a kill under an older version, or edited by
    hand) is renamed aside so the datastore rebuilds from the files rather than refusing to start."""
    if not index.is_file():
        return
    try:
        json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError):
        aside = index.with_name(f"{index.name}.torn-{int(time.time())}")
        index.rename(aside)
        logger.warning("datastore index %s was unreadable; set aside as %s and rebuilt from files", index, aside)


def check_infer_request(request: dict[str, Any], infers: dict[str, Any], datastore: Any) -> None:
    """Before any work: the model exists (404), and ``request["image"]`` becomes the datastore's own path for a
    known id (404 otherwise) or is an upload the app's route saved and checked. Never a client-given path."""
    model = request.get("model")
    if model not in infers:
        raise refuse(404, f"unknown model {str(model)[:80]!r}; available: {', '.join(sorted(infers))}")
    if parse_bool(request.get("save_label", False), "save_label"):
        raise refuse(422, "'save_label' is not offered: save corrected labels with PUT /datastore/label")
    if "label_tag" in request:
        check_tag(request["label_tag"])
    if request.pop("_upload", False):
        return
    image = request.get("image")
    if not image:
        raise refuse(422, "no image: give an image id or upload a file")
    check_id(image)
    if isinstance(datastore, LocalDatastore):
        uri = datastore.get_image_uri(image)
        if not uri:
            raise refuse(404, f"image {image!r} is not in the datastore")
        request["image"] = uri
