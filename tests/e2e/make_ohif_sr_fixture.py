"""Make tests/annotations/data/ohif-3.10-rectangle-ellipse.dcm with OHIF itself.

Run: ``python -m tests.e2e.make_ohif_sr_fixture`` from the repository root.

The CT series is the one tests/annotations/conftest.py builds (``ct_series``: 40 x 30 x 6, seed 7, so the same
UIDs). It goes into a private Orthanc; an EVLF server (tiny model; it only serves OHIF and proxies DICOMweb)
serves OHIF 3.10 at ``/ohif/``; in headless Chromium the script draws, as a reader would with the mouse, a
RectangleROI on image index 1 labelled "ring-enhancing lesion" (21 characters: OHIF's free-text label is longer
than a code value may be) and an EllipticalROI (dragged from its centre) on image index 4 labelled "cyst", then
presses "Create SR" and downloads what OHIF stored. Needs chromium, orthanc and orthanc-dicomweb.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from dicomweb_client import DICOMwebClient

from monailabel_evlf.app.bench import running_server
from monailabel_evlf.data.dicom_series import write_dicom_series
from tests.annotations.conftest import CT_AFFINE, CT_SHAPE
from tests.e2e import orthanc
from tests.e2e.browser import Chromium, poll
from tests.e2e.ohif_page import OHIF

OUT = Path(__file__).resolve().parents[1] / "annotations" / "data" / "ohif-3.10-rectangle-ellipse.dcm"
# what the script draws: (tool, image index, start pixel, end pixel, label)
DRAWN = [
    ("RectangleROI", 1, (5.5, 6.0), (17.25, 20.0), "ring-enhancing lesion"),
    ("EllipticalROI", 4, (14.0, 14.0), (20.0, 18.0), "cyst"),
]


def main() -> int:
    if not orthanc.available():
        print(orthanc.MISSING, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="evlf-ohif-fixture-") as tmp:
        root = Path(tmp)
        (root / "orthanc").mkdir()
        paths = write_dicom_series(np.full(CT_SHAPE, -1000.0, dtype=np.float32), CT_AFFINE, root / "ct", seed=7)
        series = [pydicom.dcmread(p) for p in paths]
        study = str(series[0].StudyInstanceUID)
        with orthanc.running_orthanc(root / "orthanc") as dicomweb:
            DICOMwebClient(dicomweb).store_instances(series)
            env = {"MONAI_LABEL_DATASTORE_CACHE_PATH": str(root / "cache")}
            conf = {"model": "tiny", "adapters": str(root / "adapters")}
            with running_server(dicomweb, conf, timeout=300, env=env) as server, Chromium() as browser:
                ohif = OHIF(browser, server)
                try:
                    ohif.open_study(study, modalities=("CT",))
                    shown = []
                    for n, (tool, index, start, end, label) in enumerate(DRAWN):
                        shown.append(ohif.show_image(index))
                        ohif.draw(tool, start, end)
                        ohif.rename(n, label)
                    drawn = ohif.measurements(len(DRAWN))
                    ohif.create_sr("EVLF fixture")
                except Exception:
                    shot = browser.screenshot(Path(tempfile.gettempdir()) / "evlf-ohif-fixture-failure.png")
                    print(f"screenshot of the failure: {shot}", file=sys.stderr)
                    raise
                client = DICOMwebClient(dicomweb)
                found = poll(
                    lambda: client.search_for_series(search_filters={"StudyInstanceUID": study, "Modality": "SR"}),
                    timeout=60,
                    what="OHIF's SR in Orthanc",
                )
                (sr,) = client.retrieve_series(study, str(pydicom.Dataset.from_json(found[0]).SeriesInstanceUID))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(OUT, write_like_original=False)
    print(json.dumps({"instances drawn on": shown, "OHIF measurements": drawn}, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
