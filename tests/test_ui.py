"""The page at ``/`` of ``ltzoo serve`` (issue 29), tested in a real browser.

Headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium; no
browser is downloaded at run time) against real ``ltzoo serve ncl-resnet32-fmnistlt``
servers on 127.0.0.1, one open and one with an API key. The test uploads Fashion-MNIST test
images, checks what the page shows against ``POST /predict`` for the same image and prior,
switches the prior (by keyboard, then to custom weights), uploads a text file and checks
that the server's error is shown, and saves the screenshot that README shows
(``docs/img/ui.png``). Chromium's network log shows that the page asks nothing outside the
server.

Without Chromium, chromedriver or Selenium the browser tests skip with a message on a
developer machine. They fail instead when ``LTZOO_REQUIRE_BROWSER=1`` (exported by
``.ci/run``) or ``CI`` is set, because CI must run them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serving import Server, running

from ltzoo import zoo

ROOT = Path(__file__).resolve().parents[1]
MODEL = "ncl-resnet32-fmnistlt"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
SCREENSHOT = ROOT / "docs" / "img" / "ui.png"
API_KEY = "ui-test-key"
REQUIRE_BROWSER = os.environ.get("LTZOO_REQUIRE_BROWSER") == "1" or bool(os.environ.get("CI"))
WAIT_S = 30.0
OFFLINE = {"HF_HUB_OFFLINE": "1"}  # the bundled weights

#: one call that reads everything the tests check off a result card of the page
CARD_JS = """
const card = Array.from(document.querySelectorAll("article.result"))
  .find((a) => a.dataset.name === arguments[0]);
if (!card) return null;
const text = (s) => { const e = card.querySelector(s); return e ? e.textContent : null; };
const top1 = card.querySelector(".top1-prob");
return {
  state: card.dataset.state, prior: card.dataset.prior,
  bars: Array.from(card.querySelectorAll(".bar-row"),
    (r) => [r.dataset.label, Number(r.dataset.probability), r.querySelector(".pct").textContent,
            r.dataset.group, r.querySelector(".count").textContent]),
  top1: text(".top1-label"), top1_prob: top1 ? Number(top1.dataset.probability) : null,
  top1_text: top1 ? top1.textContent : null, error: text(".error"), moved: text(".moved"),
  deltas: card.querySelectorAll(".bar-row .delta").length,
  ghosts: card.querySelectorAll(".ghost").length, disagreement: text(".disagreement"),
};
"""


# -- servers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chrome_paths() -> tuple[str, str]:
    """Chromium and chromedriver, or a skip (a failure under CI) naming what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e .[dev])")
    if not missing:
        return str(chromium), str(driver)
    message = (
        f"the browser test needs {', '.join(missing)}: apt-get install -y chromium "
        "chromium-driver; pip install -e .[dev]"
    )
    if REQUIRE_BROWSER:
        pytest.fail(f"{message} (LTZOO_REQUIRE_BROWSER=1 or CI is set: this test must run)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, Server]]:
    """An open server and one with an API key, started together."""
    if not FMNIST.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("ui-serve")
    common = [MODEL, "--threads", "1", "--batch-timeout", "0.002"]
    started = {
        "open": Server(common, root / "open.log", env=OFFLINE),
        "auth": Server(common, root / "auth.log", env={**OFFLINE, "LTZOO_API_KEY": API_KEY}),
    }
    with running(started):
        yield started


@pytest.fixture(scope="module")
def browser(chrome_paths, tmp_path_factory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download anything
    chromium, chromedriver = chrome_paths
    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--lang=en-US",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


# -- Fashion-MNIST images and the reference answers of /predict ----------------------------------
def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def predict(
    server: Server, data: bytes, name: str, prior: Any = "balanced", top_k: int = 5
) -> httpx.Response:
    """``POST /predict`` with a multipart upload, as the page sends it."""
    headers = {"X-API-Key": API_KEY}
    form = {"top_k": str(top_k), "prior": prior if isinstance(prior, str) else json.dumps(prior)}
    return httpx.post(
        f"{server.url}/predict",
        files={"file": (name, data, "application/octet-stream")},
        data=form,
        headers=headers,
        timeout=30,
    )


@pytest.fixture(scope="module")
def images(servers, tmp_path_factory) -> dict[str, Path]:
    """Two Fashion-MNIST test images as PNG files.

    ``moves``: the balanced prior gets a medium / few-shot class right and the training prior
    moves the top-1 to another class (what the prior switch is for); ``head``: a head class
    (many-shot) predicted right.
    """
    from ltzoo.training.data.datasets import read_idx

    pixels = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:64]
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:64]
    pngs = [_png(p) for p in pixels]
    answers = {}
    body = {"images": [base64.b64encode(b).decode() for b in pngs]}
    for prior in ("balanced", "train"):
        r = httpx.post(
            f"{servers['open'].url}/predict", json={**body, "top_k": 10, "prior": prior}, timeout=60
        )
        assert r.status_code == 200, r.text
        answers[prior] = [a["predictions"][0] for a in r.json()]

    def score(i: int) -> float:
        bal, train = answers["balanced"][i], answers["train"][i]
        flipped = bal["index"] != train["index"]
        right_tail = bal["index"] == labels[i] and bal["group"] != "many"
        return 2.0 * flipped + 1.0 * right_tail + abs(bal["probability"] - train["probability"])

    moves = max(range(64), key=score)
    head = next(
        i
        for i in range(64)
        if i != moves
        and answers["balanced"][i]["index"] == labels[i]
        and answers["balanced"][i]["group"] == "many"
    )
    root = tmp_path_factory.mktemp("ui-images")
    files = {"moves": root / f"fashion-mnist-test-{moves}.png"}
    files["head"] = root / f"fashion-mnist-test-{head}.png"
    files["moves"].write_bytes(pngs[moves])
    files["head"].write_bytes(pngs[head])
    return files


# -- browser helpers -----------------------------------------------------------------------------
def card(driver: Any, name: str) -> dict[str, Any] | None:
    return driver.execute_script(CARD_JS, name)


def wait_card(driver: Any, name: str, state: str, prior: str | None = None) -> dict[str, Any]:
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d: Any) -> dict[str, Any] | bool:
        c = card(d, name)
        ok = c is not None and c["state"] == state and (prior is None or c["prior"] == prior)
        return c if ok else False

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(ready)
    except Exception as exc:  # show what the page shows
        raise AssertionError(f"card {name}: {card(driver, name)!r}") from exc


def wait_model(driver: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(
        lambda d: (
            d.execute_script("return document.getElementById('model-name').textContent") == MODEL
            and d.execute_script("return !document.getElementById('file-input').disabled")
        )
    )


def upload(driver: Any, *paths: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in paths))


def requested_urls(driver: Any) -> list[dict[str, Any]]:
    """Every request Chromium sent since the last call: ``{"url", "headers"}``."""
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            sent.append({"url": request["url"], "headers": request.get("headers", {})})
    return sent


def assert_only_this_server(sent: list[dict[str, Any]], server: Server) -> None:
    outside = [
        r["url"]
        for r in sent
        if not r["url"].startswith(server.url + "/") and not r["url"].startswith(("blob:", "data:"))
    ]
    assert sent and not outside, f"requests outside {server.url}: {outside}"


def assert_no_page_errors(driver: Any) -> None:
    """No console errors (a CSP violation is one) beyond the 4xx answers the test provokes."""
    errors = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and not re.search(r"status of 4\d\d", e["message"])
    ]
    assert not errors, errors


def assert_shown(text: str, probability: float) -> None:
    """The page's text for a probability: "87.3 %", or "<0.1 %" below 0.1 %."""
    if text == "<0.1 %":
        assert 0 < probability < 0.001
    else:
        assert float(text.removesuffix(" %")) / 100 == pytest.approx(probability, abs=0.0006)


def assert_bars_match(shown: dict[str, Any], answer: dict[str, Any], info: dict[str, Any]) -> None:
    """The page's bars are /predict's top-k: same classes, order, probabilities and groups."""
    predictions = answer["predictions"]
    counts = dict(zip(info["class_names"], info["class_counts"]))
    assert [b[0] for b in shown["bars"]] == [p["label"] for p in predictions]
    for (_, prob, text, group, count), p in zip(shown["bars"], predictions):
        assert prob == pytest.approx(p["probability"], abs=1e-6)
        assert_shown(text, p["probability"])
        assert group == p["group"]
        assert count.startswith(f"{counts[p['label']]} training image")


# -- the page in the browser ---------------------------------------------------------------------
def test_page_predictions_priors_and_errors(browser, servers, images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server = servers["open"]
    info = httpx.get(f"{server.url}/info", timeout=10).json()["model"]
    requested_urls(browser)  # the network log starts here
    browser.get(server.url + "/")
    wait_model(browser)
    facts = browser.find_element(By.ID, "model-facts").text
    assert "NCL" in facts and "fashion_mnist_lt" in facts and "3 × resnet32" in facts
    headline = browser.find_element(By.ID, "model-card").text
    assert f"Top-1 {info['card']['top1']:.1f} %" in headline
    assert f"few {info['card']['few']:.1f} %" in headline

    # 1. two images, balanced prior: the page shows what /predict answers
    upload(browser, images["moves"], images["head"])
    shown = {}
    for key, path in images.items():
        shown[key] = wait_card(browser, path.name, "done", "balanced")
        answer = predict(server, path.read_bytes(), path.name).json()
        top = answer["predictions"][0]
        assert shown[key]["top1"] == top["label"]
        assert shown[key]["top1_prob"] == pytest.approx(top["probability"], abs=1e-6)
        assert_shown(shown[key]["top1_text"], top["probability"])
        assert_bars_match(shown[key], answer, info)
        assert float(shown[key]["disagreement"]) == pytest.approx(
            answer["disagreement"], abs=0.0006
        )
        assert shown[key]["deltas"] == 0  # nothing to compare with yet

    # 2. the prior switch, by keyboard: balanced -> train re-asks /predict
    balanced = browser.find_element(By.CSS_SELECTOR, 'input[name="prior"][value="balanced"]')
    balanced.send_keys(Keys.ARROW_DOWN)
    checked = 'return document.querySelector("input[name=prior]:checked").value'
    assert browser.execute_script(checked) == "train"
    name = images["moves"].name
    moved = wait_card(browser, name, "done", "train")
    answer = predict(server, images["moves"].read_bytes(), name, prior="train").json()
    assert_bars_match(moved, answer, info)
    assert [b[1] for b in moved["bars"]] != [b[1] for b in shown["moves"]["bars"]]
    assert moved["deltas"] == len(moved["bars"]) and moved["ghosts"] >= 1
    assert "balanced" in moved["moved"]
    if answer["predictions"][0]["label"] != shown["moves"]["top1"]:
        assert f"it was {shown['moves']['top1']}" in moved["moved"]
    wait_card(browser, images["head"].name, "done", "train")

    # 3. a text file: the server's 4xx JSON is shown as a message
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    upload(browser, notes)
    failed = wait_card(browser, notes.name, "error", "")
    error = predict(server, notes.read_bytes(), notes.name, prior="train")
    assert error.status_code == 400
    detail = error.json()["detail"]
    assert f"400 {detail['error']}: {detail['message']}" in failed["error"]
    assert browser.find_element(By.CSS_SELECTOR, "article.result .error").is_displayed()

    # 4. the screenshot README shows: the page as rendered here (train prior, moves, an error)
    page_height = "return document.documentElement.scrollHeight - window.innerHeight"
    for _ in range(3):  # the whole page in the window (outer size = viewport + a margin)
        missing = int(browser.execute_script(page_height))
        if missing <= 0:
            break
        size = browser.get_window_size()
        browser.set_window_size(1280, min(size["height"] + missing, 2400))
    browser.execute_script("window.scrollTo(0, 0)")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert Image.open(SCREENSHOT).size[0] == 1280

    # 5. a custom weighting (the page's own weights, inverse training counts)
    browser.find_element(By.CSS_SELECTOR, 'input[name="prior"][value="custom"]').click()
    weights = browser.execute_script(
        'return Array.from(document.querySelectorAll("input.weight"), (i) => Number(i.value))'
    )
    assert len(weights) == 10 and weights[-1] == 1 and weights[0] < weights[-1]
    custom = wait_card(browser, name, "done", "custom")
    answer = predict(server, images["moves"].read_bytes(), name, weights).json()
    assert_bars_match(custom, answer, info)
    assert "train" in custom["moved"]

    # 6. a phone-width screen: nothing wider than the window
    browser.set_window_size(390, 844)
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1, f"{overflow} px wider than a 390 px screen"
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(tmp_path / "ui-phone.png"))  # to look at, not kept
    browser.set_window_size(1280, 1000)

    assert_only_this_server(requested_urls(browser), server)
    assert_no_page_errors(browser)


def test_page_asks_for_the_key_and_sends_it_as_a_header(browser, servers, images):
    from selenium.webdriver.common.by import By

    server = servers["auth"]
    requested_urls(browser)  # the network log starts here
    browser.get(server.url + "/")
    key_field = browser.find_element(By.ID, "api-key")
    _wait(browser, lambda d: key_field.is_displayed())
    key_field.send_keys("wrong-key\n")
    _wait(browser, lambda d: "refused" in d.find_element(By.ID, "auth-message").text)
    key_field.send_keys(API_KEY + "\n")
    wait_model(browser)
    upload(browser, images["head"])
    shown = wait_card(browser, images["head"].name, "done")
    assert (
        shown["top1"]
        == predict(server, images["head"].read_bytes(), "x.png").json()["predictions"][0]["label"]
    )
    sent = requested_urls(browser)
    assert_only_this_server(sent, server)
    assert not [r["url"] for r in sent if API_KEY in r["url"] or "wrong-key" in r["url"]]
    asked = [r for r in sent if r["url"].endswith("/predict")]
    assert asked and all(
        {k.lower(): v for k, v in r["headers"].items()}.get("x-api-key") == API_KEY for r in asked
    )
    assert_no_page_errors(browser)


def _wait(driver: Any, condition: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)


def test_page_is_open_offline_and_pinned_by_its_policy(servers):
    for server in servers.values():  # open even with auth on, like /docs
        r = httpx.get(server.url + "/", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        policy = r.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        assert "'unsafe-inline'" not in policy and "sha256-" in policy
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text)  # nothing remote
    assert httpx.get(servers["auth"].url + "/info", timeout=10).status_code == 401


# -- no browser needed: the route, --no-ui and /info's card -------------------------------------
CONFIG = zoo.EnsembleConfig(
    num_classes=10,
    class_counts=[1000, 599, 359, 215, 129, 77, 46, 27, 16, 10],
    name="tiny-ui",
    metrics={
        "accuracy": {"top1": 84.5, "many": 88.3, "medium": 73.7, "few": 91.4},
        "calibration": {"ece_before": 1.79, "ece_after": 1.32, "temperature": 1.08},
        "experts_top1": [84.0, 83.7, float("nan")],
    },
)


def _cli_server(monkeypatch, *flags: str) -> Any:
    """The server ``ltzoo serve MODEL FLAGS`` builds (the model and the run are stubbed)."""
    from ltzoo.cli import main
    from ltzoo.serve.backends import BackendSpec

    built = {}

    def run_supervised(server: Any, **kwargs: Any) -> None:
        built["server"] = server

    monkeypatch.setattr(
        "ltzoo.serve.backends.prepare", lambda *a: (BackendSpec("torch", "unused"), CONFIG)
    )
    monkeypatch.setattr("ltzoo.serve.supervisor.run_supervised", run_supervised)
    assert main(["serve", MODEL, "--threads", "1", *flags]) == 0
    return built["server"]


def test_no_ui_removes_the_route(monkeypatch, capsys):
    page = TestClient(_cli_server(monkeypatch).app).get("/")  # no lifespan: routes only
    assert page.status_code == 200 and "<script>" in page.text
    assert "page: http://127.0.0.1:8000/" in capsys.readouterr().out

    app = _cli_server(monkeypatch, "--no-ui").app
    assert "/" not in [getattr(r, "path", None) for r in app.routes]
    client = TestClient(app)
    missing = client.get("/")
    assert missing.status_code == 404 and missing.json()["detail"]["error"] == "http_error"
    assert client.get("/docs").status_code == 200  # the rest stays
    assert "/" not in app.openapi()["paths"]
    assert "page:" not in capsys.readouterr().out


def test_info_gives_the_card_headline():
    from ltzoo.serve.api import build_server, card_headline
    from ltzoo.serve.backends import BackendSpec

    client = TestClient(build_server(BackendSpec("torch", "unused"), CONFIG).app)
    info = client.get("/info").json()["model"]
    assert info["card"] == {
        "top1": 84.5,
        "many": 88.3,
        "medium": 73.7,
        "few": 91.4,
        "ece": 1.32,
        "ece_before": 1.79,
    }  # experts_top1 left out: one of them is not a finite number
    assert info["shot_groups"] == {"many_min": 101, "few_max": 19}
    assert card_headline({}) == {}
    assert card_headline({"accuracy": "n/a", "experts_top1": [80, 81.5]}) == {
        "experts_top1": [80.0, 81.5]
    }
