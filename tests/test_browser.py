"""What a person sees, checked in a real browser: headless Debian Chromium (Selenium with the
system's chromedriver, no browser download) against the session's real ``mlflow server``, filled
by the ``pareto_search`` search, and a real ``optuna-dashboard`` on its stored study.

Each view is saved as a screenshot under ``test-artifacts/browser/`` (not committed);
``COATNET_DOCS_IMAGES=docs/images`` also writes the small PNGs the README shows. Without
``chromium`` and ``chromedriver`` the tests skip (``apt-get install chromium chromium-driver``),
unless ``COATNET_REQUIRE_BROWSER=1`` (CI sets it once it installed them), when they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from conftest import optuna_dashboard
from mlflow.tracking import MlflowClient

from coatnet.search.searcher import storage_url
from coatnet.search.tracking.views import run_url, view_url

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-artifacts" / "browser"
WAIT_S = 60.0
BEST = "metrics.`best_val_accuracy`"


def _binaries() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    found = _binaries()
    if found is None:
        message = "needs Debian's chromium and chromedriver: apt-get install chromium " \
                  "chromium-driver"
        if os.environ.get("COATNET_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,900", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(found[1]))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _until(check: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> object:
    """``check()``'s first truthy value, polled; fails naming ``what`` after ``timeout_s``."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - the page is still rendering
            last = err
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} ({last!r})")


def _open(driver, url: str) -> None:
    """A fresh page load (MLflow's pages do not all follow a change of the URL's #route)."""
    driver.get("about:blank")
    driver.get(url)


def _css(driver, selector: str) -> list:
    return driver.find_elements("css selector", selector)


def _text(driver) -> str:
    return driver.find_element("tag name", "body").text


def _close_assistant(driver) -> None:
    """MLflow 3.17 opens its assistant panel on a first visit; it would cover the page."""
    for button in _css(driver, '[data-component-id="mlflow.assistant.chat_panel.close"]'):
        try:
            button.click()
        except Exception:  # noqa: BLE001 - already closing
            pass


def _shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    docs = os.environ.get("COATNET_DOCS_IMAGES")
    if docs:  # small copies for the README
        from PIL import Image

        target = (REPO / docs) if not Path(docs).is_absolute() else Path(docs)
        target.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.thumbnail((1000, 1000))
            image.convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(
                target / f"{name}.png", optimize=True)
    return path


def _ids(outcome, uri: str) -> tuple[str, list[str]]:
    client = MlflowClient(uri)
    experiment_id = client.get_run(outcome.parent_run_id).info.experiment_id
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    return experiment_id, [r.info.run_id for r in children]


def _columns(driver) -> set[str]:
    """Every column id of the runs table, scrolling its body from left to right."""
    seen: set[str] = set()
    for step in range(12):
        driver.execute_script(
            "for (const e of document.querySelectorAll('.ag-body-horizontal-scroll-viewport,"
            " .ag-center-cols-viewport')) e.scrollLeft = arguments[0];", step * 400)
        time.sleep(0.2)
        seen |= {e.get_attribute("col-id") for e in _css(driver, ".ag-header-cell")}
    driver.execute_script("for (const e of document.querySelectorAll("
                          "'.ag-body-horizontal-scroll-viewport, .ag-center-cols-viewport'))"
                          " e.scrollLeft = 0;")
    return seen


def test_the_trials_view_lists_every_run_best_first_with_its_charts(browser, pareto_search):
    outcome, uri = pareto_search
    experiment_id, children = _ids(outcome, uri)
    _open(browser, view_url(uri, experiment_id))
    _until(lambda: "matching runs" in _text(browser), "the runs table")
    _close_assistant(browser)
    assert "/runs" in browser.current_url  # the training runs, not the GenAI overview
    count = 1 + len(children)
    _until(lambda: f"{count} matching runs" in _text(browser), f"{count} matching runs")
    columns = _columns(browser)  # the grid draws only the columns in sight: scroll through
    for column in (BEST, "metrics.`test_accuracy`", "metrics.`macs`", "params.`model.layout`",
                   "params.`train.lr`", "attributes.`Dataset`"):
        assert column in columns, (column, sorted(columns))

    def best_values() -> list[float]:
        cells = browser.execute_script(
            "const out = {}; for (const row of document.querySelectorAll('.ag-row[row-index]')) {"
            " const cell = row.querySelector('.ag-cell[col-id=\"' + arguments[0] + '\"]');"
            " if (cell && cell.innerText.trim()) out[row.getAttribute('row-index')] ="
            " parseFloat(cell.innerText); } return out;", BEST)
        return [cells[i] for i in sorted(cells, key=int)]

    values = _until(lambda: len(best_values()) == count and best_values(), "every metric cell")
    assert values == sorted(values, reverse=True), values  # best first
    _shot(browser, "mlflow-trials-view")

    # the view's chart cards: the validation curves, accuracy against MACs, the parameters
    browser.execute_script(
        'document.querySelector(\'input[name="runs-view-mode"][value="CHART"]\').click()')
    _until(lambda: re.search(r"coatnet-search\s*\(5\)", _text(browser)),
           "the view's chart section of 5 cards")
    _until(lambda: _css(browser, ".js-plotly-plot"), "a drawn chart")
    browser.set_window_size(1600, 1400)  # cards are drawn once in sight: all five, then
    try:
        for title in ("val_accuracy", "val_loss", "train_loss", "macs vs. best_val_accuracy",
                      "Parallel Coordinates"):
            _until(lambda: title in _text(browser), f"the chart card {title!r}")
        # MLflow draws this card itself (d3): one svg ``.axis`` per parameter and the metric
        axes = _until(lambda: len(_css(browser, "svg .axis")) >= 5 and browser.execute_script(
            "return [...document.querySelectorAll('svg .axis')].map(e => e.textContent)"),
            "the drawn parallel coordinates")
        assert any("CCTT" in text or "CCCC" in text for text in axes), axes  # model.layout
        time.sleep(1)  # let plotly finish its transitions before the picture
    finally:
        _shot(browser, "mlflow-trials-charts")
        browser.set_window_size(1600, 900)


def test_the_compare_page_of_the_trials_draws_parallel_coordinates(browser, pareto_search):
    outcome, uri = pareto_search
    experiment_id, children = _ids(outcome, uri)
    runs, experiments = quote(json.dumps(children)), quote(json.dumps([experiment_id]))
    _open(browser, f"{uri}/#/compare-runs?runs={runs}&experiments={experiments}")
    _until(lambda: _css(browser, ".parcoords"), "the parallel-coordinates plot")
    _close_assistant(browser)
    axes = _until(lambda: len(_css(browser, ".parcoords .y-axis")) >= 2 and
                  _css(browser, ".parcoords .y-axis"), "two or more axes")
    assert len(axes) >= 2
    _shot(browser, "mlflow-compare-parallel-coordinates")


@pytest.mark.parametrize("artifact", ["pareto.png", "figures/parallel_coordinates.png",
                                      "figures/param_importance.png",
                                      "figures/learning_curves.png"])
def test_the_parent_artifacts_page_shows_the_picture(browser, pareto_search, artifact):
    outcome, uri = pareto_search
    experiment_id, _ = _ids(outcome, uri)
    _open(browser, run_url(uri, experiment_id, outcome.parent_run_id, artifact=artifact))
    _close_assistant(browser)

    def shown() -> bool:
        return any(img.get_attribute("src") and
                   browser.execute_script("return arguments[0].naturalWidth", img) > 200
                   for img in _css(browser, "img"))

    _until(shown, f"the image {artifact}")
    text = _text(browser)
    assert artifact.split("/")[-1] in text  # the file tree names it
    assert "Model registry" in text and "Evaluation runs" not in text, text[:400]  # not GenAI
    _shot(browser, "mlflow-artifact-" + Path(artifact).stem.replace("_", "-"))


@pytest.fixture(scope="module")
def dashboard(pareto_search, tmp_path_factory) -> Iterator[str]:
    outcome, _ = pareto_search
    log = tmp_path_factory.mktemp("dashboard") / "dashboard.log"
    with optuna_dashboard(storage_url(outcome.experiment_dir), log) as base:
        yield base


def test_optuna_dashboard_lists_the_study_trials(browser, pareto_search, dashboard):
    import optuna

    outcome, _ = pareto_search
    studies = requests.get(f"{dashboard}/api/studies",
                           timeout=10).json()["study_summaries"]
    study = next(s for s in studies if s["study_name"] == "front")
    stored = optuna.load_study(study_name="front", storage=storage_url(outcome.experiment_dir))
    _open(browser, f"{dashboard}/dashboard/studies/{study['study_id']}/trials")
    _until(lambda: "Trial 0" in _text(browser), "the trial list")
    text = _text(browser)
    for trial in stored.trials:
        assert f"Trial {trial.number}" in text, trial.number
    _shot(browser, "optuna-dashboard-trials")
