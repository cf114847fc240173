"""The DICOMweb datastore (Orthanc, DCM4CHEE, Google Healthcare) as the EVLF app needs it.

MONAI Label's own set-up of this datastore first downloads the dcmqi tools from GitHub (for its NIfTI -> SEG
conversion) and converts every series to NIfTI. The EVLF app needs neither: highdicom writes SR / SEG, and the
DICOM series itself must reach the pipeline so results can reference its instances (``Volume.meta
["sop_instance_uids"]``). So this builds MONAI Label's ``DICOMWebDatastore`` directly, with the same settings
(``MONAI_LABEL_DICOMWEB_*`` / ``MONAI_LABEL_*_PREFIX``), ``convert_to_nifti=False`` and no download.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore

from monailabel_evlf.annotations import formats
from monailabel_evlf.annotations.dicom_common import is_model_output
from monailabel_evlf.annotations.dicom_seg import write_segmentation
from monailabel_evlf.annotations.provenance import MODEL, model_identity, summary
from monailabel_evlf.app.datastore import check_label_file
from monailabel_evlf.app.labels import read_label_boxes
from monailabel_evlf.app.security import Limits, check_id, check_json_object, check_tag, refuse
from monailabel_evlf.atomic import write_atomic
from monailabel_evlf.imaging.volume import load_volume

logger = logging.getLogger(__name__)


def dicomweb_datastore(url: str, targets: Sequence[str] = (), limits: Limits = Limits()) -> EVLFDICOMwebDatastore:
    """A DICOMweb datastore on ``url`` (e.g. ``http://127.0.0.1:8042/dicom-web``) serving DICOM folders."""
    url = url.rstrip("/").strip()
    username = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
    password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
    session = create_session_from_user_pass(username, password) if username and password else None
    client = DICOMwebClientX(
        url=url,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
    logger.info("DICOMweb datastore %s (series served as DICOM folders, cache %s)", url, cache_path or "default")
    return EVLFDICOMwebDatastore(
        client=client,
        targets=targets,
        limits=limits,
        search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        cache_path=cache_path or None,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=False,
    )


IMAGE_LESS_MODALITIES = {"SR", "SEG", "KO", "PR", "RTSTRUCT", "DOC", "OT"}
LABEL_MODALITIES = tuple(str(f.modality) for f in formats.FORMATS if f.modality)  # SR, SEG
FINAL = "final"


class Correction(NamedTuple):
    """An SR / SEG in the DICOMweb server (a person's correction, or the app's AI output) and the image series it
    annotates."""

    study_uid: str
    series_uid: str
    image_series_uid: str
    when: str  # SeriesDate + SeriesTime (or Content / Instance Creation), for picking the newest
    modality: str = ""  # SR or SEG


def _when(ds: pydicom.Dataset) -> str:
    for date, time_ in (
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
        ("InstanceCreationDate", "InstanceCreationTime"),
    ):
        if ds.get(date):
            return f"{ds.get(date)}{ds.get(time_, '')}"
    return ""


def referenced_series(ds: pydicom.Dataset) -> set[str]:
    """Series UIDs an SR / SEG names as its evidence (SEG: Referenced Series; SR: the evidence sequences)."""
    found = {str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in s}
    for key in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(key, []):
            found |= {str(s.SeriesInstanceUID) for s in study.get("ReferencedSeriesSequence", [])}
    return found


def referenced_instances(ds: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs an SR's IMAGE items point at (for SRs written without an evidence sequence)."""
    found: set[str] = set()
    stack = list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        for ref in item.get("ReferencedSOPSequence", []):
            found.add(str(ref.ReferencedSOPInstanceUID))
        stack.extend(item.get("ContentSequence", []))
    return found


class EVLFDICOMwebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with the EVLF app's idea of a label.

    - Images are the series of image modalities (never an SR / SEG / KO / PR series).
    - "Labelled" means a person's correction exists in the server: an SR / SEG that references the image series
      and is not the app's own AI output (:func:`is_model_output`). AI SR / SEG results therefore neither label
      a study nor drop it from active learning. All corrections count under the tag ``final``.
    - ``get_label_uri(image_id, "final")`` downloads the newest correction of that image as one ``.dcm`` file,
      so training reads an SR / SEG, never the image series.
    - ``save_label`` checks the label (4xx with the reason) and stores it in the study through STOW-RS:
      an SR / SEG as it is, Slicer markups / label maps as a MANUAL DICOM SEG of their boxes.
    - Per box of a correction, where it came from (:meth:`label_provenance`): "model" when the reader left it as
      the study's newest AI output of the same kind drew it (same label, IoU >= 0.99 on the same slices; with that
      output's model id and adapter version), else "human". ``get_label_info`` returns it, and reading a label for
      training logs it.
    QIDO answers are not cached for hours as in MONAI Label (a saved correction counts at once); the metadata of
    an SR / SEG series, which never changes, is.
    """

    def __init__(self, *args: Any, targets: Sequence[str] = (), limits: Limits = Limits(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.targets = tuple(targets)
        self.limits = limits
        self._meta: dict[str, pydicom.Dataset | None] = {}
        self._instances: dict[str, set[str]] = {}
        self._provenance: dict[tuple[str, ...], dict[str, Any]] = {}

    # -- images ------------------------------------------------------------------------------------------------

    def list_images(self) -> list[str]:
        datasets = self._client.search_for_series(search_filters=self._search_filter)
        series = []
        for item in datasets:
            ds = pydicom.Dataset.from_json(item)
            if str(ds.get("Modality", "")) not in IMAGE_LESS_MODALITIES:
                series.append(str(ds.SeriesInstanceUID))
        return series

    def _known(self, image_id: str) -> str:
        check_id(image_id)
        if image_id not in self.list_images():
            raise refuse(404, f"image {image_id!r} is not an image series in the DICOMweb datastore")
        return image_id

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(self._known(image_id))

    # -- corrections -------------------------------------------------------------------------------------------

    def _series_meta(self, study_uid: str, series_uid: str) -> pydicom.Dataset | None:
        if series_uid not in self._meta:
            try:
                meta = self._client.retrieve_series_metadata(study_uid, series_uid)
                self._meta[series_uid] = pydicom.Dataset.from_json(meta[0]) if meta else None
            except Exception as exc:  # a series removed meanwhile, or one the server cannot describe
                logger.warning("cannot read metadata of series %s: %s", series_uid, exc)
                return None
        return self._meta[series_uid]

    def _image_series_of(self, ds: pydicom.Dataset, study_uid: str, images: set[str]) -> str | None:
        named = referenced_series(ds) & images
        if named:
            return sorted(named)[0]
        wanted = referenced_instances(ds)
        if not wanted:
            return None
        for item in self._client.search_for_series(search_filters={"StudyInstanceUID": study_uid}):
            uid = str(pydicom.Dataset.from_json(item).SeriesInstanceUID)
            if uid not in images:
                continue
            if uid not in self._instances:
                found = self._client.search_for_instances(study_uid, uid, fields=["SOPInstanceUID"])
                self._instances[uid] = {str(pydicom.Dataset.from_json(i).SOPInstanceUID) for i in found}
            if wanted & self._instances[uid]:
                return uid
        return None

    def _annotation_series(self) -> list[tuple[Correction, bool]]:
        """Every SR / SEG on an image series of this datastore, oldest first, and whether it is the app's AI output."""
        images = set(self.list_images())
        found = []
        for modality in LABEL_MODALITIES:
            for item in self._client.search_for_series(search_filters={"Modality": modality}):
                head = pydicom.Dataset.from_json(item)
                study_uid, series_uid = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
                meta = self._series_meta(study_uid, series_uid)
                if meta is None:
                    continue
                image = self._image_series_of(meta, study_uid, images)
                if image is None:
                    logger.info("label series %s references no image series of this datastore; ignored", series_uid)
                    continue
                when = _when(meta) or _when(head)
                found.append((Correction(study_uid, series_uid, image, when, modality), is_model_output(meta)))
        return sorted(found, key=lambda pair: pair[0].when)

    def corrections(self) -> list[Correction]:
        """Every person's SR / SEG on an image series of this datastore, oldest first."""
        return [c for c, ai in self._annotation_series() if not ai]

    def model_outputs(self) -> list[Correction]:
        """Every AI SR / SEG the app stored on an image series of this datastore, oldest first."""
        return [c for c, ai in self._annotation_series() if ai]

    def _newest(self, image_id: str) -> Correction | None:
        mine = [c for c in self.corrections() if c.image_series_uid == image_id]
        return mine[-1] if mine else None

    def get_labeled_images(self, label_tag: str | None = None, labels: Sequence[str] | None = None) -> list[str]:
        if label_tag not in (None, FINAL):
            return []
        return sorted({c.image_series_uid for c in self.corrections()})

    def get_unlabeled_images(self, label_tag: str | None = None, labels: Sequence[str] | None = None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images()))

    def _retrieve(self, series: Correction) -> pydicom.Dataset:
        return max(self._client.retrieve_series(series.study_uid, series.series_uid), key=_when)

    def _download(self, label_id: str, correction: Correction) -> str:
        folder = Path(self._datastore.label_path(FINAL))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{label_id}.dcm"
        buffer = io.BytesIO()
        self._retrieve(correction).save_as(buffer, write_like_original=False)
        write_atomic(path, buffer.getvalue())
        return str(path)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The newest correction of image ``label_id`` (label ids are image ids, as in the local datastore); logs
        which of its boxes the reader left as the model drew them (:meth:`label_provenance`)."""
        check_id(label_id, "label id")
        if check_tag(label_tag) != FINAL:
            return ""
        correction = self._newest(label_id)
        if correction is None:
            return ""
        path = self._download(label_id, correction)
        provenance = self._provenance_of(label_id, correction, path)
        logger.info(
            "correction %s of %s: %s",
            correction.series_uid,
            label_id,
            provenance.get("summary") or provenance.get("error"),
        )
        return path

    def label_provenance(self, image_id: str) -> dict[str, Any]:
        """Per box of the newest correction of ``image_id``, where it came from ({} when there is none).

        ``{"model_output": {series_uid, model, adapter_version} | None, "boxes": [{label, lo, hi, source, model,
        adapter_version, iou}], "model_unchanged": n, "human": m, "summary": "..."}``: a box is ``source: "model"``
        when the newest AI output of the same kind (SR for an SR, SEG for a SEG) has a box with the same label at
        IoU >= 0.99 on the same slices, else ``"human"``. Model boxes a reader left in place still count as
        training targets: leaving them is the reader's confirmation."""
        correction = self._newest(check_id(image_id, "image id"))
        if correction is None:
            return {}
        return self._provenance_of(image_id, correction, self._download(image_id, correction))

    def _provenance_of(self, image_id: str, correction: Correction, path: str) -> dict[str, Any]:
        outputs = [m for m in self.model_outputs() if m.image_series_uid == image_id]
        model = next((m for m in reversed(outputs) if m.modality == correction.modality), None)
        key = (correction.series_uid, correction.when, model.series_uid if model else "", model.when if model else "")
        if key in self._provenance:
            return self._provenance[key]
        try:
            model_output = self._retrieve(model) if model else None
            volume = load_volume(self.get_image_uri(image_id))
            origins = formats.box_origins(path, volume, model_output)
        except Exception as exc:  # provenance is information: it never stops training or listing
            logger.warning("cannot tell the origin of the boxes of correction %s: %s", correction.series_uid, exc)
            return {"error": f"cannot tell the origin of the boxes: {_first_line(exc)}"}
        identity = model_identity(model_output) if model_output is not None else None
        kept = sum(origin.source == MODEL for _, origin in origins)
        result = {
            "model_output": {"series_uid": model.series_uid, "model": identity[0], "adapter_version": identity[1]}
            if model and identity
            else None,
            "boxes": [
                {"label": box.label, "lo": box.lo.tolist(), "hi": box.hi.tolist(), **origin.as_dict()}
                for box, origin in origins
            ],
            "model_unchanged": kept,
            "human": len(origins) - kept,
            "summary": summary([origin for _, origin in origins]),
        }
        self._provenance[key] = result
        return result

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        correction = self._newest(check_id(label_id, "label id")) if check_tag(label_tag) == FINAL else None
        if correction is None:
            return {}
        return {**correction._asdict(), "provenance": self.label_provenance(label_id)}

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        return [
            {"image": self.get_image_uri(i), "label": self.get_label_uri(i, FINAL)} for i in self.get_labeled_images()
        ]

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """Check a correction of ``image_id`` and store it in its study through STOW-RS (see the class doc)."""
        self._known(image_id)
        if check_tag(label_tag) != FINAL:
            raise refuse(422, f"the DICOMweb datastore keeps corrections under the tag 'final', not {label_tag!r}")
        check_json_object(dict(label_info or {}), "label params", self.limits)
        image_dir = self.get_image_uri(image_id)
        volume = load_volume(image_dir)
        if self._format_of(label_filename).modality is not None:  # an SR / SEG is stored as it is
            dataset = self._checked_dicom(label_filename, volume)
        else:  # a file format's boxes are stored as a MANUAL SEG
            check_label_file(label_filename, "", self.targets, self.limits)
            boxes = self._checked_boxes(label_filename, volume)
            series = [pydicom.dcmread(p) for p in sorted(Path(image_dir).rglob("*")) if p.is_file()]
            dataset = write_segmentation(
                boxes,
                [ds for ds in series if "SOPInstanceUID" in ds],
                slice_uid_order=volume.meta["sop_instance_uids"],
                series_description="EVLF correction",
                manual=True,
            )
        self._client.store_instances(datasets=[dataset])
        self._meta.pop(str(dataset.SeriesInstanceUID), None)
        logger.info("correction of %s stored: %s series %s", image_id, dataset.Modality, dataset.SeriesInstanceUID)
        return image_id

    @staticmethod
    def _format_of(label_filename: str) -> formats.AnnotationFormat:
        try:
            return formats.format_of(label_filename)
        except formats.LabelRefused as exc:
            raise refuse(exc.status, str(exc)) from None

    def _checked_boxes(self, label_filename: str, volume: Any) -> list:
        try:
            boxes = read_label_boxes(label_filename, volume)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise refuse(422, f"the label cannot be read as boxes on this image: {_first_line(exc)}") from None
        if not boxes:
            raise refuse(422, "the label holds no box on this image series")
        known = {t.lower() for t in self.targets}
        for n, box in enumerate(boxes, 1):
            if not box.label or (known and box.label.strip().lower() not in known):
                raise refuse(
                    422, f"box {n} has finding label {box.label!r}; name each one of: {', '.join(self.targets)}"
                )
            if np.any(np.asarray(box.hi) <= 0) or np.any(np.asarray(box.lo) >= np.asarray(volume.shape)):
                raise refuse(422, f"box {n} ({box.label}) lies outside the image")
        return boxes

    def _checked_dicom(self, label_filename: str, volume: Any) -> pydicom.Dataset:
        try:
            dataset = pydicom.dcmread(label_filename)
        except Exception:  # pydicom raises several error types on truncated files
            raise refuse(422, "unreadable DICOM label") from None
        try:
            formats.for_modality(dataset.get("Modality"))
        except formats.LabelRefused as exc:
            raise refuse(exc.status, str(exc)) from None
        if is_model_output(dataset):
            raise refuse(422, "this is the app's own AI output, not a correction: edit it (e.g. in OHIF) and save anew")
        study = volume.meta.get("study_instance_uid") or self._study_of(volume)
        if study and str(dataset.get("StudyInstanceUID", "")) != study:
            raise refuse(422, "the label belongs to another study than this image")
        self._checked_boxes(label_filename, volume)
        return dataset

    def check_correction(self, label_filename: str) -> tuple[str, pydicom.Dataset]:
        """The image series a DICOM SR / SEG file corrects and its dataset, checked as :meth:`save_label` checks
        one (4xx with the reason): for corrections sent as STOW-RS bodies (OHIF's "Create SR" through MONAI
        Label's DICOMweb proxy), which never pass through ``save_label``."""
        try:
            head = pydicom.dcmread(label_filename, stop_before_pixels=True)
        except Exception:  # pydicom raises several error types on truncated files
            raise refuse(422, "unreadable DICOM label") from None
        image_id = self._image_series_of(head, str(head.get("StudyInstanceUID", "")), set(self.list_images()))
        if image_id is None:
            raise refuse(422, "the SR / SEG references no image series of a study in this datastore")
        return image_id, self._checked_dicom(label_filename, load_volume(self.get_image_uri(image_id)))

    def store_corrections(self, datasets: Sequence[pydicom.Dataset]) -> pydicom.Dataset:
        """One STOW-RS request for corrections :meth:`check_correction` passed; the server's answer."""
        answer = self._client.store_instances(datasets=list(datasets))
        for dataset in datasets:
            self._meta.pop(str(dataset.SeriesInstanceUID), None)
        return answer

    @staticmethod
    def _study_of(volume: Any) -> str:
        for path in sorted(Path(volume.meta["source"]).rglob("*")):
            if path.is_file():
                try:
                    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                except Exception:  # not a DICOM file
                    continue
        return ""

    # -- MONAI Label internals that would treat SEG series as the only labels ---------------------------------

    def _download_labeled_data(self) -> None:
        return None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
