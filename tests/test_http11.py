"""The connection layer both servers share (:mod:`ltzoo.serve.http11`), over real sockets.

A small ASGI app behind real uvicorn with a 0.5 s head deadline; then the local Hub server
and ``ltzoo serve``'s settings, which use the same layer.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
import uvicorn

from ltzoo.serve.http11 import head_size, uvicorn_settings

HEAD_TIMEOUT_S = 0.5
CAP = 8
GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def echo_app(scope: dict, receive, send) -> None:
    """Echo the body; ``/early`` answers 413 without reading it (as a body limit does)."""
    if scope["path"] == "/early":
        await answer(send, 413, b"too big")
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await answer(send, 200, b"echo:" + body)


async def answer(send, status: int, body: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"code": code, "message": message}).encode()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    settings = uvicorn_settings(error_body, max_connections=CAP, head_timeout_s=HEAD_TIMEOUT_S)
    config = uvicorn.Config(
        echo_app, host="127.0.0.1", port=0, log_level="error", lifespan="off", **settings
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(10)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a socket timeout fails the test)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def error(answer: bytes, status: int) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"content-type: application/json" in head and b"connection: close" in head, head
    return json.loads(body)


def test_a_silent_socket_is_closed_at_the_head_deadline(port):
    with connect(port) as sock:
        start = time.monotonic()
        assert read_until_closed(sock) == b""  # closed without an answer: it asked nothing
        assert HEAD_TIMEOUT_S * 0.8 < time.monotonic() - start < HEAD_TIMEOUT_S + 5


def test_a_head_stopped_midway_gets_408_json(port):
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        detail = error(read_until_closed(sock), 408)
    assert detail["code"] == "request_timeout" and "0.5 s" in detail["message"]


def test_the_deadline_keeps_running_when_bytes_trickle_in(port):
    """uvicorn's own keep-alive timer stops at the first byte; the head deadline does not."""
    with connect(port) as sock:
        start = time.monotonic()
        with contextlib.suppress(OSError):  # the server closes while we still send
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
                sock.sendall(bytes([byte]))
                time.sleep(HEAD_TIMEOUT_S / 5)
        assert error(read_until_closed(sock), 408)["code"] == "request_timeout"
        assert time.monotonic() - start < HEAD_TIMEOUT_S + 5


def test_an_idle_keep_alive_connection_closes_after_an_early_answer(port):
    """A 413 before the chunked body was read; the client drains it, then goes silent."""
    with connect(port) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"5\r\nhello\r\n")
        time.sleep(0.1)
        sock.sendall(b"0\r\n\r\n")  # the body is now drained: the connection is reusable
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413 ") and answer.endswith(b"too big")


def test_a_body_trickling_after_an_early_answer_is_cut_at_the_deadline(port):
    with connect(port) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        start = time.monotonic()
        with contextlib.suppress(OSError):  # the server closes while we still send
            while time.monotonic() - start < HEAD_TIMEOUT_S * 4:
                sock.sendall(b"1\r\na\r\n")
                time.sleep(HEAD_TIMEOUT_S / 5)
        assert read_until_closed(sock).startswith(b"HTTP/1.1 413 ")
        assert time.monotonic() - start < HEAD_TIMEOUT_S * 4 + 5


def test_keep_alive_still_serves_the_next_request(port):
    with connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        time.sleep(HEAD_TIMEOUT_S / 2)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nbye")
        answer = read_until_closed(sock)  # then idle: closed at the deadline
    assert answer.count(b"HTTP/1.1 200 ") == 2 and answer.endswith(b"echo:bye")


def test_content_length_with_transfer_encoding_is_400_and_nothing_is_smuggled(port):
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(port) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n0\r\n\r\n" + smuggled
        )
        answer = read_until_closed(sock)
    detail = error(answer, 400)
    assert detail["code"] == "ambiguous_framing"
    assert answer.count(b"HTTP/1.1 ") == 1  # closed: the request behind it never ran


@pytest.mark.parametrize("in_pieces", [False, True])
def test_a_head_over_the_limit_is_431_however_it_arrives(port, in_pieces):
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (80 * 1024) + b"\r\n\r\n"
    with connect(port) as sock:
        if in_pieces:
            sock.sendall(request[: 60 * 1024])
            time.sleep(0.1)
            sock.sendall(request[60 * 1024 :])
        else:
            sock.sendall(request)
        assert error(read_until_closed(sock), 431)["code"] == "header_too_large"
    small = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 60_000
    with connect(port) as sock:
        sock.sendall(small + b"\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")


def test_silent_sockets_up_to_the_cap_then_a_request_is_served_within_the_deadline(port):
    silent = [connect(port) for _ in range(CAP)]
    try:
        time.sleep(0.1)
        with connect(port) as sock:
            sock.sendall(GET)
            assert error(read_until_closed(sock), 503)["code"] == "over_capacity"
        start = time.monotonic()
        while True:  # the silent ones are closed at the head deadline; then we get in
            with connect(port) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if read_until_closed(sock).startswith(b"HTTP/1.1 200 "):
                    break
            assert time.monotonic() - start < HEAD_TIMEOUT_S + 5
            time.sleep(0.1)
        assert all(read_until_closed(sock) == b"" for sock in silent)
    finally:
        for sock in silent:
            sock.close()


def test_head_size_counts_the_request_line_and_every_header():
    raw = b"GET /info?a=1 HTTP/1.1\r\nhost: x\r\nx-long: " + b"v" * 100 + b"\r\n\r\n"
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    assert head_size(conn.next_event()) == len(raw)


@pytest.mark.parametrize(
    "bad", [{"head_timeout_s": 0}, {"max_connections": 0}, {"max_head_bytes": 10}]
)
def test_settings_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        uvicorn_settings(error_body, **bad)


# -- the local Hub server uses the same layer, in its own error shape ----------------------------
def test_hub_server_closes_silent_sockets_and_refuses_huge_heads_and_smuggling(tmp_path: Path):
    from ltzoo.hub_server import HubServer

    with HubServer(tmp_path, head_timeout_s=HEAD_TIMEOUT_S) as hub:
        with connect(hub.port) as sock:
            assert read_until_closed(sock) == b""
        with connect(hub.port) as sock:
            sock.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**20)
            assert "larger than" in error(read_until_closed(sock), 431)["error"]
        with connect(hub.port) as sock:
            sock.sendall(
                b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            assert "Transfer-Encoding" in error(read_until_closed(sock), 400)["error"]
