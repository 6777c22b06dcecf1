"""LitServe endpoint for calibrated long-tailed predictions.

Process layout (LitServe): the main process builds a :class:`~litserve.LitServer`; each
inference worker is a *spawned* process that unpickles :class:`EnsembleAPI` and calls
``setup`` (backend + decoder built there); the HTTP servers are *forked* uvicorn processes.

Request path (all under one ``--timeout`` deadline, 504 when it passes)::

    POST /predict --(uvicorn)--> read_payload: body limit 413, read timeout 408,
                                 content type 415, JSON / multipart framing 400
                  --(HTTP process, DecodePool threads)--> RequestDecoder: fields 422,
                                 images 400, per-image / per-request pixel limits 413
                                 -> DecodedRequest (preprocessed pixels)
                  --(queue)----> IsolatingBatchedLoop (worker):
                                 batch -> predict -> unbatch -> encode_response

Images are decoded before they are queued, on a few threads per HTTP process: the
inference worker only ever runs the model, and the decoded pixels in flight are at most
``decode_threads * max_request_pixels`` per HTTP process.

Dynamic batching: the loop blocks for the first queued request, then gathers more until
``max_batch_size`` requests or ``batch_timeout`` seconds. A request may carry several
images and its own prior: ``decode_request`` returns ``(N, C, H, W)`` pixels plus ``(N,
num_classes)`` log-prior-shift rows, ``batch`` concatenates both along the image axis and
``unbatch`` splits the outputs back per request.

Unlike LitServe's stock ``BatchedLoop`` (where one exception in ``decode_request`` or
``encode_response`` is sent to *every* request of the batch), :class:`IsolatingBatchedLoop`
decodes and encodes each request in its own ``try``: a bad image gets its own 4xx and the
rest of the batch is served.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import multiprocessing as mp
import os
import secrets
import threading
import time
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from queue import Empty
from typing import Any

import litserve as ls
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from litserve.loops import BatchedLoop
from litserve.server import RegularRequestHandler
from litserve.utils import (
    LitAPIStatus,
    LoopResponseType,
    PickleableHTTPException,
    ResponseBufferItem,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from ltzoo.zoo.config import EnsembleConfig

from .backends import BackendSpec
from .decoding import (
    ERROR_SCHEMA,
    DecodedRequest,
    RequestDecoder,
    predict_request_body,
    read_payload,
    request_error,
    top_k_predictions,
)
from .supervisor import die_with_parent

logger = logging.getLogger("ltzoo.serve")

#: paths that never need the API key (load-balancer probes, API docs)
OPEN_PATHS = frozenset({"/health", "/docs", "/openapi.json", "/redoc"})
#: where the Swagger UI / ReDoc assets shipped by ``fastapi-offline`` are served (no CDN)
DOCS_ASSETS = "/docs-assets"
_SENTINEL = (None, None, None, None)  # LitServe's stop message on the request queue


class _StopLoop(Exception):
    pass


class IsolatingBatchedLoop(BatchedLoop):
    """Dynamic batching in which one request's failure never reaches another request."""

    def _collect(
        self, lit_api: ls.LitAPI, request_queue: Any, transport: Any
    ) -> list[tuple[Any, str, Any]]:
        """Block (no busy polling) for one request, then gather up to max_batch_size."""
        items: list[tuple[Any, str, Any]] = []
        try:
            first = request_queue.get(timeout=1.0)
        except Empty:
            return items
        deadline = time.monotonic() + lit_api.batch_timeout
        pending = [first]
        while True:
            for request_data in pending:
                if request_data == _SENTINEL:
                    raise _StopLoop
                response_queue_id, uid, timestamp, x_enc = request_data
                self.put_response(
                    transport,
                    response_queue_id,
                    uid,
                    (),
                    LitAPIStatus.START,
                    LoopResponseType.REGULAR,
                )
                timeout = lit_api.request_timeout
                if timeout not in (None, -1, False) and time.monotonic() - timestamp > timeout:
                    self._send_error(
                        transport, response_queue_id, uid, HTTPException(504, "Request timed out")
                    )
                else:
                    items.append((response_queue_id, uid, x_enc))
            pending = []
            if len(items) >= lit_api.max_batch_size:
                return items
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    pending.append(request_queue.get(timeout=remaining))
                else:
                    pending.append(request_queue.get_nowait())
            except Empty:
                return items

    def _send_error(
        self, transport: Any, response_queue_id: Any, uid: str, exc: HTTPException
    ) -> None:
        self.put_response(
            transport,
            response_queue_id,
            uid,
            PickleableHTTPException.from_exception(exc),
            LitAPIStatus.ERROR,
            LoopResponseType.REGULAR,
        )

    def run_batched_loop(self, lit_api, request_queue, transport, callback_runner, lit_spec=None):
        while True:
            try:
                items = self._collect(lit_api, request_queue, transport)
            except _StopLoop:
                return
            except (EOFError, BrokenPipeError, ConnectionError):
                return  # the manager (queue owner) is gone: server shutting down
            if not items:
                continue
            valid = []
            for response_queue_id, uid, x_enc in items:
                try:
                    valid.append((response_queue_id, uid, lit_api.decode_request(x_enc)))
                except HTTPException as exc:
                    self._send_error(transport, response_queue_id, uid, exc)
                except Exception as exc:
                    logger.exception("decode_request failed for %s", uid)
                    self.put_error_response(
                        transport, response_queue_id, uid, exc, LoopResponseType.REGULAR
                    )
            if not valid:
                continue
            try:
                outputs = lit_api.unbatch(lit_api.predict(lit_api.batch([x for _, _, x in valid])))
                if len(outputs) != len(valid):
                    raise RuntimeError(
                        f"unbatch returned {len(outputs)} outputs for {len(valid)} requests"
                    )
            except Exception as exc:
                logger.exception("predict failed for a batch of %d requests", len(valid))
                for response_queue_id, uid, _ in valid:
                    self.put_error_response(
                        transport, response_queue_id, uid, exc, LoopResponseType.REGULAR
                    )
                continue
            for (response_queue_id, uid, _), y in zip(valid, outputs, strict=True):
                try:
                    y_enc = lit_api.encode_response(y)
                except HTTPException as exc:
                    self._send_error(transport, response_queue_id, uid, exc)
                    continue
                except Exception as exc:
                    logger.exception("encode_response failed for %s", uid)
                    self.put_error_response(
                        transport, response_queue_id, uid, exc, LoopResponseType.REGULAR
                    )
                    continue
                self.put_response(
                    transport,
                    response_queue_id,
                    uid,
                    y_enc,
                    LitAPIStatus.OK,
                    LoopResponseType.REGULAR,
                )


class BatchStats:
    """Batch-size counts shared between the inference worker and the HTTP process (for /metrics)."""

    def __init__(self, max_batch_size: int) -> None:
        ctx = mp.get_context("spawn")  # LitServe spawns its inference workers
        self.counts = ctx.Array(
            "q", max_batch_size + 1, lock=True
        )  # [requests per batch] -> batches
        self.images = ctx.Value("q", 0, lock=True)

    def record(self, requests: int, images: int) -> None:
        with self.counts.get_lock():
            self.counts[min(requests, len(self.counts) - 1)] += 1
        with self.images.get_lock():
            self.images.value += images

    def snapshot(self) -> dict[int, int]:
        with self.counts.get_lock():
            return {i: int(c) for i, c in enumerate(self.counts[:]) if c}


class EnsembleAPI(ls.LitAPI):
    """Calibrated top-k predictions with per-request priors and dynamic batching."""

    def __init__(
        self,
        spec: BackendSpec,
        config: EnsembleConfig,
        *,
        max_batch_size: int = 32,
        batch_timeout: float = 0.01,
        api_key: str | None = None,
    ) -> None:
        with warnings.catch_warnings():  # batch/unbatch are used even with max_batch_size=1
            warnings.filterwarnings("ignore", message=".*both batch and unbatch methods.*")
            super().__init__(
                max_batch_size=max_batch_size,
                batch_timeout=batch_timeout,
                loop=IsolatingBatchedLoop(),
            )
        self.backend_spec = spec
        self.config_dict = config.to_dict()
        self.api_key = api_key
        self.main_pid = os.getpid()
        self.stats = BatchStats(max_batch_size)
        src = config.extra.get("source") or {}
        self.model_info = {
            "name": config.name or spec.source.rstrip("/").split("/")[-1],
            "revision": src.get("revision") or None,  # same for every backend: null when unknown
            "temperature": float(config.temperature),
            "backend": spec.kind,
        }

    # -- auth (runs in the HTTP process as a FastAPI dependency) ------------------------------
    def authorize(self, request: Request) -> None:
        """Require the API key (``X-API-Key`` or ``Authorization: Bearer``) off :data:`OPEN_PATHS`."""
        if self.api_key is None or request.url.path in OPEN_PATHS:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
        if given is None or not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise HTTPException(
                status_code=401,
                detail={
                    "error": "unauthorized",
                    "message": "missing API key" if given is None else "invalid API key",
                    "field": "X-API-Key",
                },
                headers={"WWW-Authenticate": "Bearer"},
            )

    # -- worker side -------------------------------------------------------------------------
    def setup(self, device: str) -> None:
        die_with_parent(self.main_pid)
        # LitServe hands "cpu" or "cuda:<i>" (one worker per device); honour an explicit cuda:<i>
        if self.backend_spec.device.startswith("cuda:"):
            device = self.backend_spec.device
        self.backend = self.backend_spec.build(
            device if self.backend_spec.device.startswith("cuda") else "cpu"
        )
        config = EnsembleConfig.from_dict(self.config_dict)
        self.names = list(config.class_names)
        self.groups = list(config.shot_groups)
        self.model_info = {**self.model_info, "backend": self.backend.name}
        # warm-up: first call allocates / plans
        c, (h, w) = config.preprocess.channels, config.preprocess.input_size
        self.backend.predict(
            np.zeros((1, c, h, w), np.float32), np.zeros((1, config.num_classes), np.float32)
        )
        logger.info("ltzoo serve worker ready: %s", self.backend.info())

    def decode_request(self, request: Any) -> DecodedRequest:
        """Requests arrive decoded and validated by the HTTP process (:class:`DecodePool`)."""
        if not isinstance(request, DecodedRequest):
            raise TypeError(f"expected a DecodedRequest, got {type(request).__name__}")
        return request

    def batch(self, inputs: list[DecodedRequest]) -> dict[str, Any]:
        return {
            "pixels": np.concatenate([x.pixels for x in inputs]),
            "shift": np.concatenate([x.shift for x in inputs]),
            "requests": inputs,
        }

    def predict(self, x: dict[str, Any]) -> list[dict[str, Any]]:
        probs, disagreement = self.backend.predict(x["pixels"], x["shift"])
        self.stats.record(len(x["requests"]), len(probs))
        out, start = [], 0
        for req in x["requests"]:
            stop = start + req.count
            out.append(
                {
                    "request": req,
                    "probs": probs[start:stop],
                    "disagreement": disagreement[start:stop],
                }
            )
            start = stop
        return out

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> Any:
        req: DecodedRequest = output["request"]
        results = [
            {
                "predictions": top_k_predictions(p, req.top_k, self.names, self.groups),
                "disagreement": float(d),
                "model": self.model_info,
            }
            for p, d in zip(output["probs"], output["disagreement"], strict=True)
        ]
        return results if req.multi else results[0]


# -- HTTP process: metrics and routes ---------------------------------------------------------
class Metrics:
    """Per-HTTP-process request counters in Prometheus text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(method, path, status)] += 1
            self.latency_sum[path] += seconds
            self.latency_count[path] += 1

    def render(self, stats: BatchStats | None) -> str:
        lines = [
            "# HELP ltzoo_http_requests_total HTTP requests by method, path and status code.",
            "# TYPE ltzoo_http_requests_total counter",
        ]
        with self.lock:
            for (method, path, status), n in sorted(self.requests.items()):
                lines.append(
                    f'ltzoo_http_requests_total{{method="{method}",path="{path}",status="{status}"}} {n}'
                )
            errors: defaultdict[tuple[str, str], int] = defaultdict(int)
            for (_, path, status), n in self.requests.items():
                if status >= 400:
                    errors[(path, "client" if status < 500 else "server")] += n
            lines += [
                "# HELP ltzoo_http_errors_total 4xx (client) and 5xx (server) responses.",
                "# TYPE ltzoo_http_errors_total counter",
            ]
            for (path, kind), n in sorted(errors.items()):
                lines.append(f'ltzoo_http_errors_total{{path="{path}",kind="{kind}"}} {n}')
            lines += [
                "# HELP ltzoo_http_request_seconds Time spent answering requests.",
                "# TYPE ltzoo_http_request_seconds summary",
            ]
            for path in sorted(self.latency_count):
                lines.append(
                    f'ltzoo_http_request_seconds_sum{{path="{path}"}} {self.latency_sum[path]:.6f}'
                )
                lines.append(
                    f'ltzoo_http_request_seconds_count{{path="{path}"}} {self.latency_count[path]}'
                )
        if stats is not None:
            lines += [
                "# HELP ltzoo_batches_total Model batches run, by number of requests in the batch.",
                "# TYPE ltzoo_batches_total counter",
            ]
            for size, n in stats.snapshot().items():
                lines.append(f'ltzoo_batches_total{{requests="{size}"}} {n}')
            lines += [
                "# HELP ltzoo_images_total Images run through the model.",
                "# TYPE ltzoo_images_total counter",
                f"ltzoo_images_total {int(stats.images.value)}",
            ]
        return "\n".join(lines) + "\n"


METRICS = Metrics()
_KNOWN_PATHS = frozenset(
    {"/predict", "/health", "/info", "/metrics", "/docs", "/openapi.json", "/"}
)


class MetricsMiddleware:
    """Pure ASGI middleware counting every response (including 401/413/415 ones).

    It also gives a ``text/plain`` Content-Type to responses that have none (LitServe's
    ``/health`` and ``/``), so every response says what it is.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"content-type" for k, _ in headers):
                    headers.append((b"content-type", b"text/plain; charset=utf-8"))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"
            METRICS.observe(scope["method"], path, status, time.perf_counter() - start)


class DecodePool:
    """Decodes requests in the HTTP process on a few threads: bounded parallel decoding.

    Threads do not survive ``fork``, so each (forked) HTTP process makes its own pool on
    first use; torch runs single-threaded there (preprocessing works on small tensors).
    """

    def __init__(self, decoder: RequestDecoder, threads: int) -> None:
        self.decoder = decoder
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pid = -1

    async def decode(self, payload: dict[str, Any]) -> DecodedRequest:
        if self._pid != os.getpid():
            import torch

            torch.set_num_threads(1)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ltzoo-decode")
            self._pid = os.getpid()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.decoder.decode, payload)


class QueueingHandler(RegularRequestHandler):
    """LitServe's regular handler, which also forgets a request whose caller gave up.

    ``handle_request`` may be cancelled (the ``--timeout`` deadline); the response slot is
    then removed, so a late answer from the worker is dropped instead of kept forever.
    """

    async def handle_request(self, request: Any, request_type: Any) -> Any:
        uid, _ = await self._submit_request(request)
        item = ResponseBufferItem(asyncio.Event())
        self.server.response_buffer[uid] = item
        try:
            await item.event.wait()
        finally:
            self.server.response_buffer.pop(uid, None)
        response, status = item.response
        if status == LitAPIStatus.ERROR:
            self._handle_error_response(response)
        return response


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "malformed body, bad base64, undecodable image",
        401: "missing or wrong API key",
        408: "request body not received within the read timeout",
        413: "payload, image pixels, request pixels or image count over the limit",
        415: "unsupported content type",
        422: "missing/unknown field, wrong type, invalid top_k or prior",
        504: "no answer within the server's --timeout",
    }
    return {
        str(c): {
            "description": reasons[c],
            "content": {"application/json": {"schema": ERROR_SCHEMA}},
        }
        for c in codes
    }


def openapi_document(
    app: FastAPI, *, auth: bool, num_classes: int, max_images: int
) -> dict[str, Any]:
    """The OpenAPI document, derived from the routes and from the same limits as the server.

    Security (and a 401) is declared exactly where :meth:`EnsembleAPI.authorize` asks for a
    key: on every path outside :data:`OPEN_PATHS`, and only when auth is on.
    """
    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    paths = doc["paths"]
    paths["/predict"]["post"]["requestBody"] = predict_request_body(num_classes, max_images)
    paths["/predict"]["post"]["responses"] = {
        "200": {
            "description": "top-k predictions (a list of them for 'images' / 'files')",
            "content": {"application/json": {"schema": {}}},
        },
        **_errors(400, 408, 413, 415, 422, 504),
    }
    paths["/health"]["get"]["responses"] = {
        "200": _text("ready ('ok')"),
        "503": _text("workers not ready"),
    }
    paths["/metrics"]["get"]["responses"] = {"200": _text("Prometheus text format")}
    paths["/"]["get"]["responses"] = {"200": _text("server running")}
    if auth:
        doc.setdefault("components", {})["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "Bearer": {"type": "http", "scheme": "bearer"},
        }
        for path, operations in paths.items():
            if path in OPEN_PATHS:
                continue
            for op in operations.values():
                op["security"] = [{"ApiKey": []}, {"Bearer": []}]
                op["responses"].update(_errors(401))
    return doc


def _offline_docs(app: FastAPI) -> None:
    """/docs and /redoc from assets shipped by ``fastapi-offline``: they work air-gapped."""
    assets = importlib.resources.files("fastapi_offline") / "static"
    app.router.routes = [
        r
        for r in app.router.routes
        if getattr(r, "path", None) not in ("/docs", "/redoc", "/docs/oauth2-redirect")
    ]
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    app.add_api_route("/docs", swagger, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)


def uvicorn_limits(
    max_connections: int = 256, keep_alive_s: int = 5, max_header_bytes: int = 64 * 1024
) -> dict[str, Any]:
    """Explicit uvicorn limits (``server.run(**uvicorn_limits())``).

    h11 rather than httptools, because only h11 bounds the request head
    (``h11_max_incomplete_event_size``); past ``max_connections`` concurrent connections
    uvicorn answers 503; idle keep-alive connections close after ``keep_alive_s``.
    """
    return {
        "http": "h11",
        "h11_max_incomplete_event_size": max_header_bytes,
        "limit_concurrency": max_connections,
        "timeout_keep_alive": keep_alive_s,
    }


def build_server(
    spec: BackendSpec,
    config: EnsembleConfig,
    *,
    max_batch_size: int = 32,
    batch_timeout: float = 0.01,
    workers_per_device: int = 1,
    api_key: str | None = None,
    max_payload_mb: float = 20.0,
    max_pixels: int = 25_000_000,
    max_request_pixels: int | None = None,
    max_images: int = 64,
    timeout: float = 30.0,
    read_timeout: float = 10.0,
    decode_threads: int = 2,
    fast_queue: bool = False,
) -> ls.LitServer:
    """A ready-to-``run`` LitServer with /predict, /health, /info, /metrics and /docs."""
    api = EnsembleAPI(
        spec,
        config,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
        api_key=api_key,
    )
    decoder = RequestDecoder(config, max_pixels, max_images, max_request_pixels)
    pool = DecodePool(decoder, decode_threads)
    max_bytes = int(max_payload_mb * 1024 * 1024)
    accelerator = "cuda" if spec.device.startswith("cuda") else "cpu"
    metadata = {
        **api.model_info,
        "num_classes": config.num_classes,
        "num_experts": config.num_experts,
        "backbone": config.backbone,
        "method": config.method,
        "dataset": config.dataset,
        "class_names": list(config.class_names),
        "class_counts": list(config.class_counts),
        "groups": list(config.shot_groups),
        "logit_prior": config.logit_prior,
        "default_prior": config.default_prior,
        "input": {
            "size": list(config.preprocess.input_size),
            "channels": config.preprocess.channels,
        },
        "device": spec.device,
        "limits": {
            "max_batch_size": max_batch_size,
            "batch_timeout_s": batch_timeout,
            "max_payload_bytes": max_bytes,
            "max_pixels": max_pixels,
            "max_request_pixels": decoder.max_request_pixels,
            "max_images_per_request": max_images,
            "timeout_s": timeout,
            "read_timeout_s": read_timeout,
        },
        "auth": api_key is not None,
    }
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=workers_per_device,
        timeout=timeout,
        model_metadata=metadata,
        middlewares=[MetricsMiddleware],
        fast_queue=fast_queue,
    )
    # Replace LitServe's /predict route by one that frames and decodes the body here (its
    # own parsing turns malformed JSON / multipart into 500s) and then hands the decoded
    # request to LitServe's queue -> worker -> response path.
    app = server.app
    app.title = f"ltzoo serve: {metadata['name']}"
    app.description = "Calibrated long-tailed predictions from a multi-expert ensemble."
    app.router.routes = [
        r
        for r in app.router.routes
        if not (getattr(r, "path", None) == api.api_path and "POST" in r.methods)
    ]
    handler = QueueingHandler(api, server)

    async def predict(request: Request) -> Any:
        try:
            async with asyncio.timeout(timeout):
                payload = await read_payload(request, max_bytes, max_images, read_timeout)
                return await handler.handle_request(await pool.decode(payload), dict)
        except TimeoutError:
            raise request_error(
                504, "timeout", f"no answer within the server's timeout of {timeout:g} s"
            ) from None

    app.add_api_route(
        api.api_path,
        predict,
        methods=["POST"],
        dependencies=[Depends(server.setup_auth(api))],
        summary="Calibrated top-k predictions for one or several images",
    )

    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(METRICS.render(api.stats), media_type="text/plain; version=0.0.4")

    app.add_api_route(
        "/metrics", metrics, methods=["GET"], dependencies=[Depends(server.setup_auth(api))]
    )
    _offline_docs(app)
    document = openapi_document(
        app, auth=api_key is not None, num_classes=config.num_classes, max_images=max_images
    )
    app.openapi = lambda: document  # type: ignore[method-assign]

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail: object = exc.detail
        if not isinstance(detail, dict):  # LitServe's own errors (504, 500) get the same shape
            detail = {"error": "http_error", "message": str(detail), "field": None}
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    return server
