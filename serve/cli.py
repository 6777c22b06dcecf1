"""`ltzoo serve`: a LitServe HTTP endpoint for calibrated long-tailed predictions."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys

from . import DEFAULT_BATCH_TIMEOUT_S
from .http11 import DEFAULT_HEAD_TIMEOUT_S


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _max_pixels(text: str) -> int:
    from .decoding import PIL_PIXEL_CEILING

    value = _positive_int(text)
    if value > PIL_PIXEL_CEILING:
        raise argparse.ArgumentTypeError(f"must be <= {PIL_PIXEL_CEILING} (PIL's hard limit)")
    return value


def _api_key(args: argparse.Namespace) -> str | None:
    """``$LTZOO_API_KEY`` (the documented way) or ``--api-key`` (visible in ``ps``: warned)."""
    if args.api_key:
        print(
            "ltzoo serve: warning: --api-key is visible to every user in `ps`; "
            "set LTZOO_API_KEY in the environment instead",
            file=sys.stderr,
        )
        return str(args.api_key)
    return os.environ.get("LTZOO_API_KEY") or None


def server_url(host: str, port: int) -> str:
    """``http://HOST:PORT`` for printing (an IPv6 host in brackets).

    Example:
        >>> server_url("::", 8000)
        'http://[::]:8000'
    """
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_port(host: str, port: int) -> None:
    """Raise ``ValueError`` (one line) unless ``host:port`` can be bound now, as uvicorn will
    bind it: found before any model is loaded or URL announced, not after LitServe's start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is free
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ValueError(
                f"cannot listen on {server_url(host, port)}: {reason}; choose another --port"
            ) from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from ltzoo.zoo.resolve import resolve_model

    from .api import build_server, uvicorn_limits
    from .backends import prepare
    from .supervisor import run_supervised

    check_port(args.host, args.port)
    api_key = _api_key(args)
    threads = args.threads
    if threads is None and args.device != "cuda" and not args.device.startswith("cuda:"):
        # leave a core to the HTTP process; more intra-op threads than free cores makes
        # OpenMP spin-waits collapse throughput on small machines
        threads = max(1, ((os.cpu_count() or 1) - 1) // args.workers_per_device)
    try:
        model = resolve_model(args.model, allow_onnx=True).spec  # run dirs -> RUN_DIR/model
        spec, config = prepare(model, args.backend, args.device, threads)
    except RuntimeError as exc:  # missing runtime / GPU: a clear message, no traceback
        print(f"ltzoo serve: error: {exc}", file=sys.stderr)
        return 2
    server = build_server(
        spec,
        config,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        workers_per_device=args.workers_per_device,
        api_key=api_key,
        max_payload_mb=args.max_payload_mb,
        max_pixels=args.max_pixels,
        max_request_pixels=args.max_request_pixels,
        max_images=args.max_images,
        timeout=args.timeout,
        read_timeout=args.read_timeout,
        decode_threads=args.decode_threads,
        fast_queue=args.fast_queue,
        ui=args.ui,
        protect_docs=args.protect_docs,
    )
    url = server_url(args.host, args.port)
    page = f"page: {url}/, " if args.ui else ""
    print(
        f"ltzoo serve: {config.name or args.model} on {spec.kind}/{spec.device} at "
        f"{url}/predict ({page}docs: /docs, auth: {'on' if api_key else 'off'})",
        flush=True,
    )
    run_supervised(  # exits the process
        server,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        generate_client_file=False,
        num_api_servers=args.api_servers,
        **uvicorn_limits(max_connections=args.max_connections, head_timeout_s=args.head_timeout),
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``ltzoo serve``."""
    p = sub.add_parser(
        "serve",
        help="serve calibrated predictions over HTTP (LitServe, dynamic batching)",
        description=(
            "POST /predict takes a multipart image upload (field 'file' or several 'files') or JSON "
            '{"image": base64} / {"images": [...]} with options top_k and prior '
            "('balanced', 'train' or a list of class weights). Also GET /health, /info, /metrics, /docs, "
            "and a page for the browser at / (--no-ui turns it off)."
        ),
    )
    p.add_argument(
        "model",
        metavar="MODEL_OR_ONNX",
        help="run or model directory, registry name, Hub repo id[@rev], or a fused .onnx file "
        "from `ltzoo export`",
    )
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="intra-op threads per worker (CPU default: (cores - 1) / workers, at least 1)",
    )
    p.add_argument(
        "--max-batch-size", type=_positive_int, default=32, help="requests per dynamic batch"
    )
    p.add_argument(
        "--batch-timeout",
        type=_non_negative_float,
        default=DEFAULT_BATCH_TIMEOUT_S,
        help=f"seconds to wait for a batch to fill (default {DEFAULT_BATCH_TIMEOUT_S:g})",
    )
    p.add_argument("--workers-per-device", type=_positive_int, default=1)
    p.add_argument(
        "--api-servers",
        type=_positive_int,
        default=None,
        help="HTTP server processes (default: one per inference worker)",
    )
    p.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"))
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key in X-API-Key (or Authorization: Bearer). Prefer the LTZOO_API_KEY "
        "environment variable: a flag is visible to every user in `ps`",
    )
    p.add_argument(
        "--protect-docs",
        action="store_true",
        help="with an API key, /docs, /redoc and /openapi.json need it too (default: open; "
        "they show the model's name and limits)",
    )
    p.add_argument(
        "--max-payload-mb", type=_positive_float, default=20.0, help="request body limit (413)"
    )
    p.add_argument(
        "--max-pixels",
        type=_max_pixels,
        default=25_000_000,
        help="largest image (width x height) accepted, checked before decoding (413)",
    )
    p.add_argument(
        "--max-request-pixels",
        type=_positive_int,
        default=None,
        help="pixels summed over the images of one request (413; default 2 x --max-pixels)",
    )
    p.add_argument("--max-images", type=_positive_int, default=64, help="images per request (413)")
    p.add_argument(
        "--decode-threads",
        type=_positive_int,
        default=2,
        help="image-decoding threads per HTTP process (bounds the decoded pixels in flight)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        help="seconds from request to answer, queueing included (504)",
    )
    p.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=10.0,
        help="seconds to receive a request body (408, connection closed)",
    )
    p.add_argument(
        "--max-connections",
        type=_positive_int,
        default=256,
        help="concurrent connections per HTTP process; more get 503",
    )
    p.add_argument(
        "--head-timeout",
        type=_positive_float,
        default=DEFAULT_HEAD_TIMEOUT_S,
        help="seconds a client has to send a request's line and headers, from connecting or "
        "from the previous answer; then 408 (or a plain close when idle) (default: %(default)s)",
    )
    p.add_argument("--fast-queue", action="store_true", help="ZeroMQ response transport")
    p.add_argument(
        "--no-ui",
        dest="ui",
        action="store_false",
        help="do not serve the browser page at / (served by default, open like /docs; with "
        "auth on it asks for the key)",
    )
    p.add_argument(
        "--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug")
    )
    p.set_defaults(func=_cmd_serve)
