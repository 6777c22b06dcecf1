"""Reliability fixes of `ltzoo serve` (issues 18 and 19): limits, client input, OpenAPI, signals.

Fast unit tests of the decoder, the OpenAPI document and the CLI, plus the CI-sized run of
``benchmarks/bench_reliability.py`` (real server on 127.0.0.1: hostile inputs, batch
isolation, load, SIGTERM and kill -9 of the HTTP process).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import Request

from ltzoo import zoo
from ltzoo.serve.decoding import PIL_PIXEL_CEILING, RequestDecoder, read_payload

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_reliability import header_only_png, png  # noqa: E402

COUNTS = [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
CONFIG = zoo.EnsembleConfig(num_classes=10, class_counts=COUNTS, name="tiny")


def _status(fn, *args) -> HTTPException:
    with pytest.raises(HTTPException) as info:
        fn(*args)
    return info.value


def _decoder(**kw) -> RequestDecoder:
    return RequestDecoder(CONFIG, kw.pop("max_pixels", 1_000_000), 8, **kw)


def _form(files: list[bytes], **options: str) -> dict:
    data: dict = {"files": files}
    data.update({k: [v] for k, v in options.items()})
    return {"kind": "form", "data": data}


# -- 19.1 pixel limits, 18.11 message, no global PIL state --------------------------------------
def test_decoder_leaves_pil_global_limit_alone():
    before = Image.MAX_IMAGE_PIXELS
    _decoder(max_pixels=1000)
    assert before == Image.MAX_IMAGE_PIXELS


def test_request_pixel_budget_checked_from_headers_before_decoding():
    # header-only PNGs: decoding them would fail with 400, so a 413 proves no pixel was decoded
    blobs = [header_only_png(1000, 1000)] * 2
    exc = _status(_decoder(max_request_pixels=1_500_000).decode, _form(blobs))
    assert exc.status_code == 413 and exc.detail["error"] == "request_too_large"
    assert "1500000" in exc.detail["message"]


def test_extreme_aspect_ratio_is_refused():
    exc = _status(_decoder(max_pixels=25_000_000).decode, _form([header_only_png(2_000_000, 1)]))
    assert exc.status_code == 400 and "100:1" in exc.detail["message"]


def test_pixel_limit_message_quotes_the_servers_limit_not_pils():
    exc = _status(_decoder().decode, _form([header_only_png(100_000, 100_000)]))
    assert exc.status_code == 413
    assert (
        "1000000" in exc.detail["message"] and str(PIL_PIXEL_CEILING) not in exc.detail["message"]
    )


def test_valid_multi_image_request_within_budget():
    decoded = _decoder().decode(_form([png("RGB", (40, 30), seed=i) for i in range(3)]))
    assert decoded.pixels.shape == (3, 1, 28, 28)


# -- 19.5 client input that gave 500 --------------------------------------------------------
@pytest.mark.parametrize("text", ["\u0663", "9" * 5000, "2.5", "\uff13"])
def test_form_top_k_only_ascii_integers(text):
    exc = _status(_decoder().decode, _form([png("L", (28, 28))], top_k=text))
    assert exc.status_code == 422 and exc.detail["field"] == "top_k"


@pytest.mark.parametrize("form", [False, True])
def test_prior_with_a_400_digit_integer_is_422(form):
    prior = [10**400] + [1] * 9
    value = ("[" + ",".join(map(str, prior)) + "]") if form else prior
    exc = _status(_decoder().parse_prior, value, form)
    assert exc.status_code == 422 and exc.detail["field"] == "prior"


def _request(body: bytes, stall: bool = False) -> Request:
    messages = [{"type": "http.request", "body": body, "more_body": stall}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # a client that never sends the rest
        return {"type": "http.disconnect"}

    headers = [(b"content-type", b"application/json")]
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


def test_json_integer_over_4300_digits_is_400():
    body = b'{"image": "x", "top_k": 1' + b"0" * 5000 + b"}"
    with pytest.raises(HTTPException) as info:
        asyncio.run(read_payload(_request(body), 10**6, 8))
    assert info.value.status_code == 400 and info.value.detail["error"] == "malformed_json"


# -- 19.6 a slow body is dropped ------------------------------------------------------------
def test_slow_body_gets_408_after_read_timeout():
    with pytest.raises(HTTPException) as info:
        asyncio.run(read_payload(_request(b'{"ima', stall=True), 10**6, 8, read_timeout=0.2))
    assert info.value.status_code == 408


# -- 19.9 OpenAPI document, 18.10 offline docs, 18.11 revision -------------------------------
def _server(api_key: str | None):
    from ltzoo.serve.api import build_server
    from ltzoo.serve.backends import BackendSpec

    return build_server(BackendSpec("torch", "unused"), CONFIG, api_key=api_key, max_images=8)


def test_openapi_without_auth_declares_no_security():
    doc = _server(None).app.openapi()
    assert "securitySchemes" not in doc.get("components", {})
    for ops in doc["paths"].values():
        for op in ops.values():
            assert "security" not in op and "401" not in op["responses"]
    body = doc["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert (
        body["properties"]["top_k"]["minimum"] == 1 and body["properties"]["top_k"]["maximum"] == 10
    )
    assert {"required": ["image"]} in body["oneOf"] and body["properties"]["images"][
        "maxItems"
    ] == 8
    assert "text/plain" in doc["paths"]["/health"]["get"]["responses"]["200"]["content"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


def test_openapi_with_auth_secures_exactly_the_protected_paths():
    doc = _server("k").app.openapi()
    assert set(doc["components"]["securitySchemes"]) == {"ApiKey", "Bearer"}
    assert "security" not in doc["paths"]["/health"]["get"]
    for path in ("/predict", "/info", "/metrics"):
        op = next(iter(doc["paths"][path].values()))
        assert op["security"] and "401" in op["responses"], path


def test_docs_and_redoc_are_served_without_a_cdn():
    client = TestClient(_server(None).app)  # no lifespan: only static routes are used
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = client.get(page).text
        assert f"/docs-assets/{asset}" in html and "cdn.jsdelivr" not in html
        assert client.get(f"/docs-assets/{asset}").status_code == 200
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200


def test_revision_is_null_for_every_backend_when_unknown():
    from ltzoo.serve.api import EnsembleAPI
    from ltzoo.serve.backends import BackendSpec

    cfg = zoo.EnsembleConfig.from_dict(CONFIG.to_dict())
    cfg.extra["source"] = {"revision": ""}  # what an exported .onnx records for a local model
    assert EnsembleAPI(BackendSpec("onnxruntime", "m.onnx"), cfg).model_info["revision"] is None


# -- 19.10 API key, 18.11 CLI errors --------------------------------------------------------
def test_api_key_flag_warns_env_var_does_not(monkeypatch, capsys):
    from ltzoo.serve.cli import _api_key

    monkeypatch.setenv("LTZOO_API_KEY", "from-env")
    assert _api_key(argparse.Namespace(api_key=None)) == "from-env"
    assert capsys.readouterr().err == ""
    assert _api_key(argparse.Namespace(api_key="flag")) == "flag"
    assert "LTZOO_API_KEY" in capsys.readouterr().err


def test_max_pixels_above_pil_ceiling_is_a_usage_error(capsys):
    from ltzoo.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "m", "--max-pixels", str(PIL_PIXEL_CEILING + 1)])
    assert info.value.code == 2 and "PIL's hard limit" in capsys.readouterr().err


def test_device_cuda_without_gpu_is_one_line(tmp_path, capsys):
    from ltzoo.cli import main
    from ltzoo.serve.backends import cuda_available

    if cuda_available():
        pytest.skip("a GPU is visible")
    zoo.Ensemble(zoo.EnsembleConfig(num_classes=10, class_counts=COUNTS)).save_pretrained(tmp_path)
    assert main(["serve", str(tmp_path), "--device", "cuda"]) != 0
    err = capsys.readouterr().err.strip()
    assert "no CUDA GPU" in err and "--device cpu" in err and len(err.splitlines()) == 1


# -- 19.1, 19.2, 19.5, 19.6, 18.3: the CI-sized reliability run on a real server ---------------
def test_bench_reliability_quick(tmp_path):
    out = tmp_path / "reliability.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_reliability.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["hostile"]["kinds"] >= 30 and not r["hostile"]["failed"], r["hostile"]
    assert r["hostile"]["healthy_after"] and r["small_during_big"]["ok"], r
    assert not r["connections"]["failed"], r["connections"]
    assert not r["hub"]["failed"], r["hub"]
    assert r["isolation"]["ok"], r["isolation"]
    assert r["load"]["torch"]["errors"] == 0, r["load"]
    for s in r["signals"]:
        assert s["orphans"] == 0 and s["port_free"] and s["ok"], json.dumps(s, indent=1)


# -- 19.1 the --timeout deadline holds while a request waits (body, decoding, queue) ----------
def _predict_with_deadline(body: bytes, stall: bool, timeout: float) -> tuple[int, float, Any]:
    """POST /predict through the server's whole ASGI stack; no worker ever takes the request."""
    import queue
    import time

    from ltzoo.serve.api import build_server
    from ltzoo.serve.backends import BackendSpec

    server = build_server(BackendSpec("torch", "unused"), CONFIG, timeout=timeout)
    server.litapi_request_queues["/predict"] = queue.Queue()
    server.app.response_queue_id = 0
    request = _request(body, stall=stall)
    scope = {
        **request.scope,
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "http_version": "1.1",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
    }
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    start = time.monotonic()
    asyncio.run(server.app(scope, request.receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body_out = json.loads(
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    )
    assert status != 504 or body_out["detail"]["error"] == "timeout", body_out
    return status, time.monotonic() - start, server


def test_timeout_while_queued_is_504_on_time_and_forgets_the_request():
    body = json.dumps({"image": base64.b64encode(png("L", (28, 28))).decode()})
    status, seconds, server = _predict_with_deadline(body.encode(), stall=False, timeout=0.5)
    assert status == 504 and seconds < 2.0
    assert server.litapi_request_queues["/predict"].qsize() == 1  # it was queued
    assert not server.response_buffer  # and LitServe's response slot is gone


def test_timeout_covers_reading_the_body():
    status, seconds, _ = _predict_with_deadline(b'{"ima', stall=True, timeout=0.5)
    assert status == 504 and seconds < 2.0


# -- 17: per-request isolation inside LitServe's own batched loop ---------------------------
def _worker_api(tmp_path, max_batch_size: int = 8):
    from ltzoo.serve.api import EnsembleAPI
    from ltzoo.serve.backends import prepare

    zoo.Ensemble(zoo.EnsembleConfig(num_classes=10, class_counts=COUNTS)).save_pretrained(tmp_path)
    spec, config = prepare(str(tmp_path), "torch", "cpu", 1)
    api = EnsembleAPI(spec, config, max_batch_size=max_batch_size)
    api.setup("cpu")
    return api, RequestDecoder(config, 1_000_000, 8)


def _batched(api, items: list) -> list:
    """What LitServe's BatchedLoop calls, in its order, for one batch."""
    decoded = [api.decode_request(x) for x in items]
    return [api.encode_response(y) for y in api.unbatch(api.predict(api.batch(decoded)))]


def test_a_bad_item_gets_its_own_4xx_and_the_rest_of_the_batch_is_served(tmp_path):
    api, decoder = _worker_api(tmp_path)
    good = decoder.decode(
        {"kind": "json", "data": {"image": base64.b64encode(png("L", (28, 28))).decode()}}
    )
    two = decoder.decode(_form([png("RGB", (40, 30)), png("L", (28, 28), seed=1)], top_k="3"))
    bad = dataclasses.replace(good, pixels=good.pixels[:, :, :5])  # not the model's input size
    answers = _batched(api, [good, bad, two, "not a request"])
    assert [a.status_code for a in answers] == [200, 422, 200, 422]
    assert json.loads(answers[1].body)["detail"]["error"] == "bad_request"
    solo = _batched(api, [good])[0]
    probs = [
        [p["probability"] for p in json.loads(a.body)["predictions"]] for a in (answers[0], solo)
    ]
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)  # as if it had been sent alone
    assert (
        len(json.loads(answers[2].body)) == 2
        and len(json.loads(answers[2].body)[0]["predictions"]) == 3
    )


def test_a_failing_encode_is_a_500_for_that_request_only(tmp_path):
    api, decoder = _worker_api(tmp_path)
    req = decoder.decode(
        {"kind": "json", "data": {"image": base64.b64encode(png("L", (28, 28))).decode()}}
    )
    outputs = api.unbatch(api.predict(api.batch([req, req])))
    outputs[0]["probs"] = outputs[0]["probs"] * np.nan  # JSON has no NaN
    answers = [api.encode_response(y) for y in outputs]
    assert [a.status_code for a in answers] == [500, 200]


def test_max_batch_size_1_still_runs_batch_and_unbatch(tmp_path):
    api, decoder = _worker_api(tmp_path, max_batch_size=1)
    req = decoder.decode(
        {"kind": "json", "data": {"image": base64.b64encode(png("L", (28, 28))).decode()}}
    )
    answers = _batched(api, [req])
    assert answers[0].status_code == 200 and len(json.loads(answers[0].body)["predictions"]) == 5


def test_batched_loop_sleeps_on_an_idle_queue_and_keeps_the_order():
    import queue
    import time

    from ltzoo.serve.api import BlockingBatchedLoop, EnsembleAPI
    from ltzoo.serve.backends import BackendSpec

    class CountingQueue(queue.Queue):
        calls = 0

        def get(self, block=True, timeout=None):
            self.calls += 1
            return super().get(block, timeout)

    api = EnsembleAPI(BackendSpec("torch", "unused"), CONFIG, max_batch_size=4, batch_timeout=0)
    api.request_timeout = 30.0
    q = CountingQueue()
    start = time.monotonic()
    assert BlockingBatchedLoop().get_batch_requests(api, q, None) == ([], [])
    assert q.calls == 1 and time.monotonic() - start >= 0.9  # one blocking wait, no polling
    for i in range(3):
        q.put((0, f"uid{i}", time.monotonic(), i))
    batch, timed_out = BlockingBatchedLoop().get_batch_requests(api, q, None)
    assert [uid for _, uid, _ in batch] == ["uid0", "uid1", "uid2"] and not timed_out


def test_batch_timeout_has_one_default():
    import inspect

    from ltzoo.cli import build_parser
    from ltzoo.serve import DEFAULT_BATCH_TIMEOUT_S
    from ltzoo.serve.api import EnsembleAPI, build_server

    cli = build_parser().parse_args(["serve", "m"]).batch_timeout
    api = inspect.signature(EnsembleAPI.__init__).parameters["batch_timeout"].default
    server = inspect.signature(build_server).parameters["batch_timeout"].default
    assert cli == api == server == DEFAULT_BATCH_TIMEOUT_S


# -- 28.4 a client that leaves mid-body is a client abort, not a server error ---------------
def test_client_disconnect_mid_body_is_a_client_abort_without_traceback(caplog):
    from ltzoo.serve.api import CLIENT_CLOSED_REQUEST

    server = _server(None)
    messages = [
        {"type": "http.disconnect"},
        {"type": "http.request", "body": b'{"ima', "more_body": True},
    ]

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
    scope = {**_request(b"").scope, "headers": headers, "path": "/predict", "raw_path": b"/predict"}
    scope.update(query_string=b"", root_path="", scheme="http", http_version="1.1")
    with caplog.at_level("INFO"):
        asyncio.run(server.app(scope, receive, send))
    assert sent[0]["status"] == CLIENT_CLOSED_REQUEST
    assert json.loads(sent[1]["body"])["detail"]["error"] == "client_abort"
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
    metrics = TestClient(server.app).get("/metrics").text
    assert 'ltzoo_http_errors_total{kind="client_abort",path="/predict"} 1.0' in metrics
    assert 'kind="server"' not in metrics


# -- 28.6 --protect-docs ------------------------------------------------------------------
@pytest.mark.parametrize("protect", [False, True])
def test_docs_are_open_by_default_and_need_the_key_with_protect_docs(protect):
    from ltzoo.cli import build_parser
    from ltzoo.serve.api import build_server
    from ltzoo.serve.backends import BackendSpec

    flags = ["--protect-docs"] if protect else []
    assert build_parser().parse_args(["serve", "m", *flags]).protect_docs is protect
    server = build_server(
        BackendSpec("torch", "unused"), CONFIG, api_key="k", max_images=8, protect_docs=protect
    )
    client = TestClient(server.app)
    for path in ("/docs", "/redoc", "/openapi.json"):
        r = client.get(path)
        if protect:
            assert r.status_code == 401 and r.json()["detail"]["error"] == "unauthorized", path
        else:
            assert r.status_code == 200, path
        assert client.get(path, headers={"X-API-Key": "k"}).status_code == 200, path
    assert client.get("/info").status_code == 401
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200  # generic assets


def test_protect_docs_without_a_key_changes_nothing():
    from ltzoo.serve.api import build_server
    from ltzoo.serve.backends import BackendSpec

    server = build_server(BackendSpec("torch", "unused"), CONFIG, protect_docs=True)
    client = TestClient(server.app)
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/info").status_code == 200


# -- 28.7 transparency onto the model's background, float TIFFs ----------------------------
def _image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _garment() -> tuple[np.ndarray, np.ndarray]:
    """A light shape on black (Fashion-MNIST style) and its alpha mask (the shape)."""
    rng = np.random.default_rng(0)
    mask = np.zeros((28, 28), bool)
    mask[4:24, 8:20] = True
    grey = np.where(mask, rng.integers(120, 256, (28, 28)), 0).astype(np.uint8)
    return grey, mask


def test_fashion_mnist_model_predicts_the_same_for_la_and_l():
    from ltzoo.zoo.datasets_meta import DATASETS
    from ltzoo.zoo.registry import get_entry

    config = get_entry("ncl-resnet32-fmnistlt").build_config()
    assert config.preprocess == DATASETS["fashion_mnist_lt"].preprocess_config()
    assert config.preprocess.background == 0
    grey, mask = _garment()
    # the same picture saved as LA: transparent where the garment is not (colour white there)
    la = np.stack([np.where(mask, grey, 255), np.where(mask, 255, 0)], -1).astype(np.uint8)
    l_png = _image_bytes(Image.fromarray(grey, "L"))
    la_png = _image_bytes(Image.fromarray(la, "LA"))
    decoder = RequestDecoder(config, 1_000_000, 8)
    l_px, la_px = decoder.load_image(l_png, "image"), decoder.load_image(la_png, "image")
    np.testing.assert_array_equal(l_px, la_px)
    torch_model = zoo.Ensemble(config).eval()
    import torch

    with torch.no_grad():
        probs = torch_model.predict(torch.from_numpy(np.stack([l_px, la_px])), top_k=3).probs
    assert torch.equal(probs[0], probs[1])
    # a config.json without the field composites onto white, as before
    old = dict(config.to_dict()["preprocess"])
    del old["background"]
    white = dataclasses.replace(config, preprocess=zoo.PreprocessConfig(**old))
    assert white.preprocess.background == 255
    white_px = RequestDecoder(white, 1_000_000, 8).load_image(la_png, "image")
    assert not np.array_equal(white_px, l_px)


def test_preprocess_background_is_checked_and_round_trips():
    assert zoo.PreprocessConfig(background=[0, 10, 20]).background == (0, 10, 20)
    assert zoo.PreprocessConfig(background=[0, 10, 20]).background_rgb == (0, 10, 20)
    assert zoo.PreprocessConfig(background=7).background_rgb == (7, 7, 7)
    for bad in (256, -1, [1, 2], "white", True):
        with pytest.raises(ValueError, match=r"preprocess\.background"):
            zoo.PreprocessConfig(background=bad)
    cfg = zoo.EnsembleConfig(preprocess=zoo.PreprocessConfig(background=(1, 2, 3)))
    again = zoo.EnsembleConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.preprocess == cfg.preprocess


def test_float_tiff_in_unit_range_reads_as_the_uint8_image():
    grey, _ = _garment()
    float_tiff = _image_bytes(Image.fromarray(grey.astype(np.float32) / 255.0, "F"), "TIFF")
    assert Image.open(__import__("io").BytesIO(float_tiff)).mode == "F"
    decoder = _decoder()
    np.testing.assert_array_equal(
        decoder.load_image(float_tiff, "image"),
        decoder.load_image(_image_bytes(Image.fromarray(grey, "L")), "image"),
    )
    # values beyond [0, 1] are grey levels, as before
    levels = _image_bytes(Image.fromarray(grey.astype(np.float32), "F"), "TIFF")
    np.testing.assert_array_equal(
        decoder.load_image(levels, "image"),
        decoder.load_image(_image_bytes(Image.fromarray(grey, "L")), "image"),
    )
