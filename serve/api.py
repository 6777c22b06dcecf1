"""LitServe endpoint for calibrated long-tailed predictions.

Process layout (LitServe): the main process builds a :class:`~litserve.LitServer`; each
inference worker is a *spawned* process that unpickles :class:`EnsembleAPI` and calls
``setup`` (the backend is built there); the HTTP servers are *forked* uvicorn processes.

Request path (all under one ``--timeout`` deadline, :class:`DeadlineMiddleware`: 504)::

    POST /predict (LitServe's own route; its ``request`` parameter is :data:`FramedRequest`)
      --(uvicorn, FastAPI dependency frame_request)--> read_payload: body limit 413, read
                   timeout 408, content type 415, JSON / multipart framing 400
      --(HTTP process, DecodePool threads)--> RequestDecoder: fields 422, images 400,
                   per-image / per-request pixel limits 413 -> DecodedRequest (pixels)
      --(LitServe's queue and batched loop, inference worker)-->
                   decode_request -> batch -> predict -> unbatch -> encode_response

Images are decoded before they are queued, on a few threads per HTTP process: the
inference worker only ever runs the model, and the decoded pixels in flight are at most
``decode_threads * max_request_pixels`` per HTTP process.

Dynamic batching is LitServe's ``BatchedLoop`` (:class:`BlockingBatchedLoop` only makes it
sleep while idle): up to ``max_batch_size`` requests or ``batch_timeout`` seconds. A request may carry several images and its own prior: ``batch`` concatenates
their ``(N, C, H, W)`` pixels and ``(N, num_classes)`` log-prior-shift rows along the image
axis and ``unbatch`` splits the outputs back per request.

Per-request isolation inside a batch: LitServe sends an exception raised by
``decode_request`` or ``encode_response`` to *every* request of the batch, so neither
raises. A request the worker cannot run becomes a :class:`RequestError` marker that
``predict`` skips, and ``encode_response`` answers every request with its own
:class:`~starlette.responses.JSONResponse` (the marker's 4xx, a 500 if encoding fails).
Only a failing model call (``predict``) fails the whole batch.
"""

import asyncio
import contextvars
import importlib.resources
import logging
import math
import multiprocessing as mp
import os
import secrets
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, TypeGuard

import litserve as ls
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ltzoo.zoo.config import FEW_SHOT_MAX, MANY_SHOT_MIN, EnsembleConfig

from . import DEFAULT_BATCH_TIMEOUT_S
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
from .http11 import DEFAULT_HEAD_TIMEOUT_S, uvicorn_settings
from .supervisor import die_with_parent
from .ui import add_ui

logger = logging.getLogger("ltzoo.serve")

#: paths that never need the API key (load-balancer probes, API docs, the page at /)
OPEN_PATHS = frozenset({"/health", "/docs", "/openapi.json", "/redoc", "/"})
#: the API docs, which ``--protect-docs`` puts behind the key (they name the model and limits)
DOCS_PATHS = frozenset({"/docs", "/openapi.json", "/redoc"})
#: status noted (in /metrics, never sent) for a request whose client left before the whole
#: body arrived: nginx's "499 Client Closed Request"
CLIENT_CLOSED_REQUEST = 499
#: where the Swagger UI / ReDoc assets shipped by ``fastapi-offline`` are served (no CDN)
DOCS_ASSETS = "/docs-assets"


@dataclass(frozen=True)
class RequestError:
    """Marker for one request of a batch that cannot be run: ``predict`` skips it and
    ``encode_response`` answers it with its own error JSON."""

    status: int
    detail: dict[str, Any]

    @classmethod
    def of(cls, status: int, code: str, message: str, field: str | None = None) -> "RequestError":
        """A marker with the same JSON detail as :func:`~.decoding.request_error`."""
        return cls(status, {"error": code, "message": message, "field": field})

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail}, status_code=self.status)


@dataclass
class Batch:
    """What ``predict`` runs: the images of every runnable request, concatenated."""

    pixels: np.ndarray  # (images, C, H, W)
    shift: np.ndarray  # (images, num_classes)
    requests: list[DecodedRequest | RequestError]


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


class _Prefetched:
    """A request queue whose first ``get`` returns an item already taken from it."""

    def __init__(self, first: Any, queue: Any) -> None:
        self.first, self.queue = [first], queue

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self.first.pop() if self.first else self.queue.get(block, timeout)

    def get_nowait(self) -> Any:
        return self.get(block=False)


class BlockingBatchedLoop(ls.loops.BatchedLoop):
    """LitServe's batched loop, which sleeps on the queue while there is nothing to do.

    The stock loop polls the (manager-owned) request queue every millisecond, or without
    pause when ``batch_timeout`` is 0: about 10 %, resp. 50 % of a core when idle. Here
    it blocks for the first request, then lets LitServe collect the batch as usual.
    """

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue: Any, transport: Any) -> Any:
        first = self.get_request(request_queue, timeout=1.0)
        if first is None:
            return [], []
        return super().get_batch_requests(lit_api, _Prefetched(first, request_queue), transport)


async def frame_request(request: Request) -> DecodedRequest:
    """FastAPI dependency of LitServe's /predict route: frame and decode the body here.

    Runs in the HTTP process, after the API-key check; a bad body gets its 4xx before
    anything is queued. The :class:`DecodePool` is put on ``app.state`` by :func:`build_server`.
    """
    pool = request.app.state.decode_pool
    return await pool.decode(request)


#: the type LitServe reads off ``EnsembleAPI.decode_request`` to build /predict's signature
FramedRequest = Annotated[DecodedRequest, Depends(frame_request)]


class EnsembleAPI(ls.LitAPI):
    """Calibrated top-k predictions with per-request priors and dynamic batching."""

    def __init__(
        self,
        spec: BackendSpec,
        config: EnsembleConfig,
        *,
        max_batch_size: int = 32,
        batch_timeout: float = DEFAULT_BATCH_TIMEOUT_S,
        api_key: str | None = None,
        protect_docs: bool = False,
    ) -> None:
        with warnings.catch_warnings():  # batch/unbatch are used even with max_batch_size=1
            warnings.filterwarnings("ignore", message=".*both batch and unbatch methods.*")
            super().__init__(
                max_batch_size=max_batch_size,
                batch_timeout=batch_timeout,
                loop=BlockingBatchedLoop(),
            )
        self.backend_spec = spec
        self.config_dict = config.to_dict()
        self.input_shape = (config.preprocess.channels, *config.preprocess.input_size)
        self.num_classes = config.num_classes
        self.api_key = api_key
        self.open_paths = OPEN_PATHS - DOCS_PATHS if protect_docs else OPEN_PATHS
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
        """Require the API key (``X-API-Key`` or ``Authorization: Bearer``) off :data:`OPEN_PATHS`
        (less :data:`DOCS_PATHS` with ``protect_docs``)."""
        if self.api_key is None or request.url.path in self.open_paths:
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
        if os.getpid() != self.main_pid:  # a spawned worker (not a test calling it in-process)
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
        self.backend.predict(
            np.zeros((1, *self.input_shape), np.float32),
            np.zeros((1, self.num_classes), np.float32),
        )
        logger.info("ltzoo serve worker ready: %s", self.backend.info())

    def decode_request(self, request: FramedRequest) -> DecodedRequest | RequestError:
        """The request arrives decoded by :func:`frame_request`; one the model cannot run
        becomes a :class:`RequestError` (never an exception, which would fail the batch)."""
        if not isinstance(request, DecodedRequest):
            return RequestError.of(422, "bad_request", "request could not be read")
        n = request.count
        if request.pixels.shape[1:] != self.input_shape or request.shift.shape != (
            n,
            self.num_classes,
        ):
            shape = f"{tuple(request.pixels.shape)} / {tuple(request.shift.shape)}"
            return RequestError.of(422, "bad_request", f"pixels / prior of shape {shape}")
        if not 1 <= request.top_k <= self.num_classes:
            return RequestError.of(422, "invalid_top_k", f"top_k {request.top_k}", "top_k")
        return request

    def batch(self, inputs: list[DecodedRequest | RequestError]) -> Batch:
        runnable = [x for x in inputs if isinstance(x, DecodedRequest)]
        c, (h, w) = self.input_shape[0], self.input_shape[1:]
        return Batch(
            pixels=np.concatenate([x.pixels for x in runnable] or [np.empty((0, c, h, w))]),
            shift=np.concatenate([x.shift for x in runnable] or [np.empty((0, self.num_classes))]),
            requests=list(inputs),
        )

    def predict(self, x: Batch) -> list[Any]:
        """One model call for the whole batch; markers pass through untouched."""
        if not len(x.pixels):
            return list(x.requests)
        probs, disagreement = self.backend.predict(
            x.pixels.astype(np.float32, copy=False), x.shift.astype(np.float32, copy=False)
        )
        self.stats.record(sum(isinstance(r, DecodedRequest) for r in x.requests), len(probs))
        out: list[Any] = []
        start = 0
        for req in x.requests:
            if isinstance(req, RequestError):
                out.append(req)
                continue
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

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any) -> Response:
        """Each request's own answer: 200 with its predictions, or its error JSON."""
        if isinstance(output, RequestError):
            return output.response()
        try:
            req: DecodedRequest = output["request"]
            results = [
                {
                    "predictions": top_k_predictions(p, req.top_k, self.names, self.groups),
                    "disagreement": float(d),
                    "model": self.model_info,
                }
                for p, d in zip(output["probs"], output["disagreement"], strict=True)
            ]
            return JSONResponse(results if req.multi else results[0])
        except Exception:  # e.g. a non-finite probability: this request only gets a 500
            logger.exception("encode_response failed")
            return RequestError.of(500, "internal_error", "could not encode the answer").response()


# -- HTTP process: metrics and routes ---------------------------------------------------------
_KNOWN_PATHS = frozenset(
    {"/predict", "/health", "/info", "/metrics", "/docs", "/openapi.json", "/"}
)


class BatchCollector:
    """prometheus_client collector of the inference worker's :class:`BatchStats`."""

    def __init__(self, stats: BatchStats) -> None:
        self.stats = stats

    def collect(self) -> Any:
        batches = CounterMetricFamily(
            "ltzoo_batches",
            "Model batches run, by number of requests in the batch.",
            labels=["requests"],
        )
        for size, n in self.stats.snapshot().items():
            batches.add_metric([str(size)], n)
        yield batches
        yield CounterMetricFamily(
            "ltzoo_images", "Images run through the model.", value=int(self.stats.images.value)
        )


def error_kind(status: int) -> str:
    """The ``kind`` label of ``ltzoo_http_errors`` for an error status.

    Example:
        >>> [error_kind(s) for s in (404, CLIENT_CLOSED_REQUEST, 503)]
        ['client', 'client_abort', 'server']
    """
    if status == CLIENT_CLOSED_REQUEST:
        return "client_abort"
    return "client" if status < 500 else "server"


class Metrics:
    """Request metrics of one HTTP process plus the worker's batch counts (Prometheus)."""

    def __init__(self, stats: BatchStats) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ltzoo_http_requests",
            "HTTP requests by method, path and status code.",
            ["method", "path", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "ltzoo_http_errors",
            "4xx (client) and 5xx (server) responses, and requests whose client left before "
            f"the answer (client_abort, status {CLIENT_CLOSED_REQUEST}).",
            ["path", "kind"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "ltzoo_http_request_seconds",
            "Time spent answering requests.",
            ["path"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.registry.register(BatchCollector(stats))

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests.labels(method, path, str(status)).inc()
        if status >= 400:
            self.errors.labels(path, error_kind(status)).inc()
        self.seconds.labels(path).observe(seconds)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Pure ASGI middleware counting every response (including 401/413/415/504 ones).

    It also gives a ``text/plain`` Content-Type to responses that have none (LitServe's
    ``/health`` and ``/``), so every response says what it is.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

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
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - start)


def error_body(code: str, message: str) -> bytes:
    """The JSON body of every error this server answers (``{"detail": {...}}``)."""
    return bytes(JSONResponse({"detail": {"error": code, "message": message, "field": None}}).body)


#: uids that the HTTP request being handled (this asyncio context) put in the response buffer
_REQUEST_UIDS: contextvars.ContextVar[list[str]] = contextvars.ContextVar("ltzoo_request_uids")


class TrackedResponseBuffer(dict):
    """``LitServer.response_buffer`` that notes which request added each uid.

    LitServe's handler removes its entry only after the worker answered; when the deadline
    cancels the handler, :class:`DeadlineMiddleware` removes it, so a late answer is
    dropped instead of kept forever.
    """

    def __setitem__(self, uid: str, item: Any) -> None:
        super().__setitem__(uid, item)
        uids = _REQUEST_UIDS.get(None)
        if uids is not None:
            uids.append(uid)


class DeadlineMiddleware:
    """One ``--timeout`` deadline for a /predict request: body, decoding, queue and model.

    Past it the request is cancelled wherever it waits and answered 504.
    """

    def __init__(self, app: Any, *, path: str, timeout: float, buffer: dict) -> None:
        self.app, self.path, self.timeout, self.buffer = app, path, timeout, buffer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        uids: list[str] = []
        token = _REQUEST_UIDS.set(uids)
        try:
            async with asyncio.timeout(self.timeout):
                await self.app(scope, receive, send_wrapper)
        except TimeoutError:
            if started:
                raise
            exc = request_error(
                504, "timeout", f"no answer within the server's timeout of {self.timeout:g} s"
            )
            await JSONResponse({"detail": exc.detail}, status_code=504)(scope, receive, send)
        finally:
            _REQUEST_UIDS.reset(token)
            for uid in uids:
                self.buffer.pop(uid, None)


class DecodePool:
    """Frames (:func:`read_payload`) and decodes requests in the HTTP process, on a few threads.

    Threads do not survive ``fork``, so each (forked) HTTP process makes its own pool on
    first use; torch runs single-threaded there (preprocessing works on small tensors).
    """

    def __init__(
        self,
        decoder: RequestDecoder,
        threads: int,
        *,
        max_bytes: int,
        read_timeout: float,
    ) -> None:
        self.decoder = decoder
        self.threads = threads
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self._pool: ThreadPoolExecutor | None = None
        self._pid = -1

    async def decode(self, request: Request) -> DecodedRequest:
        payload = await read_payload(
            request, self.max_bytes, self.decoder.max_images, self.read_timeout
        )
        if self._pid != os.getpid():
            import torch

            torch.set_num_threads(1)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ltzoo-decode")
            self._pid = os.getpid()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.decoder.decode, payload)


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
    paths["/predict"]["post"]["summary"] = "Calibrated top-k predictions for one or several images"
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


def _offline_docs(app: FastAPI, auth: Any) -> None:
    """/docs and /redoc from assets shipped by ``fastapi-offline``: they work air-gapped.

    They and /openapi.json run the ``auth`` dependency, which lets them through unless the
    server protects its docs (``--protect-docs``)."""
    assets = importlib.resources.files("fastapi_offline") / "static"
    app.router.routes = [
        r
        for r in app.router.routes
        if getattr(r, "path", None)
        not in ("/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json")
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

    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    for path, endpoint in (("/docs", swagger), ("/redoc", redoc), ("/openapi.json", openapi)):
        app.add_api_route(
            path,
            endpoint,
            methods=["GET"],
            include_in_schema=False,
            dependencies=[Depends(auth)],
        )


def uvicorn_limits(
    max_connections: int = 256,
    keep_alive_s: int = 5,
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S,
) -> dict[str, Any]:
    """The uvicorn settings of ``ltzoo serve`` (``server.run(**uvicorn_limits())``).

    The connection layer is :mod:`ltzoo.serve.http11` (shared with the local Hub): a request
    head must arrive within ``head_timeout_s`` (408) and within 64 KiB
    (431), ambiguous framing gets 400, past ``max_connections`` connections 503, idle
    keep-alive connections close after ``keep_alive_s``; every such answer is JSON.
    """
    return uvicorn_settings(
        error_body,
        max_connections=max_connections,
        keep_alive_s=keep_alive_s,
        head_timeout_s=head_timeout_s,
    )


def build_server(
    spec: BackendSpec,
    config: EnsembleConfig,
    *,
    max_batch_size: int = 32,
    batch_timeout: float = DEFAULT_BATCH_TIMEOUT_S,
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
    ui: bool = True,
    protect_docs: bool = False,
) -> ls.LitServer:
    """A ready-to-``run`` LitServer with /predict, /health, /info, /metrics and /docs, and
    with ``ui`` the page at / (:mod:`serve.ui`; without it / is not a route).
    ``protect_docs``: with ``api_key``, /docs, /redoc and /openapi.json need the key too."""
    api = EnsembleAPI(
        spec,
        config,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
        api_key=api_key,
        protect_docs=protect_docs,
    )
    decoder = RequestDecoder(config, max_pixels, max_images, max_request_pixels)
    max_bytes = int(max_payload_mb * 1024 * 1024)
    metadata = _metadata(api, config, decoder, max_bytes, timeout, read_timeout)
    metrics = Metrics(api.stats)
    buffer = TrackedResponseBuffer()
    server = ls.LitServer(
        api,
        accelerator="cuda" if spec.device.startswith("cuda") else "cpu",
        devices=1,
        workers_per_device=workers_per_device,
        timeout=timeout,
        model_metadata=metadata,
        middlewares=[
            (DeadlineMiddleware, {"path": api.api_path, "timeout": timeout, "buffer": buffer}),
            (MetricsMiddleware, {"metrics": metrics}),
        ],
        fast_queue=fast_queue,
    )
    server.response_buffer = buffer
    app = server.app
    app.state.decode_pool = DecodePool(
        decoder, decode_threads, max_bytes=max_bytes, read_timeout=read_timeout
    )
    app.title = f"ltzoo serve: {metadata['name']}"
    app.description = "Calibrated long-tailed predictions from a multi-expert ensemble."

    async def prometheus_metrics() -> Response:
        return metrics.response()

    app.add_api_route(
        "/metrics",
        prometheus_metrics,
        methods=["GET"],
        dependencies=[Depends(server.setup_auth(api))],
    )
    _offline_docs(app, server.setup_auth(api))
    add_ui(app, ui)
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

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # the client closed the connection before its whole body arrived (a body shorter
        # than its Content-Length then a half-close, bad chunk framing): the answer reaches
        # no one, but /metrics counts it as a client abort, not as a server error
        logger.info("client left before sending the whole body of %s", request.url.path)
        return RequestError.of(
            CLIENT_CLOSED_REQUEST, "client_abort", "the client closed the connection"
        ).response()

    return server


def _metadata(
    api: EnsembleAPI,
    config: EnsembleConfig,
    decoder: RequestDecoder,
    max_bytes: int,
    timeout: float,
    read_timeout: float,
) -> dict[str, Any]:
    """What GET /info answers: the model, its classes and every limit the server enforces."""
    return {
        **api.model_info,
        "num_classes": config.num_classes,
        "num_experts": config.num_experts,
        "backbone": config.backbone,
        "method": config.method,
        "dataset": config.dataset,
        "class_names": list(config.class_names),
        "class_counts": list(config.class_counts),
        "groups": list(config.shot_groups),
        "shot_groups": {"many_min": MANY_SHOT_MIN, "few_max": FEW_SHOT_MAX},
        "card": card_headline(config.metrics),
        "logit_prior": config.logit_prior,
        "default_prior": config.default_prior,
        "input": {
            "size": list(config.preprocess.input_size),
            "channels": config.preprocess.channels,
        },
        "device": api.backend_spec.device,
        "limits": {
            "max_batch_size": api.max_batch_size,
            "batch_timeout_s": api.batch_timeout,
            "max_payload_bytes": max_bytes,
            "max_pixels": decoder.max_pixels,
            "max_request_pixels": decoder.max_request_pixels,
            "max_images_per_request": decoder.max_images,
            "timeout_s": timeout,
            "read_timeout_s": read_timeout,
        },
        "auth": api.api_key is not None,
    }


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def card_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The model card's headline numbers, as GET /info gives them (and the page at / shows).

    Top-1 and many / medium / few accuracy on the balanced test set and the expected
    calibration error after and before calibration, all in %, plus each expert's top-1;
    what the config's ``metrics`` lack (or holds as something other than a finite number)
    is left out.

    Example:
        >>> card_headline({"accuracy": {"top1": 84.5, "few": 91.4}, "calibration": {}})
        {'top1': 84.5, 'few': 91.4}
    """
    accuracy = metrics.get("accuracy")
    accuracy = accuracy if isinstance(accuracy, dict) else {}
    calibration = metrics.get("calibration")
    calibration = calibration if isinstance(calibration, dict) else {}
    picked = {key: accuracy.get(key) for key in ("top1", "many", "medium", "few")}
    picked["ece"] = calibration.get("ece_after")
    picked["ece_before"] = calibration.get("ece_before")
    headline: dict[str, Any] = {k: float(v) for k, v in picked.items() if _finite(v)}
    experts = metrics.get("experts_top1")
    if isinstance(experts, list) and experts and all(_finite(v) for v in experts):
        headline["experts_top1"] = [float(v) for v in experts]
    return headline
