"""The DICOMweb datastore (Orthanc, DCM4CHEE, Google Healthcare) as the EVLF app needs it.

MONAI Label's own set-up of this datastore first downloads the dcmqi tools from GitHub (for its NIfTI -> SEG
conversion) and converts every series to NIfTI. The EVLF app needs neither: highdicom writes SR / SEG, and the
DICOM series itself must reach the pipeline so results can reference its instances (``Volume.meta
["sop_instance_uids"]``). So this builds MONAI Label's ``DICOMWebDatastore`` directly, with the same settings
(``MONAI_LABEL_DICOMWEB_*`` / ``MONAI_LABEL_*_PREFIX``), ``convert_to_nifti=False`` and no download.
"""

from __future__ import annotations

import logging

from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore

logger = logging.getLogger(__name__)


def dicomweb_datastore(url: str) -> DICOMWebDatastore:
    """A DICOMweb datastore on ``url`` (e.g. ``http://127.0.0.1:8042/dicom-web``) serving DICOM folders."""
    from dicomweb_client.session_utils import create_session_from_user_pass

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
    return DICOMWebDatastore(
        client=client,
        search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        cache_path=cache_path or None,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=False,
    )
