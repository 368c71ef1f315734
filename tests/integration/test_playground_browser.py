"""The playground page (`GET /`, serving/static/) driven in headless Chromium through Selenium, against a real
uvicorn server with the tiny model: with the admin key the page creates a user, adds a history item, sends a
request and shows the streamed text, which equals the server's non-streamed answer to the same request; the item
the prompt used is highlighted. Skipped, saying why, without selenium, chromium or chromedriver
(`apt-get install -y chromium chromium-driver`, `pip install selenium`)."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import httpx
import pytest

from ..serving.conftest import ADMIN, ADMIN_KEY, make_service, scaled_tiny_model

pytestmark = pytest.mark.integration

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if CHROMIUM is None:
        return "no chromium on PATH (apt-get install -y chromium chromium-driver)"
    if DRIVER is None:
        return "no chromedriver on PATH (apt-get install -y chromium-driver)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny():
    return scaled_tiny_model()


@pytest.fixture
def server(tiny, tmp_path):
    import uvicorn

    from flythinker.serving.app import create_app

    svc = make_service(tiny, f"sqlite:///{tmp_path / 'db.sqlite'}")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", svc
    finally:
        srv.should_exit = True
        thread.join(30)
        svc.db.close()


@pytest.fixture
def browser():
    why = _missing()
    if why:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=DriverService(executable_path=DRIVER), options=opts)
    except Exception as e:  # noqa: BLE001 -- a browser that cannot start here is a skip, not a failure
        pytest.skip(f"chromium did not start: {str(e).strip().splitlines()[0]}")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str, timeout: float = 30):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))
    except TimeoutException:
        status = driver.find_element("id", "status").text
        raise AssertionError(f"timed out waiting for {what}; page status: {status!r}") from None


def _type(driver, element_id: str, text: str) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(text)


def test_playground_creates_a_user_adds_an_item_and_streams_a_generation(browser, server):
    base, svc = server
    d = browser
    d.get(base + "/")
    _wait(d, lambda d: "tiny" in d.find_element("id", "model").text, "the model name from /health")

    _type(d, "key", ADMIN_KEY)
    _type(d, "user-id", "alice")
    d.find_element("id", "create-user").click()
    _wait(d, lambda d: "created alice" in d.find_element("id", "newkey").text, "the new user's key")
    assert "ftu_" in d.find_element("id", "newkey").text
    assert d.execute_script("return document.getElementById('user').value") == "alice"

    item = "I loved this album: warm melodies and honest lyrics."
    _type(d, "item-text", item)
    _type(d, "item-title", "Warm and honest")
    d.find_element("id", "add-item").click()
    _wait(d, lambda d: item in d.find_element("id", "items").text, "the item in the history list")
    assert "1 items" in d.find_element("id", "count").text

    request = "Write a review of the new album."
    _type(d, "input", request)
    _type(d, "max-new", "24")
    s0 = svc.engine.stats()
    d.find_element("id", "generate").click()
    _wait(d, lambda d: "wrote" in d.find_element("id", "status").text, "the end of the stream")
    shown = d.find_element("id", "output").text
    status = d.find_element("id", "status").text
    assert shown.strip(), status
    assert "used items #" in status and "prompt" in status
    assert svc.engine.stats()["requests"] == s0["requests"] + 1
    _wait(d, lambda d: d.find_elements("css selector", "#items li.used"), "the used item highlighted")
    assert not d.find_element("id", "generate").get_attribute("disabled")

    # the page showed exactly what the API answers for the same greedy request
    r = httpx.post(base + "/v1/generate", headers=ADMIN, timeout=60,
                   json={"user_id": "alice", "input": request, "max_new_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    # textContent keeps the text as sent; Selenium's .text trims and collapses edges, so compare that way
    assert d.execute_script("return document.getElementById('output').textContent") == r.json()["text"]


def test_playground_shows_api_errors(browser, server):
    base, _ = server
    d = browser
    d.get(base + "/")
    _type(d, "key", "not-a-valid-key-at-all")
    d.find_element("id", "load-users").click()
    _wait(d, lambda d: d.find_element("id", "status").text, "an error message")
    el = d.find_element("id", "status")
    assert "error" in (el.get_attribute("class") or "") and el.text
