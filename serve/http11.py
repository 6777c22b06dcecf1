"""The HTTP/1.1 connection layer of both servers we ship (``ltzoo serve``, the local Hub).

uvicorn's h11 protocol, hardened where a client could otherwise hold the server:

* **a deadline on every request head** (``head_timeout_s``), from the moment a connection
  opens or a response completes until the next request line and headers are complete.
  uvicorn arms nothing when a connection opens, and cancels its keep-alive timer on the
  first byte, so a silent socket or one that stops mid-header stayed open for good; with
  the connection cap that let 256 sockets take the server. The same deadline bounds the
  draining of a request body the app answered early (a 413 on a chunked upload);
* **no ambiguous framing**: a request with both ``Content-Length`` and
  ``Transfer-Encoding`` gets 400 and the connection closes (RFC 9112 section 6.1: a proxy
  in front may frame it differently, which is how requests are smuggled);
* **a bound on the request head** whether it arrives in pieces (h11's
  ``max_incomplete_event_size``) or whole in one read (checked on the parsed request);
* **a connection cap** (``limit_concurrency``) answered 503;
* every answer this layer gives is JSON in the app's own error shape and closes the
  connection.

Use :func:`uvicorn_settings` (``uvicorn.Config(app, **uvicorn_settings(...))``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: builds the JSON body of an error answer from a machine-readable code and a message
ErrorBody = Callable[[str, str], bytes]

DEFAULT_MAX_HEAD_BYTES = 64 * 1024
DEFAULT_HEAD_TIMEOUT_S = 10.0
#: how long an error answer waits, half-closed, for the client to stop sending
LINGER_S = 2.0


class Rejected(h11.RemoteProtocolError):
    """A request h11 parsed but that we refuse, with the status and code to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, error_status_hint=status)
        self.status, self.code, self.message = status, code, message


class StrictConnection(h11.Connection):
    """h11's server connection that also rejects ambiguous framing and oversize heads."""

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes
        self.rejected: Rejected | None = None

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            self._check(event)
        return event

    def _check(self, request: h11.Request) -> None:
        names = {name for name, _ in request.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            self.rejected = Rejected(
                400,
                "ambiguous_framing",
                "a request may not carry both Content-Length and Transfer-Encoding",
            )
        elif head_size(request) > self.max_head_bytes:
            self.rejected = Rejected(431, "header_too_large", self.too_large_message)
        if self.rejected is not None:  # uvicorn answers it through send_400_response
            raise self.rejected

    @property
    def too_large_message(self) -> str:
        return f"request head is larger than the server's limit of {self.max_head_bytes} bytes"


def head_size(request: h11.Request) -> int:
    """Bytes of the request head as sent: request line, header lines and the blank line."""
    line = len(request.method) + len(request.target) + len(request.http_version) + 9
    return line + sum(len(k) + len(v) + 4 for k, v in request.headers.raw_items()) + 2


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline, strict framing and JSON answers.

    Configure a subclass with :func:`guarded_protocol`; the class attributes below are the
    settings (uvicorn builds one protocol object per connection from the class alone).
    """

    error_body: ErrorBody
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S
    conn: StrictConnection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_HEAD_BYTES
        self.conn = StrictConnection(limit)
        self.head_deadline: asyncio.TimerHandle | None = None
        self.lingering = False
        # uvicorn swaps in its plain-text 503 app past limit_concurrency; the same check
        # runs in _capped instead (the request's own task is in ``tasks`` by then)
        self.connection_cap, self.limit_concurrency = self.limit_concurrency, None
        self.app = self._capped(self.app)

    # --- the head deadline ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        # armed before uvicorn starts the next cycle: it bounds the rest of an unread body
        # and the next request head alike (a pipelined request cancels it at once)
        self._arm_head_deadline()
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        if not self.lingering:  # else discarded: the answer is out, the request refused
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_head_deadline()  # a request is being served: the app's timeouts apply

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self.head_deadline = self.loop.call_later(self.head_timeout_s, self._head_deadline_passed)

    def _cancel_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_deadline_passed(self) -> None:
        self.head_deadline = None
        if self.transport.is_closing():
            return
        started = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if started and self.conn.our_state is h11.IDLE:
            self.logger.warning("Request head not received within %g s.", self.head_timeout_s)
            message = f"request head not received within {self.head_timeout_s:g} s"
            self._answer_and_close(408, "request_timeout", message)
        else:  # idle keep-alive, or an early-answered body still trickling in
            self.transport.close()

    # --- answers given before the app sees the request -----------------------------------------

    def send_400_response(self, msg: str) -> None:
        rejected = self.conn.rejected
        if rejected is not None:
            status, code, message = rejected.status, rejected.code, rejected.message
        elif len(self.conn.trailing_data[0]) > self.conn.max_head_bytes:
            status, code, message = 431, "header_too_large", self.conn.too_large_message
        else:
            status, code = 400, "malformed_http"
            message = "invalid HTTP request (request line, headers or chunked body framing)"
        self._answer_and_close(status, code, message)

    def _answer_and_close(self, status: int, code: str, message: str) -> None:
        body = self.error_body(code, message)
        try:
            output = self.conn.send(
                h11.Response(
                    status_code=status,
                    headers=_json_headers(body),
                    reason=HTTPStatus(status).phrase.encode(),
                )
            )
            output += self.conn.send(h11.Data(data=body))
            output += self.conn.send(h11.EndOfMessage())
            self.transport.write(output)
        except h11.LocalProtocolError:  # a response was already under way: just close
            self.transport.close()
            return
        self._linger()

    def _linger(self) -> None:
        """Half-close, discard what the client still sends, close after :data:`LINGER_S`.

        Closing a socket with unread bytes makes the kernel send a reset, which can reach the
        client before the answer does: a client still sending a 1 MiB head would see
        "connection reset" instead of our 431. (nginx calls this "lingering close".)
        """
        self.lingering = True
        self._cancel_head_deadline()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _capped(self, app: Any) -> Any:
        async def capped(scope: dict, receive: Any, send: Any) -> None:
            cap = self.connection_cap
            if cap is not None and (len(self.connections) >= cap or len(self.tasks) > cap):
                self.logger.warning("Exceeded concurrency limit.")
                body = self.error_body(
                    "over_capacity", f"the server is at its limit of {cap} connections"
                )
                await send(
                    {"type": "http.response.start", "status": 503, "headers": _json_headers(body)}
                )
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await app(scope, receive, send)

        return capped


def _json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]


def guarded_protocol(error_body: ErrorBody, head_timeout_s: float) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` answering in ``error_body``'s shape."""
    settings = {"error_body": staticmethod(error_body), "head_timeout_s": head_timeout_s}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), settings)


def uvicorn_settings(
    error_body: ErrorBody,
    *,
    max_connections: int = 256,
    keep_alive_s: int = 5,
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S,
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
) -> dict[str, Any]:
    """The uvicorn settings of a hardened server (``uvicorn.Config(app, **settings)``).

    h11 rather than httptools because only the h11 path lets us bound a head that arrives
    in pieces; past ``max_connections`` concurrent connections the answer is 503; idle
    keep-alive connections close after ``keep_alive_s``; a request head must be complete
    within ``head_timeout_s`` of the connection opening or the previous response (408).
    """
    if head_timeout_s <= 0 or max_connections < 1 or max_head_bytes < 1024:
        raise ValueError("head_timeout_s > 0, max_connections >= 1 and max_head_bytes >= 1024")
    return {
        "http": guarded_protocol(error_body, head_timeout_s),
        "h11_max_incomplete_event_size": max_head_bytes,
        "limit_concurrency": max_connections,
        "timeout_keep_alive": keep_alive_s,
    }
