"""Every notebook as a learner meets it: JupyterLab in Chromium, outputs cleared, Run All from the menu.

The test starts JupyterLab on 127.0.0.1 (a free port, no token) on copies of the notebooks with
their outputs cleared, and drives Debian's Chromium with Playwright (never a downloaded browser).
For each notebook it clicks Run > Run All Cells, waits for the kernel, then checks the page: every
code cell ran, no Python traceback, no "Javascript Error", every ipywidgets widget, offline attention
viewer and bertviz view the stored notebook has is rendered. bertviz's CDN scripts are answered
from local npm copies (require.js 2.3.6, d3 5.7.0, and jQuery 2.1.0 for the 2.0.0 bertviz asks for,
which npm lacks); any other request that would leave the machine is blocked and fails the test.
One screenshot per notebook goes to build/browser-screenshots/. A last test shows bertviz's page
with the CDN unreachable and checks it says why and points to the offline viewer.

It is also Binder's memory test. The server runs with MEM_LIMIT at Binder's 2 GiB, as on
mybinder.org, and after each Run All the test reads the kernel's peak (VmHWM) and the server's
peak so far. It requires kernel <= 1.5 GB and kernel + server <= 2 GiB, since Binder gives the
two 2 GiB together. tests/test_binder.py checks that binder/ builds an environment with this one's
packages, the heavy ones (torch, transformers, ...) at the same versions.

Needs /usr/bin/chromium (apt install chromium), npm and playwright (pip); .ci/run installs them.
Without them the tests are skipped, except under CI=1, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import nbformat
import psutil
import pytest

from tests import nb_budgets
from tests.fresh import free_port, scratch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ASSETS = ROOT / "build" / "browser-assets"
SHOTS = ROOT / "build" / "browser-screenshots"
NPM_PACKAGES = ["requirejs@2.3.6", "d3@5.7.0", "jquery@2.1.0"]
CDN = "https://cdnjs.cloudflare.com/ajax/libs/"
CDN_FILES = {  # what bertviz 1.4 loads -> the local copy that answers it
    CDN + "require.js/2.3.6/require.min.js": "node_modules/requirejs/require.js",
    CDN + "d3/5.7.0/d3.min.js": "node_modules/d3/dist/d3.min.js",
    CDN + "jquery/2.0.0/jquery.min.js": "node_modules/jquery/dist/jquery.min.js",
}
pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 1800  # a hang guard for one notebook's Run All (minutes on a quiet machine; 20 seen loaded)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# The Colab and Binder badge images of each notebook's header: decorative, offline they show their
# alt text. They are blocked like the rest, but do not fail the test.
BADGES = {"https://colab.research.google.com/assets/colab-badge.svg", "https://mybinder.org/badge_logo.svg"}


def require(ok: bool, what: str) -> None:
    """Skip without `what`, except in CI, where a missing tool is a failure."""
    if not ok:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"the browser test needs {what}")


def install_assets() -> Path:
    """bertviz's three scripts, installed from the npm registry once, into build/browser-assets."""
    if not all((ASSETS / path).exists() for path in CDN_FILES.values()):
        ASSETS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(ASSETS),
                        *NPM_PACKAGES], check=True, capture_output=True, timeout=300)
    return ASSETS


@pytest.fixture(scope="module")
def assets() -> Path:
    require(shutil.which("npm") is not None or (ASSETS / "node_modules").exists(), "npm (apt install npm)")
    return install_assets()


def cleared_copy(source: Path, folder: Path) -> None:
    """The notebook as a learner who has not run it yet would see it... after Clear All Outputs."""
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, folder / source.name)


class Lab(NamedTuple):
    base: str  # http://127.0.0.1:PORT
    pid: int  # the server's process


@pytest.fixture(scope="module")
def jupyterlab():
    with scratch("browser") as root:
        yield from serve_notebooks(root)


def serve_notebooks(root: Path):
    """JupyterLab on 127.0.0.1, no token, serving cleared copies of the notebooks; stopped at the end."""
    folder, settings, workspaces = root / "lab", root / "lab-settings", root / "lab-workspaces"
    folder.mkdir()
    for path in NOTEBOOKS:
        cleared_copy(path, folder)
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))  # every cell in the page, to be checked
    notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port = free_port()
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={folder}",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # this test's own server, on 127.0.0.1 without a token
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(workspaces),
           "MEM_LIMIT": str(nb_budgets.BINDER_BYTES)}  # as Binder sets it
    log = open(root / "jupyterlab.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/api/status", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: see {log.name}") from None
                time.sleep(0.5)
        yield Lab(base, server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    require(CHROMIUM.exists(), f"{CHROMIUM} (apt install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright (pip install playwright; no browser download: Debian's chromium is used)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


class Network:
    """Answers bertviz's CDN requests from the local copies, lets 127.0.0.1 through, blocks the rest."""

    def __init__(self, base: str, assets: Path | None):
        self.base, self.assets = base, assets
        self.answered: list[str] = []
        self.blocked: list[str] = []

    def __call__(self, route) -> None:
        url = route.request.url
        if url.startswith(self.base + "/"):
            route.continue_()
        elif self.assets is not None and url in CDN_FILES:
            self.answered.append(url)
            route.fulfill(path=self.assets / CDN_FILES[url], content_type="application/javascript")
        else:
            if url not in BADGES:
                self.blocked.append(url)
            route.abort()


def stored_counts(path: Path) -> dict[str, int]:
    """How many widgets, offline viewers and bertviz views the committed notebook's outputs hold."""
    counts = {"widgets": 0, "viewers": 0, "bertviz": 0}
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            page = data.get("text/html", "")
            counts["widgets"] += WIDGET_MIME in data
            counts["viewers"] += page.count('class="llama-lab-attention-viewer"')
            counts["bertviz"] += page.count('class="llama-lab-bertviz"')
    return counts


PROMPTS_JS = """() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
                       .map(p => p.textContent.trim())"""


def kernel_states(page, base: str) -> list[str]:
    sessions = page.request.get(base + "/api/sessions").json()
    return [session["kernel"]["execution_state"] for session in sessions]


def run_all(page, base: str) -> list[str]:
    """Click Run > Run All Cells, as a learner does, once the kernel is up; wait until no cell is
    queued or running. (page.wait_for_timeout, not time.sleep: Playwright answers the routes only
    inside its own calls.)"""
    deadline = time.monotonic() + 180
    while kernel_states(page, base) != ["idle"]:
        assert time.monotonic() < deadline, f"the kernel did not start: {kernel_states(page, base)}"
        page.wait_for_timeout(500)
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        prompts = page.evaluate(PROMPTS_JS)
        started = any(re.search(r"\[(\d+|\*)\]", p) for p in prompts)
        if started and not any("*" in p for p in prompts) and kernel_states(page, base) == ["idle"]:
            return prompts
        assert time.monotonic() < deadline, f"Run All did not finish in {RUN_TIMEOUT_S} s: {prompts}"
        page.wait_for_timeout(1000)


def first_rich_output(page):
    for selector in ["iframe.llama-lab-bertviz", ".jupyter-widgets", ".llama-lab-attention-viewer"]:
        if page.locator(selector).count():
            return page.locator(selector).first
    return page.locator(".jp-Notebook .jp-Cell").last


def memory_peaks(page, lab: Lab) -> tuple[int, int]:
    """The peak resident set (VmHWM, bytes) of this notebook's kernel, and of the server so far."""
    [session] = page.request.get(lab.base + "/api/sessions").json()
    kernel_id = session["kernel"]["id"]
    [kernel] = [p for p in psutil.Process(lab.pid).children(recursive=True)
                if any(kernel_id in arg for arg in command_line(p))]
    return nb_budgets.vm_hwm(kernel.pid), nb_budgets.vm_hwm(lab.pid)


def command_line(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # it ended after the listing
        return []


def shut_down_kernels(page, base: str) -> None:
    """What File > Shut Down would do for this notebook's kernel: free its memory for the next one."""
    xsrf = next(c["value"] for c in page.context.cookies() if c["name"] == "_xsrf")
    for session in page.request.get(base + "/api/sessions").json():
        page.request.delete(f"{base}/api/sessions/{session['id']}", headers={"X-XSRFToken": xsrf})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_run_all_in_jupyterlab_renders_everything_within_binders_memory(path, jupyterlab, browser, assets):
    expected = stored_counts(path)
    network = Network(jupyterlab.base, assets)
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    context.route("**/*", network)
    page = context.new_page()
    page_errors = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    try:
        page.goto(f"{jupyterlab.base}/lab/tree/{path.name}?reset")
        prompts = run_all(page, jupyterlab.base)
        kernel, server = memory_peaks(page, jupyterlab)
        page.wait_for_timeout(3000)  # late renderers: widgets, iframes
        SHOTS.mkdir(parents=True, exist_ok=True)
        first_rich_output(page).scroll_into_view_if_needed()
        page.screenshot(path=SHOTS / f"{path.stem}.png")
        print(f"screenshot: {SHOTS / (path.stem + '.png')}")

        outputs = page.locator(".jp-OutputArea").all_inner_texts()
        tracebacks = [text[-3000:] for text in outputs if "Traceback (most recent call last)" in text]
        assert not tracebacks, tracebacks[0]
        not_run = [i for i, p in enumerate(prompts) if not re.search(r"\[\d+\]", p)]
        assert not not_run, f"code cells {not_run} did not run (of {len(prompts)})"
        assert "Javascript Error" not in "\n".join(outputs)

        widgets = page.locator(".jp-OutputArea-output > .jupyter-widgets")  # each displayed widget, drawn
        assert widgets.count() == expected["widgets"], [t for t in outputs if "widget" in t.lower()]
        assert not re.search(r"Error displaying widget|Loading widget|VBox\(children", "\n".join(outputs))

        viewers = page.locator(".llama-lab-attention-viewer")
        assert viewers.count() == expected["viewers"]
        for i in range(viewers.count()):
            assert viewers.nth(i).locator("svg > *").count() > 0, f"attention viewer {i} drew nothing"
            assert viewers.nth(i).locator("[data-role=nojs]").count() == 0

        frames = page.locator("iframe.llama-lab-bertviz")
        assert frames.count() == expected["bertviz"]
        if frames.count():
            page.wait_for_timeout(16_000)  # past the page's own check (nothing drawn after 15 s: the note)
        for i in range(frames.count()):
            frame = frames.nth(i).content_frame
            frame.locator("#vis svg *").first.wait_for(state="attached", timeout=60_000)
            if frame.locator("select").count():  # the head view's Layer menu
                assert frame.locator("select option").count() > 0, f"bertviz view {i}: empty Layer menu"
            assert frame.locator(".llama-lab-bertviz-offline").is_hidden()
        if expected["bertviz"]:
            assert sorted(set(network.answered)) == sorted(CDN_FILES), network.answered
        assert not network.blocked, f"requests that would leave the machine: {network.blocked}"
        print(f"{path.name}: {len(prompts)} code cells ran; rendered {expected}; page errors: {page_errors}")

        nb_budgets.check_binder(f"{path.name} (JupyterLab's peak so far)", kernel, server)
    finally:
        shut_down_kernels(page, jupyterlab.base)
        context.close()


def test_bertviz_offline_says_why_and_points_to_the_offline_viewer(browser):
    """With the CDN unreachable (a workshop without Wi-Fi) the view says so instead of a blank box."""
    from llama_lab import attention, load_model

    model, tokenizer = load_model("tiny-random", attn_implementation="eager")
    maps = attention.collect_attention(model, tokenizer, "hello", layers=[0], heads=[0])
    view = attention.bertviz_view(maps)
    network = Network("http://127.0.0.1:0", assets=None)  # nothing is answered: offline
    context = browser.new_context()
    context.route("**/*", network)
    page = context.new_page()
    try:
        page.set_content(view.data)
        note = page.locator("iframe.llama-lab-bertviz").content_frame.locator(".llama-lab-bertviz-offline")
        note.wait_for(state="visible", timeout=30_000)
        assert note.inner_text() == attention.BERTVIZ_OFFLINE
        assert "needs the internet" in note.inner_text() and "attention_viewer" in note.inner_text()
        assert CDN + "require.js/2.3.6/require.min.js" in network.blocked
    finally:
        context.close()
