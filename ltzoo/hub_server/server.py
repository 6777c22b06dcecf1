"""Running the local Hub: in a background thread (:class:`HubServer`) or from the command line."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ltzoo.serve.http11 import DEFAULT_HEAD_TIMEOUT_S, uvicorn_settings

from .app import create_app
from .validation import DEFAULT_MAX_BODY_BYTES, error_response

#: concurrent connections past which the server answers 503 (the Hub client uses a few)
DEFAULT_MAX_CONNECTIONS = 64


def _error_body(code: str, message: str) -> bytes:
    """The Hub's error shape (``{"error": ...}``) for answers given before the app runs."""
    return bytes(error_response(400, message).body)  # the status travels separately


def connection_settings(
    max_connections: int = DEFAULT_MAX_CONNECTIONS, head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S
) -> dict[str, Any]:
    """uvicorn settings: :mod:`ltzoo.serve.http11`'s head deadline, head limit and connection cap."""
    return uvicorn_settings(
        _error_body, max_connections=max_connections, head_timeout_s=head_timeout_s
    )


# --- running it ----------------------------------------------------------------------------------


class HubServer:
    """Run :func:`create_app` with uvicorn in a background thread.

    >>> with HubServer(tmp_dir) as hub:          # doctest: +SKIP
    ...     os.environ["HF_ENDPOINT"] = hub.url  # set before importing huggingface_hub
    """

    def __init__(
        self,
        storage_dir: str | Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S,
    ) -> None:
        self.storage_dir = Path(storage_dir)
        self.host, self.port = host, port or 0
        self.max_body_bytes = max_body_bytes
        self.connection_settings = connection_settings(max_connections, head_timeout_s)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HubServer is not running")
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> HubServer:
        import uvicorn

        if self._server is not None:
            return self
        app = create_app(self.storage_dir, max_body_bytes=self.max_body_bytes)
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            **self.connection_settings,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="ltzoo-hub-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"local Hub server failed to start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = int(server.servers[0].sockets[0].getsockname()[1])
        self._server, self._thread = server, thread
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server, self._thread = None, None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ltzoo.hub_server --root DIR [--host H] [--port N]``: serve until Ctrl-C."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m ltzoo.hub_server",
        description="Serve a local Hugging Face Hub-compatible model store (point HF_ENDPOINT at it).",
    )
    parser.add_argument(
        "--root", required=True, type=Path, help="storage directory (created if missing)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="concurrent connections past which requests get 503 (default: %(default)s)",
    )
    parser.add_argument(
        "--head-timeout",
        type=float,
        default=DEFAULT_HEAD_TIMEOUT_S,
        help="seconds a client has to send a request's head, from connecting or from the "
        "previous answer; then 408 and the connection closes (default: %(default)s)",
    )
    parser.add_argument(
        "--max-body-mib",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES // (1024 * 1024),
        help="largest accepted commit body, in MiB",
    )
    args = parser.parse_args(argv)
    try:
        settings = connection_settings(args.max_connections, args.head_timeout)
    except ValueError as exc:
        parser.error(str(exc))
    app = create_app(args.root, max_body_bytes=args.max_body_mib * 1024 * 1024)
    print(f"ltzoo local Hub: serving {args.root.resolve()} at http://{args.host}:{args.port}")
    print(f"  export HF_ENDPOINT=http://{args.host}:{args.port}")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        **settings,
    )
    return 0
