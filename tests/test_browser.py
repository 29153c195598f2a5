"""The explorer as a user meets it: JupyterLab from this venv, Debian's chromium driven by Selenium.

Starts JupyterLab on 127.0.0.1 (own port and token) over a copy of a notebook with ``interactive = True``
and smoke-size parameters, runs all cells, checks that none raised, clicks a patch of the explorer's
image and checks that the image changed and names the patch; then saves, shuts the kernel down, reloads
the page and checks the explorer cell shows an image and no "model not found". Screenshots go to
``runs/browser/``. Skips only where chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from nbsupport.core import paths
from nbsupport.notebook import runner

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
NOTEBOOK = "02_best_buddies"
# smoke sizes, trimmed further: the test is about the explorer, not the study
OVERRIDES = {"interactive": True, "n_images": 6, "n_queries": 1, "ks": [1, 2], "k_shown": 2}

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(DRIVER is None, reason="chromedriver is not installed (apt-get install chromium-driver)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook_copy(folder: Path) -> Path:
    """The notebook with the runner's smoke parameters (and ``OVERRIDES``) in a cell after its parameters
    cell, as papermill injects them."""
    import nbformat

    src = runner.notebooks_dir() / f"{NOTEBOOK}.ipynb"
    params = runner.resolve_parameters(src, "smoke", runner.load_profiles(), OVERRIDES)
    nb = nbformat.read(src, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    code = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(code, metadata={"tags": ["injected-parameters"]}))
    out = folder / src.name
    nbformat.write(nb, out)
    return out


def _settings(folder: Path) -> Path:
    """Empty user settings: the test's JupyterLab runs with the defaults, whatever this machine has."""
    (folder / "settings").mkdir()
    return folder / "settings"


@pytest.fixture
def lab(tmp_path):
    """``(base url, token, notebook path)`` of a JupyterLab serving a copy of the notebook; stopped by PID."""
    root = tmp_path / "work"
    root.mkdir()
    nb = _notebook_copy(root)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(
        os.environ,
        JUPYTERLAB_SETTINGS_DIR=str(_settings(tmp_path)),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        NBSUPPORT_ROOT=str(paths.project_root()),
        NBSUPPORT_RUN_DIR=str(tmp_path / "run"),
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}"]
    cmd += ["--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"]
    cmd += ["--LabApp.expose_app_in_browser=True"]
    cmd += ["--allow-root"] if os.geteuid() == 0 else []
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base, token, nb
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started (its own process group)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(what: str, fn, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


STATE_JS = """
const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
if (!nb || !nb.content || !nb.sessionContext || !nb.sessionContext.session) return null;
const kernel = nb.sessionContext.session.kernel;
const cells = nb.content.widgets.filter(c => c.model.type === 'code');
return {
  status: kernel ? kernel.status : 'none',
  done: cells.every(c => c.model.executionCount !== null),
  errors: cells.flatMap(c => c.model.outputs.toJSON().filter(o => o.output_type === 'error')
                                 .map(o => o.ename + ': ' + o.evalue)),
};
"""


def _shot(driver, el, name: str) -> np.ndarray:
    from PIL import Image

    out = paths.project_root() / "runs" / "browser"
    out.mkdir(parents=True, exist_ok=True)
    png = el.screenshot_as_png
    (out / name).write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_explorer_in_jupyterlab(lab, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    base, token, nb_path = lab
    t0 = time.time()
    browser.get(f"{base}/lab/tree/{nb_path.name}?token={token}")
    _wait("the notebook and its kernel", lambda: (s := browser.execute_script(STATE_JS)) and s["status"] == "idle", 90)
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    state = _wait(
        "all cells to run",
        lambda: (
            (s := browser.execute_script(STATE_JS)) and (s["errors"] or (s["done"] and s["status"] == "idle")) and s
        ),
        150,
    )
    assert not state["errors"], state["errors"]
    run_s = time.time() - t0

    img = _wait("the explorer image", lambda: browser.find_elements(By.CSS_SELECTOR, ".nbs-explorer img"), 30)[0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", img)
    status = browser.find_elements(By.CSS_SELECTOR, ".nbs-explorer .widget-html")[-1]
    before, src0, text0 = _shot(browser, img, "before_click.png"), img.get_attribute("src"), status.text
    assert "row" in text0, text0
    # the snapshot below the live widget is hidden while the widget is on the page
    hidden = browser.execute_script(
        "return [...document.querySelectorAll('.jp-OutputArea-child:has(.nbs-explorer) ~ .jp-OutputArea-child')]"
        ".map(e => getComputedStyle(e).display)"
    )
    assert hidden and set(hidden) == {"none"}, hidden

    w, h = img.size["width"], img.size["height"]
    # two places in image A (the left third of the figure): lower left, then upper right of A
    for n, (fx, fy) in enumerate(((0.08, 0.75), (0.22, 0.3))):
        t1 = time.time()
        ActionChains(browser).move_to_element_with_offset(
            img, int((fx - 0.5) * w), int((fy - 0.5) * h)
        ).click().perform()
        _wait("the click to redraw", lambda old=src0: img.get_attribute("src") != old, 20, every=0.05)
        click_s, clicked = time.time() - t1, n
        if status.text != text0:  # the first place may be the patch shown already
            break
        src0 = img.get_attribute("src")
    after = _shot(browser, img, "after_click.png")
    _shot(browser, browser.find_element(By.CSS_SELECTOR, ".nbs-explorer"), "live_explorer.png")
    assert before.shape == after.shape
    assert np.abs(before - after).sum() > 1000, "the explorer image did not change after the click"
    assert "patch (row" in status.text and status.text != text0, (text0, status.text)
    picked = status.text.split("patch (")[1].split(")")[0]
    row, col = (int(v.split()[-1]) for v in picked.split(","))
    grid = 8  # smoke: 64 px at stride 8
    assert (row >= grid // 2 and col < grid // 2) if clicked == 0 else (row < grid // 2 and col >= grid // 2), picked
    print(f"\nrun all: {run_s:.1f} s; click to redraw: {click_s:.2f} s; picked {picked}")

    # saved and reopened without a kernel: an image of the last state, never "model not found"
    browser.execute_script("window.jupyterapp.commands.execute('docmanager:save');")
    _wait("the save", lambda: "image/png" in nb_path.read_text(), 20)
    saved = json.loads(nb_path.read_text())
    cell = next(c for c in saved["cells"] if "BestBuddyExplorer" in "".join(c["source"]))
    assert any("image/png" in o.get("data", {}) for o in cell["outputs"])
    for k in json.load(urllib.request.urlopen(f"{base}/api/kernels?token={token}")):
        req = urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(req)
    browser.refresh()
    _wait("the reopened notebook", lambda: browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 60)
    cell_js = """
    const nb = window.jupyterapp.shell.currentWidget;
    const i = nb.content.widgets.findIndex(c => c.model.sharedModel.getSource().includes('BestBuddyExplorer'));
    nb.content.activeCellIndex = i;
    nb.content.scrollToItem(i, 'center');
    const node = nb.content.widgets[i].node;
    const imgs = [...node.querySelectorAll('.jp-OutputArea-output img')].filter(e => e.offsetParent && e.naturalWidth);
    const text = node.innerText;
    const settled = text.includes('run this cell') || text.includes('model not found');
    return node.isConnected && imgs.length && settled ? {text: text, images: imgs.length} : null;
    """
    time.sleep(3)  # let the widget manager restore (or fail to)
    shown = _wait("the explorer cell's image in the reopened notebook", lambda: browser.execute_script(cell_js), 30)
    assert "model not found" not in shown["text"], shown["text"][-500:]
    assert "run this cell" in shown["text"]
    assert "model not found" not in browser.find_element(By.TAG_NAME, "body").text
    _shot(browser, browser.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel"), "reopened.png")
