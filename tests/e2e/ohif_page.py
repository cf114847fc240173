"""What a reader does in OHIF 3.10 (the build MONAI Label serves at ``/ohif/``), and what OHIF then holds.

Actions go through the page as a reader's would (double-click a series, answer OHIF's prompt, drag a handle with
the mouse, "Create SR"); state is read from OHIF's own services (``window.services``: display sets, measurement
service) and Cornerstone's annotation state (``window.cornerstoneTools``), with Cornerstone's own world -> image
transform (``window.cornerstone.utilities.worldToImageCoords``). Boxes come back as ``[x1, y1, x2, y2]`` in the
referenced instance's pixel coordinates, the SR's own (top-left corner of the top-left pixel = (0, 0)).
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.e2e.browser import Chromium

# Cornerstone annotation / OHIF measurement -> {label, sop, bounds, ...}; `a` is bound by the caller
_BOUNDS = """
  const imageId = a.metadata ? a.metadata.referencedImageId : a.referencedImageId;
  const points = (a.data && a.data.handles ? a.data.handles.points : a.points).map(
    p => cornerstone.utilities.worldToImageCoords(imageId, p));
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  const sop = cornerstone.metaData.get('instance', imageId).SOPInstanceUID;
  const bounds = [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)];
"""

AI_BOXES = f"""(() => cornerstoneTools.annotation.state.getAllAnnotations()
  .filter(a => a.metadata.toolName === 'DICOMSRDisplay' && a.metadata.referencedImageId)
  .map(a => {{ {_BOUNDS} return {{ label: a.data.label, sop, bounds,
     lines: (a.data.labels || []).map(l => [l.label, String(l.value)]) }}; }}))()"""

MEASUREMENTS = f"""(() => window.services.measurementService.getMeasurements().map(a => {{ {_BOUNDS}
  return {{ uid: a.uid, label: a.label, tool: a.toolName, sop, bounds }}; }}))()"""


class OHIF:
    """One study open in OHIF's longitudinal ("viewer") mode."""

    def __init__(self, browser: Chromium, server: str) -> None:
        self.browser = browser
        self.server = server

    def open_study(self, study_uid: str, modalities: tuple[str, ...] = ("SR",)) -> None:
        """Open the viewer on a study and wait until its series (and one of each of ``modalities``) are listed."""
        self.browser.goto(f"{self.server}/ohif/viewer?StudyInstanceUIDs={study_uid}")
        wanted = json.dumps(list(modalities))
        self.browser.wait_for(
            f"""window.services && (() => {{ const sets = window.services.displaySetService.getActiveDisplaySets();
                return {wanted}.every(m => sets.some(d => d.Modality === m)); }})()""",
            timeout=120,
            what="the study's display sets",
        )
        self.wait_for_image()
        banner = '[data-cy="confirm-and-hide-button"]'  # "investigational use", once per browser profile
        if self.browser.evaluate(f"!!document.querySelector({json.dumps(banner)})"):
            self.browser.click_on(banner)

    def wait_for_image(self, timeout: float = 60) -> None:
        """Until a stack viewport has drawn an image and a second has passed: loading another series into a
        viewport that is still starting up makes OHIF destroy it mid-render (its error boundary then leaves the
        viewport blank for the rest of the visit)."""
        self.browser.wait_for(
            "cornerstone.getEnabledElements().some(e => e.viewport.type === 'stack' && e.viewport.getCornerstoneImage"
            " && e.viewport.getCornerstoneImage())",
            timeout,
            what="a drawn image in a stack viewport",
        )
        time.sleep(1.0)

    def errors(self) -> list[str]:
        """What OHIF's error boundaries caught (they log it and show "Something went wrong")."""
        return [line for line in self.browser.console if "Error Boundary" in line]

    def display_sets(self, modality: str) -> list[dict[str, Any]]:
        return self.browser.evaluate(
            f"""window.services.displaySetService.getActiveDisplaySets()
               .filter(d => d.Modality === {json.dumps(modality)})
               .map(d => ({{uid: d.displaySetInstanceUID, series: d.SeriesInstanceUID,
                          description: d.SeriesDescription}}))"""
        )

    def show_series(self, series_uid: str) -> str:
        """Double-click a series' thumbnail in the study browser (loads it into the viewport); its display set."""
        (uid,) = [d["uid"] for d in self.display_sets("SR") + self.display_sets("CT") if d["series"] == series_uid]
        self.browser.click_on(f"#thumbnail-{uid}", clicks=2)
        return uid

    def ai_boxes(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        """The SR rectangles OHIF draws (read-only), once ``count`` of them are on their images."""
        return self.browser.wait_for(
            f"(() => {{ const boxes = {AI_BOXES}; return boxes.length >= {count} ? boxes : null; }})()",
            timeout,
            what=f"{count} SR rectangles on their images",
        )

    def take_over(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        """Answer "Yes" to OHIF's "continue tracking measurements?": the SR's rectangles become editable."""
        self.browser.click_text("Yes", timeout=timeout)
        return self.measurements(count, timeout)

    def measurements(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        return self.browser.wait_for(
            f"(() => {{ const m = {MEASUREMENTS}; return m.length >= {count} ? {{ m }} : null; }})()",
            timeout,
            what=f"{count} measurements in OHIF's measurement service",
        )["m"]

    def open_measurements_panel(self) -> None:
        if not self.browser.evaluate(
            "[...document.querySelectorAll('button')].some(b => b.textContent.trim() === 'Create SR' "
            "&& b.getBoundingClientRect().width > 0)"
        ):
            self.browser.click_on('[data-cy="trackedMeasurements-btn"]')

    def shown_measurement(self, timeout: float = 60) -> str:
        """The label of a measurement on the image the viewport shows (after a take-over OHIF shows the first
        one's), once that viewport has stayed the same for a second (OHIF swaps the SR viewport for a stack
        viewport meanwhile)."""
        shown = """(() => {
            const current = cornerstone.getEnabledElements().map(e => e.viewport.getCurrentImageId && e.viewport
              .getCurrentImageId()).filter(Boolean);
            const m = window.services.measurementService.getMeasurements()
              .find(m => current.includes(m.referencedImageId));
            const ready = cornerstone.getEnabledElements().some(e => e.viewport.type === 'stack'
              && e.viewport.getCornerstoneImage && e.viewport.getCornerstoneImage());
            return m && ready ? m.label + '|' + current.join(',') : null;
          })()"""
        deadline = time.monotonic() + timeout
        last = self.browser.wait_for(shown, timeout, what="a measurement on the viewport's image")
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = self.browser.wait_for(shown, timeout, what="a measurement on the viewport's image")
            if now == last:
                return now.split("|")[0]
            last = now
        raise TimeoutError(f"the viewport did not settle within {timeout} s")

    def drag_corner(self, label: str, to_pixel: tuple[float, float]) -> None:
        """Drag the bottom-right handle of the measurement labelled ``label``, which the viewport shows, with the
        mouse to image pixel ``to_pixel`` of its instance."""
        where = f"""(() => {{
            const m = window.services.measurementService.getMeasurements().find(m => m.label === {json.dumps(label)});
            const ee = cornerstone.getEnabledElements().find(
              e => e.viewport.getCurrentImageId && e.viewport.getCurrentImageId() === m.referencedImageId);
            if (!ee) return null;
            const r = ee.viewport.canvas.getBoundingClientRect();
            const pixel = p => cornerstone.utilities.worldToImageCoords(m.referencedImageId, p);
            const corner = m.points.reduce((a, p) => (pixel(p)[0] + pixel(p)[1] > pixel(a)[0] + pixel(a)[1] ? p : a));
            const from = ee.viewport.worldToCanvas(corner);
            const to = ee.viewport.worldToCanvas(cornerstone.utilities.imageToWorldCoords(m.referencedImageId,
                                                                                             {json.dumps(to_pixel)}));
            return [r.left + from[0], r.top + from[1], r.left + to[0], r.top + to[1]];
          }})()"""
        bounds = f"""(() => {{ const a = window.services.measurementService.getMeasurements()
          .find(m => m.label === {json.dumps(label)}); {_BOUNDS} return bounds; }})()"""
        before = self.browser.evaluate(bounds)
        for _ in range(3):  # a drag landing while OHIF still swaps viewports moves nothing: the reader tries again
            x0, y0, x1, y1 = self.browser.wait_for(where, 30, what=f"the {label!r} measurement on screen")
            self.browser.drag((x0, y0), (x1, y1), steps=10)
            time.sleep(1.0)  # Cornerstone recomputes the stats and OHIF's measurement after the last mouse event
            if self.browser.evaluate(bounds) != before:
                return

    def show_image(self, index: int) -> str:
        """Scroll the viewport to image ``index`` of its stack (OHIF's order); the SOP instance shown."""
        self.browser.evaluate(f"cornerstone.getEnabledElements()[0].viewport.setImageIdIndex({index})")
        time.sleep(0.5)
        return self.browser.evaluate(
            "cornerstone.metaData.get('instance', cornerstone.getEnabledElements()[0].viewport.getCurrentImageId())"
            ".SOPInstanceUID"
        )

    def draw(self, tool: str, start: tuple[float, float], end: tuple[float, float]) -> None:
        """Pick ``tool`` (e.g. RectangleROI, EllipticalROI) from the measurement tools menu and drag from image
        pixel ``start`` to ``end`` on the image shown; answers "Yes" if OHIF asks to track the series."""
        self.browser.click_on('[data-cy="MeasurementTools-split-button-secondary"]')
        self.browser.click_on(f'[data-cy="{tool}"]')
        before = len(self.measurements(0))
        screen = f"""(() => {{ const v = cornerstone.getEnabledElements()[0].viewport; const id = v.getCurrentImageId();
            const r = v.canvas.getBoundingClientRect();
            return {json.dumps([start, end])}.map(p => {{
              const c = v.worldToCanvas(cornerstone.utilities.imageToWorldCoords(id, p));
              return [r.left + c[0], r.top + c[1]]; }}); }})()"""
        (x0, y0), (x1, y1) = self.browser.evaluate(screen)
        self.browser.drag((x0, y0), (x1, y1), steps=10)
        self.measurements(before + 1)
        asked = "document.body.innerText.includes('Track measurements for this series?')"
        deadline = time.monotonic() + 5  # OHIF asks once per series, a moment after the first measurement
        while time.monotonic() < deadline:
            if self.browser.evaluate(asked):
                self.browser.click_text("Yes")
                break
            time.sleep(0.3)

    def rename(self, row: int, label: str) -> None:
        """The measurement panel's row ``row`` (0 = first) menu -> "Rename" -> type ``label`` -> Save."""
        self.open_measurements_panel()
        menus = """[...document.querySelectorAll('button')]
            .filter(b => b.textContent.trim() === 'icon-more' && b.getBoundingClientRect().width > 0)"""
        x, y = self.browser.wait_for(
            f"""(() => {{ const b = {menus}[{row}]; if (!b) return null; const r = b.getBoundingClientRect();
                return [r.left + r.width / 2, r.top + r.height / 2]; }})()""",
            30,
            what=f"the menu of measurement row {row}",
        )
        self.browser.click(x, y)
        self.browser.click_text("Rename", selector="span, div, button")
        self.browser.click_on('[data-cy="input-annotation"]')
        self.browser.type_text(label)
        self.browser.click_on('[data-cy="save-btn"]')
        time.sleep(0.5)

    def create_sr(self, name: str) -> None:
        """The measurement panel's "Create SR", named ``name`` (OHIF stores it through its DICOMweb source)."""
        self.open_measurements_panel()
        self.browser.click_text("Create SR")
        # the name field of the dialog that holds the Save button (other text inputs are on the page too)
        x, y = self.browser.wait_for(
            """(() => { let box = document.querySelector('[data-cy="Save-btn"]');
                 while (box && !box.querySelector('input')) box = box.parentElement;
                 const input = box && box.querySelector('input'); if (!input) return null;
                 const r = input.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()""",
            30,
            what='the "Create Report" dialog',
        )
        self.browser.click(x, y)
        self.browser.type_text(name)
        self.browser.wait_for(
            f"""(() => {{ let box = document.querySelector('[data-cy="Save-btn"]');
                 while (box && !box.querySelector('input')) box = box.parentElement;
                 return box.querySelector('input').value === {json.dumps(name)}; }})()""",
            10,
            what="the report name typed",
        )
        self.browser.click_on('[data-cy="Save-btn"]')
