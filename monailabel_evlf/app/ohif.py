"""OHIF as the EVLF app serves it at ``/ohif/``: MONAI Label's OHIF 3.10 build, its files served right, and a
configuration that shows the EVLF SR's finding text.

Two things MONAI Label 0.8.5's own ``/ohif/`` route gets wrong or cannot do:

- It joins sub-paths with ``os.pathsep`` (``assets/x.png`` -> ``assets:x.png``), so every file in a sub-folder is
  answered with ``index.html``: OHIF's icons and images (``assets/images/*.svg``, the volume rendering preset
  pictures, the web-app manifest icons) show as broken images. Here files are served from the build folder itself
  (never outside it); unknown paths without a file extension are OHIF's client-side routes and get
  ``index.html``, a missing file gets 404.
- OHIF reads only its own free-text label codes (``CORNERSTONEFREETEXT``, 19 characters in a 16-character SH
  field, which dciodvfy rejects). Our SR stays valid DICOM and carries the finding as a DCM Comment TEXT, its
  confidence as a Probability NUM and the model's reasoning as text items (annotations/dicom_sr.py), which OHIF
  does not display. ``app-config.js`` is therefore MONAI Label's configuration plus two OHIF customizations
  (:data:`EVLF_CUSTOMIZATIONS`): while the SR is shown as the AI's read-only report, each rectangle is labelled
  with the finding, confidence, reasoning, study diagnosis and model; when a reader takes the report over
  ("track measurements"), each editable rectangle keeps the finding as its label, which OHIF's "Create SR"
  then writes as the reader's label (a free-text Finding Site) that ``read_sr_boxes`` reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import monailabel.endpoints.ohif as monailabel_ohif
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse, Response
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import get_mime_type

from monailabel_evlf.annotations.dicom_common import MANUFACTURER

OHIF_DIR = Path(monailabel_ohif.__file__).resolve().parent / "static" / "ohif"

# Runs in the browser after MONAI Label's app-config.js has set window.config. Codes: DCM 125007 Measurement
# Group, 112040 Tracking Unique Identifier, 121106 Comment, 122157 Probability, 111058 Selected Region
# Description, 111001 / 111003 Algorithm Name / Version, 111023 Differential Diagnosis/Impression.
EVLF_CUSTOMIZATIONS = """
// EVLF (monailabel-evlf): show the EVLF SR's finding text, keep the finding as label when a reader takes it over.
(function () {
  const MANUFACTURER = __MANUFACTURER__;
  const asArray = x => (x == null ? [] : Array.isArray(x) ? x : [x]);
  const is = (item, value) => asArray(item && item.ConceptNameCodeSequence).some(c => c.CodeValue === value);
  const find = (items, value) => asArray(items).find(item => is(item, value));
  const number = item => item && Number(asArray(item.MeasuredValueSequence)[0]?.NumericValue);

  // TrackingUniqueIdentifier -> {label, score, text, model} of each measurement group of an EVLF SR
  function evlfFindings(instance) {
    const found = {};
    const diagnosis = [];
    if (!instance || instance.Manufacturer !== MANUFACTURER) return { found, diagnosis };
    const walk = items => asArray(items).forEach(item => {
      if (is(item, '125007')) {
        const content = asArray(item.ContentSequence);
        const uid = find(content, '112040')?.UID;
        found[uid] = {
          label: find(content, '121106')?.TextValue,
          score: number(find(content, '122157')),
          text: find(content, '111058')?.TextValue,
          model: [find(content, '111001')?.TextValue, find(content, '111003')?.TextValue].filter(Boolean).join(' '),
        };
      } else if (is(item, '111023') && item.TextValue) {
        diagnosis.push(item.TextValue);
      } else {
        walk(item.ContentSequence);
      }
    });
    walk(instance.ContentSequence);
    return { found, diagnosis };
  }

  function srInstance(SeriesInstanceUID) {
    const sets = window.services?.displaySetService?.getDisplaySetsForSeries(SeriesInstanceUID) || [];
    return sets.find(d => d.Modality === 'SR')?.instance;
  }

  const customizations = {
    // the AI's read-only report: label lines under each rectangle
    onBeforeSRAddMeasurement: {
      value: ({ measurement, SeriesInstanceUID }) => {
        const { found, diagnosis } = evlfFindings(srInstance(SeriesInstanceUID));
        const finding = found[measurement.TrackingUniqueIdentifier];
        if (!finding || !finding.label) return measurement;
        const lines = [{ label: 'Finding', value: finding.label }];
        if (Number.isFinite(finding.score)) lines.push({ label: 'Confidence', value: finding.score.toFixed(2) });
        if (finding.text) lines.push({ label: 'Reasoning', value: finding.text });
        if (diagnosis.length) lines.push({ label: 'Diagnosis', value: diagnosis.join(', ') });
        if (finding.model) lines.push({ label: 'Model', value: finding.model });
        measurement.labels = lines.concat(measurement.labels || []);
        return measurement;
      },
    },
    // a reader takes the report over: the finding becomes the editable rectangle's label
    onBeforeSRHydration: {
      value: ({ storedMeasurementByAnnotationType, displaySet }) => {
        const { found } = evlfFindings(displaySet && displaySet.instance);
        Object.values(storedMeasurementByAnnotationType).forEach(tools => asArray(tools).forEach(toolData => {
          const finding = found[toolData.TrackingUniqueIdentifier];
          if (finding && finding.label) {
            toolData.findingSites = [{ CodeValue: 'CORNERSTONEFREETEXT', CodingSchemeDesignator: 'CORNERSTONEJS',
                                       CodeMeaning: finding.label }].concat(asArray(toolData.findingSites));
          }
        }));
        return storedMeasurementByAnnotationType;
      },
    },
  };
  window.config.customizationService = Object.assign({}, window.config.customizationService, customizations);
})();
""".replace("__MANUFACTURER__", json.dumps(MANUFACTURER))


# With --conf auth_token_file every DICOMweb call through /proxy/dicom needs "Authorization: Bearer <token>".
# OHIF 3 sends what its userAuthenticationService returns; its own ?token= parameter is read by the viewer route
# only (routes/Mode), so the study list would still get 401. This sets the service up for every page, through an
# inline extension's preRegistration (run before OHIF's first request): the token comes from ?token= or
# #token= (the fragment never reaches a server log), is kept for this browser tab (sessionStorage) and is taken
# out of the address bar at once.
EVLF_TOKEN = """
// EVLF (monailabel-evlf): open OHIF as /ohif/?token=<token> (or /ohif/#token=<token>) on a server with token auth.
(function () {
  const KEY = 'evlf-token';
  const url = new URL(window.location.href);
  const fragment = new URLSearchParams(url.hash.slice(1));
  let token = null;
  [...url.searchParams.keys()].filter(k => k.toLowerCase() === 'token').forEach(k => {
    token = url.searchParams.get(k);
    url.searchParams.delete(k);
  });
  if (fragment.get('token')) {
    token = fragment.get('token');
    fragment.delete('token');
    url.hash = fragment.toString();
  }
  if (token) {
    sessionStorage.setItem(KEY, token);
    window.history.replaceState(window.history.state, '', url.toString());
  }
  if (!sessionStorage.getItem(KEY)) return;
  const extension = {
    id: 'evlf-token',
    preRegistration: ({ servicesManager }) => {
      servicesManager.services.userAuthenticationService.setServiceImplementation({
        getAuthorizationHeader: () => ({ Authorization: 'Bearer ' + sessionStorage.getItem(KEY) }),
      });
    },
  };
  window.config.extensions = (window.config.extensions || []).concat([extension]);
})();
"""


def app_config() -> str:
    """MONAI Label's OHIF configuration (its DICOMweb proxy roots) with the EVLF customizations and the token
    hand-over appended (no secret in it: the browser brings the token)."""
    return (OHIF_DIR / "app-config.js").read_text() + "\n" + EVLF_CUSTOMIZATIONS + EVLF_TOKEN


def ohif_file(path: str) -> Path:
    """The build file for a ``/ohif/<path>`` request: the file itself, or ``index.html`` for OHIF's own routes."""
    root = OHIF_DIR.resolve()
    wanted = (root / path).resolve() if path else root / "index.html"
    if not wanted.is_relative_to(root):
        raise HTTPException(404, "Resource NOT Found")
    if wanted.is_file():
        return wanted
    if "." in Path(path).name:  # a file OHIF asked for that the build does not have
        raise HTTPException(404, "Resource NOT Found")
    return root / "index.html"  # client-side routes such as /ohif/viewer


def ohif_router() -> APIRouter:
    """``/ohif/...`` in front of MONAI Label's route of the same path (same role check)."""
    router = APIRouter(prefix="/ohif", tags=["Others"])
    user_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)

    @router.get("/app-config.js", include_in_schema=False)
    def config(user: User = Depends(user_role)) -> Response:
        return Response(app_config(), media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    @router.get("/{path:path}", include_in_schema=False)
    def files(path: str, user: User = Depends(user_role)) -> FileResponse:
        file = ohif_file(path)
        return FileResponse(file, media_type=get_mime_type(str(file)))

    return router
