"""Browser tests: a failing test leaves a screenshot and the page's console where it can be looked at."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.browser import CHROMIUM, Chromium


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where failing browser tests write screenshots: ``$EVLF_E2E_ARTIFACTS`` or a pytest temp folder."""
    folder = os.environ.get("EVLF_E2E_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("e2e-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(artifacts: Path) -> Iterator[Chromium]:
    if not CHROMIUM:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with Chromium(log_path=artifacts / "chromium.log") as chromium:
        yield chromium


@pytest.fixture(autouse=True)
def screenshot_on_failure(request: pytest.FixtureRequest, artifacts: Path) -> Iterator[None]:
    yield
    if not request.node.stash.get(_FAILED, False) or "browser" not in request.fixturenames:
        return
    chromium: Chromium = request.getfixturevalue("browser")
    stem = request.node.name
    try:
        chromium.screenshot(artifacts / f"{stem}.png")
    except Exception as exc:  # a dead browser still leaves its console
        (artifacts / f"{stem}.screenshot-error.txt").write_text(repr(exc))
    (artifacts / f"{stem}.console.txt").write_text("\n".join(chromium.console))
    print(f"\nscreenshot and browser console of the failure: {artifacts}")
