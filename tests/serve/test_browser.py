"""The web page of `legrad serve` in a real browser: headless Chromium driven by Selenium.

A real `legrad serve` subprocess on 127.0.0.1 (a free port) serves a tiny exported folder; the test
uploads a sample scene through the page's file input, types two prompts, clicks Explain, and checks
that every overlay image loaded and that the scores shown are the ones `POST /v1/explain` returns for
the same image and prompts. Errors from the API show in the page's error box.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them with apt-get when missing)
and the `serve` extra plus selenium; skipped, with the reason, without them. Set
LEGRAD_BROWSER_SCREENSHOTS=DIR to keep a screenshot of each page checked.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
SCENE = REPO / "assets" / "sample" / "images" / "00005.png"
PROMPTS = ["a red circle", "a blue square"]
STARTUP_S = 90  # a cold start loads onnxruntime and the model; a busy CI machine is slow
EXPLAIN_S = 60

if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
    pytest.skip("needs python-multipart (the serve extra)", allow_module_level=True)
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(
        f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install -y chromium chromium-driver",
        allow_module_level=True,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post_form(url: str, fields: list[tuple[str, str]], files: list[tuple[str, Path]]) -> tuple[int, dict]:
    """A multipart/form-data POST with the standard library (the page's request, made by the test)."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, path in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    request = urllib.request.Request(
        url,
        data=b"".join(parts),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=EXPLAIN_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Server:
    def __init__(self, folder: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        command = "import sys; from legrad_runtime.cli import main; sys.exit(main())"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                command,
                "serve",
                str(folder),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"legrad serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                if _get(self.url + "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        pytest.fail(f"legrad serve not ready after {STARTUP_S} s:\n{self.output()}")

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def explain(self, prompts: list[str], field: str = "prompts") -> tuple[int, dict]:
        fields = [(field, p) for p in prompts] + [("overlays", "true"), ("layers_figure", "false")]
        return _post_form(self.url + "/v1/explain", fields, [("images", SCENE)])


def _serve(folder: Path, log: Path) -> Iterator[Server]:
    server = Server(folder, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory) -> Iterator[Server]:
    yield from _serve(model_folder, tmp_path_factory.mktemp("serve") / "server.log")


@pytest.fixture(scope="module")
def classifier_server(model_folders, tmp_path_factory) -> Iterator[Server]:
    yield from _serve(model_folders["classifier"], tmp_path_factory.mktemp("serve") / "classifier.log")


@pytest.fixture(scope="module")
def driver() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for _console_errors
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(arg)
    # an explicit driver path: Selenium Manager never runs (it would try to download one)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    chrome.set_page_load_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()


def _screenshot(driver: webdriver.Chrome, name: str) -> None:
    folder = os.environ.get("LEGRAD_BROWSER_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, max(800, min(int(height) + 140, 4000)))  # the whole page
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))
        driver.set_window_size(1280, 1100)


def _console_errors(driver: webdriver.Chrome) -> list[str]:
    """The page's console errors since the last call, less the API's answers of 4xx (expected)."""
    entries = driver.get_log("browser")
    return [e["message"] for e in entries if e["level"] == "SEVERE" and "/v1/explain" not in e["message"]]


def _open(driver: webdriver.Chrome, server: Server) -> None:
    driver.get(server.url + "/")
    model_name = json.loads(_get(server.url + "/v1/model")[1])["model_name"]
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model-name").text == model_name)


def _explain_in_page(driver: webdriver.Chrome, lines: list[str], layers: bool = False) -> None:
    driver.find_element(By.ID, "file").send_keys(str(SCENE))
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("const p = document.getElementById('preview'); return p.naturalWidth > 0")
    )
    box = driver.find_element(By.ID, "prompts")
    box.clear()
    box.send_keys("\n".join(lines))
    if layers:
        driver.find_element(By.ID, "layers-figure").click()
    driver.find_element(By.ID, "explain").click()


def _all_loaded(driver: webdriver.Chrome, selector: str) -> bool:
    script = (
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"
    )
    return bool(driver.execute_script(script, selector))


def _wait_results(driver: webdriver.Chrome, count: int) -> list:
    try:
        WebDriverWait(driver, EXPLAIN_S).until(
            lambda d: (
                len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == count
                or d.find_element(By.ID, "error").is_displayed()
            )
        )
    except TimeoutException:
        pytest.fail(
            f"no results after {EXPLAIN_S} s; the page says: {driver.find_element(By.TAG_NAME, 'body').text}"
        )
    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), f"the page shows an error: {error.text}"
    WebDriverWait(driver, 10).until(lambda d: _all_loaded(d, "#results .result img.overlay"))
    return driver.find_elements(By.CSS_SELECTOR, "#results .result")


def _assert_scores(cards: list, image: dict) -> None:
    for p, card in enumerate(cards):
        shown = {k: card.find_element(By.CSS_SELECTOR, f".{k}").text for k in ("similarity", "probability")}
        for key, text in shown.items():
            expected = image["scores"][key][p]
            assert len(text.split(".")[-1]) == 3, f"{key} {text!r}: not 3 decimals"
            assert abs(float(text) - expected) <= 0.0005 + 1e-6, (
                f"card {p}: {key} shows {text}, API {expected}"
            )


def test_page_explains_an_uploaded_image(server, driver):
    _open(driver, server)
    _explain_in_page(driver, PROMPTS, layers=True)
    cards = _wait_results(driver, len(PROMPTS))
    assert [c.find_element(By.CSS_SELECTOR, ".prompt").text for c in cards] == PROMPTS
    assert _all_loaded(driver, "#results .result img.layers"), "a per-layer figure did not load"
    natural = driver.execute_script(
        "return [...document.querySelectorAll('#results img.overlay')]"
        ".map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert all(tuple(size) == Image.open(SCENE).size for size in natural)  # overlays at the image's size
    status, body = server.explain(PROMPTS)
    assert status == 200, body
    assert body["prompts"] == PROMPTS
    _assert_scores(cards, body["images"][0])
    assert _console_errors(driver) == []
    _screenshot(driver, "explained")


def test_page_shows_the_api_error(server, driver):
    _open(driver, server)
    driver.find_element(By.ID, "explain").click()  # no image chosen: the page says so itself
    error = driver.find_element(By.ID, "error")
    WebDriverWait(driver, 5).until(lambda d: error.is_displayed())
    assert "image" in error.text.lower()

    _explain_in_page(driver, [])  # an image but no prompts: the API's 4xx message, shown as is
    status, body = server.explain([])
    assert 400 <= status < 500 and body["error"], body
    WebDriverWait(driver, EXPLAIN_S).until(lambda d: error.is_displayed() and error.text == body["error"])
    assert driver.find_elements(By.CSS_SELECTOR, "#results .result") == []
    assert driver.find_element(By.ID, "explain").is_enabled()
    assert _console_errors(driver) == []
    _screenshot(driver, "error")


def test_page_explains_classes_of_a_classifier(classifier_server, driver):
    server = classifier_server
    _open(driver, server)
    assert "class" in driver.find_element(By.ID, "prompts-label").text.lower()
    meta = json.loads(_get(server.url + "/v1/model")[1])
    classes = [meta["classes"][3], "7"]  # a class by name, one by id
    _explain_in_page(driver, classes)
    cards = _wait_results(driver, len(classes))
    status, body = server.explain(classes, field="classes")
    assert status == 200, body
    image = body["images"][0]
    titles = [c.find_element(By.CSS_SELECTOR, ".prompt").text for c in cards]
    assert titles == image.get("labels", body["prompts"])
    _assert_scores(cards, image)
    assert _console_errors(driver) == []
    _screenshot(driver, "classifier")


def test_page_takes_a_dropped_image(server, driver):
    """A file dropped on the box (a synthetic drop event carrying the scene) is the one explained."""
    _open(driver, server)
    script = """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], arguments[1], {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
    """
    driver.execute_script(script, base64.b64encode(SCENE.read_bytes()).decode(), SCENE.name)
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.getElementById('preview').naturalWidth > 0")
    )
    assert SCENE.name in driver.find_element(By.ID, "file-name").text
    box = driver.find_element(By.ID, "prompts")
    box.send_keys(PROMPTS[0])
    box.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut explains too
    cards = _wait_results(driver, 1)
    status, body = server.explain(PROMPTS[:1])
    assert status == 200, body
    _assert_scores(cards, body["images"][0])
    assert _console_errors(driver) == []


def test_static_files_are_served(server):
    for path in ("/", "/static/app.js", "/static/style.css"):
        status, content = _get(server.url + path)
        assert status == 200 and content, path
