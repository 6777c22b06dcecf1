"""Reliability of ``ltzoo serve``, measured: hostile input, batch isolation, load, signals, crashes.

Every request goes to 127.0.0.1; every loop is bounded in count and in time. Runs:

* hostile inputs (>= 30 kinds): each must get its 4xx JSON (or, for connection-level abuse,
  a closed connection) quickly, and the server must stay healthy; a 28x28 request sent
  while a 64 x 5000x5000 request is in flight must be answered in well under ``--timeout``;
* batch isolation: N requests at concurrency C, a quarter bad; every good answer is 200 and
  equal to the same request sent alone;
* load: N requests at concurrency C per backend; errors, req/s, RSS growth of the server;
* connections (``ltzoo serve`` and ``python -m ltzoo.hub_server``): silent sockets and heads
  stopped midway closed at the head deadline, the connection cap filled with silent sockets
  then a request served within the deadline + 5 s, Content-Length + chunked refused and
  closed, client disconnects never counted as server errors, a 32 MiB header refused;
* the local Hub: a ``whoami`` during each request that once froze it (a large commit,
  1,000-path paths-info, 0.9 MB of card YAML, 8 MB of JSON) answers within 1 s;
* signals and crashes: SIGTERM / SIGINT to the main process, ``kill -9`` of the main, HTTP,
  inference-worker and manager processes; the whole server must be gone (port free, no
  orphan) within a few seconds.

    python benchmarks/bench_reliability.py            # full size, JSON in benchmarks/results/
    python benchmarks/bench_reliability.py --quick --out /tmp/r.json   # CI-sized, about 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from ltzoo.net import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import LoadGuard, add_allow_busy, process_cmdline  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "reliability_cpu.json"
API_KEY = "bench-key"
NUM_CLASSES = 10
READ_TIMEOUT_S = 3.0
HEAD_TIMEOUT_S = 3.0
MAX_CONNECTIONS = 256  # ltzoo serve's default
LIMITS = [
    *("--max-payload-mb", "20", "--read-timeout", str(READ_TIMEOUT_S)),  # --timeout: 30 s
    *("--head-timeout", str(HEAD_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS)),
]
STOP_LIMIT_S = 8.0  # "within a few seconds"
SIGCHLD_IGNORED = ", SIGCHLD ignored"


# -- processes --------------------------------------------------------------------------------
def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    tree, out, todo = _proc_children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Server:
    """``ltzoo serve`` in its own session (so leftovers can be found and killed)."""

    def __init__(
        self,
        model: Path,
        backend: str,
        log: Path,
        extra: list[str] | None = None,
        ignore_sigchld: bool = False,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = log.open("wb")
        env = {**os.environ, "LTZOO_API_KEY": API_KEY, "LTZOO_CACHE": str(log.parent / "cache")}
        cmd = [sys.executable, "-m", "ltzoo", "serve", str(model), "--backend", backend]
        cmd += ["--port", str(self.port), "--threads", "1", *LIMITS, *(extra or [])]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # a launcher that ignores SIGCHLD (inherited across exec): the kernel then reaps
            # the server's children itself, which once hid a dead HTTP process
            preexec_fn=_ignore_sigchld if ignore_sigchld else None,
        )
        self.headers = {"X-API-Key": API_KEY}

    def wait_ready(self, limit: float = 120.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {limit}s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def roles(self) -> dict[str, int]:
        """PIDs by role: main, manager (first fork), http (last fork), worker (spawned)."""
        main = self.proc.pid
        cmdline = process_cmdline(main)
        kids = _proc_children().get(main, [])
        # by start time, not PID: PIDs wrap around (pid_max is often 32768)
        forks = sorted((p for p in kids if process_cmdline(p) == cmdline), key=_start_time)
        spawned = [p for p in kids if b"spawn_main" in process_cmdline(p)]
        return {"main": main, "manager": forks[0], "http": forks[-1], "worker": spawned[0]}

    def kill_all(self) -> None:
        pids = descendants(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log_file.close()


def _ignore_sigchld() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


def _start_time(pid: int) -> int:
    """Clock ticks after boot at which ``pid`` started (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def stop_check(server: Server, pids: list[int], how: str, target: int) -> dict[str, Any]:
    """Send ``how`` to ``target``; time until every server process is gone and the port free."""
    sig = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}.get(how, signal.SIGKILL)
    start = time.monotonic()
    if how == "Ctrl+C":  # the terminal sends SIGINT to the whole process group
        os.killpg(target, signal.SIGINT)
    else:
        os.kill(target, sig)
    deadline = start + 20.0
    while time.monotonic() < deadline:
        server.proc.poll()
        if not any(alive(p) for p in pids) and port_free(server.port):
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    left = [p for p in pids if alive(p)]
    left_cmdlines = [
        process_cmdline(p).replace(b"\0", b" ").decode(errors="replace")[:120] for p in left
    ]
    server.kill_all()
    code = server.proc.returncode
    return {
        "how": how,
        "stopped_s": round(elapsed, 2),
        "orphans": len(left),
        "left": left_cmdlines,
        "port_free": port_free(server.port),
        "exit_code": code,
        "ok": not left and elapsed < STOP_LIMIT_S,
        **({} if not left and elapsed < STOP_LIMIT_S else {"log_tail": server.tail()[-800:]}),
    }


# -- inputs -------------------------------------------------------------------------------------
def png(mode: str, size: tuple[int, int], seed: int = 0, noise: bool = True) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    arr = (
        rng.integers(0, 255, (h, w, 3), dtype=np.uint8) if noise else np.zeros((h, w, 3), np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_only_png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


GOOD = png("RGB", (37, 23))


def _json(body: Any) -> dict[str, Any]:
    return {"json": body}


def _raw(body: bytes, ctype: str = "application/json") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": ctype}}


def _form(files: list[tuple[str, tuple]], data: dict[str, str] | None = None) -> dict[str, Any]:
    return {"files": files, "data": data or {}}


@functools.cache
def hostile_http_cases() -> dict[str, tuple[dict[str, Any], int]]:
    """name -> (httpx request kwargs, expected status)."""
    img = b64(GOOD)
    big_rgba = b64(png("RGBA", (5000, 5000), noise=False))
    return {
        "empty_body": (_raw(b""), 400),
        "malformed_json": (_raw(b'{"image": '), 400),
        "json_array": (_json([img]), 422),
        "missing_image": (_json({"top_k": 3}), 422),
        "image_number": (_json({"image": 12345}), 422),
        "images_not_list": (_json({"images": img}), 422),
        "images_empty": (_json({"images": []}), 422),
        "image_and_images": (_json({"image": img, "images": [img]}), 422),
        "unknown_key": (_json({"image": img, "topk": 3}), 422),
        "bad_base64": (_json({"image": "not*base64!"}), 400),
        "text_not_image": (_json({"image": b64(b"hello, plain text")}), 400),
        "truncated_png": (_json({"image": b64(GOOD[: len(GOOD) // 2])}), 400),
        "pdf_upload": (_form([("file", ("a.pdf", b"%PDF-1.4\n%%EOF", "application/pdf"))]), 400),
        "empty_upload": (_form([("file", ("a.png", b"", "image/png"))]), 400),
        "bomb_header_100k_x_100k": (_json({"image": b64(header_only_png(100_000, 100_000))}), 413),
        "strip_1_x_25M": (_json({"image": b64(header_only_png(25_000_000, 1))}), 400),
        "64_rgba_5000x5000": (_json({"images": [big_rgba] * 64}), 413),
        "too_many_images": (_json({"images": [img] * 65}), 413),
        "payload_over_limit": (_raw(b'{"image": "' + b"A" * (21 * 1024 * 1024) + b'"}'), 413),
        "top_k_string": (_json({"image": img, "top_k": "3"}), 422),
        "top_k_float_2.5": (_json({"image": img, "top_k": 2.5}), 422),
        "top_k_bool": (_json({"image": img, "top_k": True}), 422),
        "top_k_zero": (_json({"image": img, "top_k": 0}), 422),
        "top_k_5000_digits": (
            _raw(b'{"image": "' + img.encode() + b'", "top_k": 1' + b"0" * 5000 + b"}"),
            400,
        ),
        "form_top_k_5000_digits": (
            _form([("file", ("a.png", GOOD, "image/png"))], {"top_k": "9" * 5000}),
            422,
        ),
        "form_top_k_unicode_digit": (
            _form([("file", ("a.png", GOOD, "image/png"))], {"top_k": "\u0663"}),
            422,
        ),
        "prior_400_digit_int": (
            _raw(
                b'{"image": "'
                + img.encode()
                + b'", "prior": [1'
                + b"0" * 400
                + b","
                + b"1," * 8
                + b"1]}"
            ),
            422,
        ),
        "form_prior_400_digit_int": (
            _form(
                [("file", ("a.png", GOOD, "image/png"))],
                {"prior": "[1" + "0" * 400 + ",1,1,1,1,1,1,1,1,1]"},
            ),
            422,
        ),
        "prior_nan": (
            _raw(b'{"image": "' + img.encode() + b'", "prior": [NaN,1,1,1,1,1,1,1,1,1]}'),
            422,
        ),
        "prior_negative": (_json({"image": img, "prior": [1] * 9 + [-1]}), 422),
        "prior_wrong_length": (_json({"image": img, "prior": [1, 2]}), 422),
        "prior_unknown_name": (_json({"image": img, "prior": "uniformish"}), 422),
        "json_nested_100k": (_raw(b"[" * 100_000 + b"]" * 100_000), 400),
        "unsupported_type": (_raw(b"hello", "text/plain"), 415),
        "multipart_malformed": (
            _raw(
                b"--b\r\nContent-Disposition: form-data\r\n\r\nx", "multipart/form-data; boundary=b"
            ),
            400,
        ),
        "no_api_key": ({"json": {"image": img}, "headers": {"X-API-Key": ""}}, 401),
        "wrong_api_key": ({"json": {"image": img}, "headers": {"X-API-Key": "wrong"}}, 401),
    }


def exchange(port: int, *pieces: bytes, wait: float, pause: float = 0.0) -> tuple[bytes, float]:
    """Send ``pieces`` on a fresh connection, read until the server closes (at most ``wait``
    seconds, 1 MiB); -> (everything received, seconds from connecting to the close)."""
    start = time.monotonic()
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        with contextlib.suppress(OSError):
            for i, piece in enumerate(pieces):
                if i and pause:
                    time.sleep(pause)
                s.sendall(piece)
        with contextlib.suppress(OSError):
            while len(data) < 2**20 and (part := s.recv(65536)):
                data += part
    return data, time.monotonic() - start


def status_of(data: bytes) -> int | None:
    return int(data.split()[1]) if data.startswith(b"HTTP/") else None


def _raw_socket(port: int, payload: bytes, wait: float) -> tuple[int | None, float]:
    """Send ``payload``, read until the server closes; -> (HTTP status or None, seconds)."""
    data, secs = exchange(port, payload, wait=wait)
    return status_of(data), secs


def hostile_socket_cases(port: int) -> dict[str, Callable[[], dict[str, Any]]]:
    head = f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {API_KEY}\r\nContent-Type: application/json\r\n"

    def slow_body() -> dict[str, Any]:  # 100,000 bytes announced, 10 sent
        status, secs = _raw_socket(
            port, (head + "Content-Length: 100000\r\n\r\n").encode() + b"0" * 10, 15
        )
        return {
            "status": status,
            "seconds_to_close": round(secs, 2),
            "ok": status == 408 and secs < READ_TIMEOUT_S + 2,
        }

    def huge_header() -> dict[str, Any]:  # 32 MiB header
        payload = (head + "X-Pad: ").encode() + b"a" * (32 * 1024 * 1024) + b"\r\n\r\n"
        status, secs = _raw_socket(port, payload, 15)
        return {
            "status": status,
            "seconds_to_close": round(secs, 2),
            "ok": status in (400, 431, None) and secs < 5,
        }

    return {"slow_body_10_of_100000_bytes": slow_body, "header_32_MiB": huge_header}


def connection_cases(
    port: int, head_timeout: float, cap: int, get: str = "/health", post: str = "/predict"
) -> dict[str, Callable[[], dict]]:
    """Connection-level abuse, for any server on :mod:`ltzoo.serve.http11` (``ltzoo serve``, the Hub).

    Each case says what it saw and whether that is what the layer promises: silent and
    stalled sockets closed at the head deadline, smuggling-shaped framing refused and closed,
    and a normal request served within the deadline + 5 s after the cap was filled.
    """
    wait = head_timeout + 10
    request = f"GET {get} HTTP/1.1\r\nHost: x\r\n".encode()

    def silent_socket() -> dict[str, Any]:
        data, secs = exchange(port, wait=wait)
        return {
            "bytes": len(data),
            "seconds_to_close": round(secs, 2),
            "ok": data == b"" and secs < head_timeout + 2,
        }

    def head_stopped_midway() -> dict[str, Any]:
        data, secs = exchange(port, request + b"X-Slow: ", wait=wait)
        return {
            "status": status_of(data),
            "seconds_to_close": round(secs, 2),
            "ok": status_of(data) == 408 and secs < head_timeout + 2,
        }

    def content_length_and_chunked() -> dict[str, Any]:
        framing = b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        data, secs = exchange(
            port,
            f"POST {post} HTTP/1.1\r\nHost: x\r\n".encode() + framing + request + b"\r\n",
            wait=wait,
        )
        answers = data.count(b"HTTP/1.1 ")
        return {
            "status": status_of(data),
            "answers": answers,
            "seconds_to_close": round(secs, 2),
            "ok": status_of(data) == 400 and answers == 1 and secs < 3,
        }

    def silent_sockets_to_the_cap() -> dict[str, Any]:
        silent = [socket.create_connection(("127.0.0.1", port), timeout=wait) for _ in range(cap)]
        try:
            start = time.monotonic()
            time.sleep(0.5)  # let the server accept them all
            over = status_of(exchange(port, request + b"\r\n", wait=wait)[0])
            served = None
            while served is None and time.monotonic() - start < head_timeout + 10:
                data, _ = exchange(port, request + b"Connection: close\r\n\r\n", wait=wait)
                served = time.monotonic() - start if status_of(data) == 200 else None
                time.sleep(0.2)
        finally:
            for sock in silent:
                sock.close()
        return {
            "sockets": cap,
            "status_at_the_cap": over,
            "served_after_s": None if served is None else round(served, 2),
            "ok": over == 503 and served is not None and served < head_timeout + 5,
        }

    return {
        "silent_socket": silent_socket,
        "head_stopped_midway": head_stopped_midway,
        "content_length_and_chunked": content_length_and_chunked,
        "silent_sockets_to_the_cap": silent_sockets_to_the_cap,
    }


def errors_total(c: httpx.Client, kind: str) -> float:
    """``ltzoo_http_errors_total`` of ``kind`` on /predict, from ``/metrics``."""
    prefix = f'ltzoo_http_errors_total{{kind="{kind}",path="/predict"}} '
    lines = [x for x in c.get("/metrics").text.splitlines() if x.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def client_disconnects(server: Server) -> dict[str, Any]:
    """A body cut short then a half-close, and a bad chunk-size line: client aborts, never
    server errors in ``/metrics``."""
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {API_KEY}\r\n"
    ).encode()
    with httpx.Client(base_url=server.url, timeout=10.0, headers=server.headers) as c:
        before = {kind: errors_total(c, kind) for kind in ("server", "client_abort")}
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(head + b"Content-Length: 1000\r\n\r\n" + b"{" * 10)
            s.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                s.recv(65536)
        exchange(
            server.port,
            head + b"Transfer-Encoding: chunked\r\n\r\n",
            b"zz\r\nhello\r\n",
            wait=10,
            pause=0.3,
        )
        deadline = time.monotonic() + 10
        while (
            errors_total(c, "client_abort") < before["client_abort"] + 2
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        after = {kind: errors_total(c, kind) for kind in ("server", "client_abort")}
    return {
        "client_aborts_counted": after["client_abort"] - before["client_abort"],
        "server_errors_counted": after["server"] - before["server"],
        "ok": after["client_abort"] - before["client_abort"] >= 2
        and after["server"] == before["server"],
    }


def run_connections(server: Server) -> dict[str, Any]:
    cases = {
        name: probe()
        for name, probe in connection_cases(server.port, HEAD_TIMEOUT_S, MAX_CONNECTIONS).items()
    }
    cases["client_disconnects"] = client_disconnects(server)
    return {"cases": cases, "failed": sorted(k for k, v in cases.items() if not v["ok"])}


def run_hostile(server: Server) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with httpx.Client(base_url=server.url, timeout=30.0, headers=server.headers) as c:
        for name, (kwargs, expected) in hostile_http_cases().items():
            start = time.monotonic()
            try:
                r = c.post("/predict", **kwargs)
                status = r.status_code
                is_json = r.headers.get("content-type", "").startswith("application/json")
            except httpx.HTTPError:
                status, is_json = None, False
            secs = time.monotonic() - start
            out[name] = {
                "status": status,
                "expected": expected,
                "seconds": round(secs, 3),
                "ok": status == expected and is_json,
            }
        for name, probe in hostile_socket_cases(server.port).items():
            out[name] = probe()
        healthy = (
            c.get("/health").status_code == 200
            and c.post("/predict", json={"image": b64(GOOD)}).status_code == 200
        )
    return {
        "cases": out,
        "kinds": len(out),
        "failed": sorted(k for k, v in out.items() if not v["ok"]),
        "healthy_after": healthy,
    }


async def _small_during_big(server: Server) -> dict[str, Any]:
    """A 28x28 request while a request with 2 RGBA 5000x5000 images (allowed) is decoded."""
    big = b64(png("RGBA", (5000, 5000), noise=False))
    small = b64(png("L", (28, 28)))
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0, headers=server.headers) as c:
        big_task = asyncio.create_task(c.post("/predict", json={"images": [big, big]}))
        await asyncio.sleep(0.2)
        start = time.monotonic()
        r = await c.post("/predict", json={"image": small})
        small_s = time.monotonic() - start
        rb = await big_task
    return {
        "big_status": rb.status_code,
        "small_status": r.status_code,
        "small_seconds": round(small_s, 3),
        "ok": r.status_code == 200 and small_s < 5.0 and rb.status_code in (200, 413, 504),
    }


# -- the local Hub server ---------------------------------------------------------------------
HUB_MAX_CONNECTIONS = 64  # python -m ltzoo.hub_server's default


def _hub_card(target_bytes: int) -> str:
    """A model card whose YAML front matter is ``target_bytes`` long (slow to parse)."""
    tags = "".join(f"- tag-{i:07d}\n" for i in range(target_bytes // 16))
    return f"---\nlicense: mit\ntags:\n{tags}---\n# card\n"


def _while_slow(url: str, slow: Callable[[], int]) -> dict[str, Any]:
    """Run ``slow`` (-> HTTP status) and, once it is under way, time a ``whoami`` on another
    connection."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        future = pool.submit(slow)
        time.sleep(0.3)
        t0 = time.monotonic()
        whoami = httpx.get(url + "/api/whoami-v2", timeout=30).status_code
        whoami_s = time.monotonic() - t0
        still_running = not future.done()
        status = future.result()
    return {
        "status": status,
        "seconds": round(time.monotonic() - start, 2),
        "whoami_status": whoami,
        "whoami_s": round(whoami_s, 3),
        "measured_while_running": still_running,
        "ok": whoami == 200 and whoami_s < 1.0,
    }


def hub_slow_requests(url: str, files: int) -> dict[str, dict[str, Any]]:
    """The requests that froze the Hub server: a whoami during each must take < 1 s."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=url, token="local")
    repo = api.create_repo("bench/many-files").repo_id
    ops = [CommitOperationAdd(f"d{i % 100}/f{i}.txt", f"{i}".encode()) for i in range(files)]

    def commit() -> int:
        api.create_commit(repo, ops, commit_message=f"{files} files")
        return 200  # the client raises on any other answer

    out = {f"commit_{files}_files": _while_slow(url, commit)}
    paths = [f"d{i % 100}/f{i}.txt" for i in range(1000)]  # the Hub's cap per request
    paths_info = f"{url}/api/models/{repo}/paths-info/main"
    out["paths_info_1000_paths"] = _while_slow(
        url, lambda: httpx.post(paths_info, data={"paths": paths}, timeout=60).status_code
    )
    card = _hub_card(900_000)
    out["validate_yaml_0.9_MB"] = _while_slow(
        url,
        lambda: (
            httpx.post(f"{url}/api/validate-yaml", json={"content": card}, timeout=120).status_code
        ),
    )
    big = {"name": "x", "organization": "bench", "pad": "a" * 8_000_000}
    out["create_repo_8_MB_json"] = _while_slow(
        url, lambda: httpx.post(f"{url}/api/repos/create", json=big, timeout=60).status_code
    )
    out["create_repo_8_MB_json"]["ok"] &= out["create_repo_8_MB_json"]["status"] == 413
    return out


def run_hub(tmp: Path, quick: bool) -> dict[str, Any]:
    """``python -m ltzoo.hub_server`` as deployed: connection-level cases and slow requests."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "ltzoo.hub_server",
        "--root",
        str(tmp / "hub"),
        "--port",
        str(port),
    ]
    cmd += ["--head-timeout", str(HEAD_TIMEOUT_S)]
    with (tmp / "hub.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/api/whoami-v2", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "hub server did not start: " + (tmp / "hub.log").read_text()[-2000:]
                )
            time.sleep(0.2)
        probes = connection_cases(
            port,
            HEAD_TIMEOUT_S,
            HUB_MAX_CONNECTIONS,
            get="/api/whoami-v2",
            post="/api/repos/create",
        )
        cases = {name: probe() for name, probe in probes.items()}
        status, secs = _raw_socket(
            port, b"GET /api/whoami-v2 HTTP/1.1\r\nX-Pad: " + b"a" * (32 * 2**20) + b"\r\n\r\n", 15
        )
        cases["header_32_MiB"] = {
            "status": status,
            "seconds_to_close": round(secs, 2),
            "ok": status == 431 and secs < 5,
        }
        cases.update(hub_slow_requests(url, 1_000 if quick else 10_000))
    finally:
        proc.terminate()
        proc.wait(10)
    return {"cases": cases, "failed": sorted(k for k, v in cases.items() if not v["ok"])}


# -- isolation and load -----------------------------------------------------------------------
def _probs(result: dict[str, Any]) -> list[float]:
    out = [0.0] * NUM_CLASSES
    for p in result["predictions"]:
        out[p["index"]] = p["probability"]
    return out


async def _fire(
    server: Server, bodies: list[dict[str, Any]], concurrency: int, limit_s: float
) -> list[httpx.Response | str]:
    """POST every body at most ``concurrency`` at a time; a failed request gives its error name."""
    sem = asyncio.Semaphore(concurrency)
    # idle connections expire on the client (2 s) before uvicorn closes them (5 s): with
    # equal times, a request sent on a connection the server is closing gets a ReadError
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(
        base_url=server.url, timeout=30.0, limits=limits, headers=server.headers
    ) as c:

        async def one(body: dict[str, Any]) -> httpx.Response | str:
            async with sem:
                try:
                    return await c.post("/predict", **body)
                except httpx.HTTPError as exc:
                    return type(exc).__name__

        return await asyncio.wait_for(asyncio.gather(*(one(b) for b in bodies)), limit_s)


def run_isolation(server: Server, n: int, concurrency: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    goods = [
        {"image": b64(png("RGB", (30 + i, 28), seed=i)), "top_k": NUM_CLASSES, "prior": p}
        for i, p in enumerate(
            ["balanced", "train", [1.0] * NUM_CLASSES, [float(k + 1) for k in range(NUM_CLASSES)]]
            * 5
        )
    ]
    bads = [
        kw for kw, status in hostile_http_cases().values() if status in (400, 422) and "json" in kw
    ][:12]
    with httpx.Client(base_url=server.url, timeout=30.0, headers=server.headers) as c:
        solo = [_probs(c.post("/predict", json=g).json()) for g in goods]
    plan = [
        ("bad", int(rng.integers(len(bads))))
        if i % 4 == 3
        else ("good", int(rng.integers(len(goods))))
        for i in range(n)
    ]
    bodies = [bads[j] if kind == "bad" else {"json": goods[j]} for kind, j in plan]
    start = time.monotonic()
    responses = asyncio.run(_fire(server, bodies, concurrency, 300.0))
    secs = time.monotonic() - start
    good_ok = bad_ok = worst = 0.0
    n_good = sum(kind == "good" for kind, _ in plan)
    for (kind, j), r in zip(plan, responses, strict=True):
        if kind == "bad":
            bad_ok += not isinstance(r, str) and 400 <= r.status_code < 500
        elif not isinstance(r, str) and r.status_code == 200:
            diff = float(np.abs(np.subtract(_probs(r.json()), solo[j])).max())
            worst = max(worst, diff)
            good_ok += diff <= 1e-5
    return {
        "requests": n,
        "concurrency": concurrency,
        "good_equal_to_solo": int(good_ok),
        "good": n_good,
        "bad_4xx": int(bad_ok),
        "bad": n - n_good,
        "max_abs_diff": worst,
        "seconds": round(secs, 2),
        "ok": good_ok == n_good and bad_ok == n - n_good,
    }


def run_load(server: Server, n: int, concurrency: int) -> dict[str, Any]:
    body = {"json": {"image": b64(png("L", (28, 28))), "top_k": 3}}
    asyncio.run(_fire(server, [body] * min(200, n), concurrency, 120.0))  # warm-up
    pids = descendants(server.proc.pid)
    before = rss_mib(pids)
    start = time.monotonic()
    responses = asyncio.run(_fire(server, [body] * n, concurrency, 600.0))
    secs = time.monotonic() - start
    after = rss_mib(pids)
    kinds = Counter(r if isinstance(r, str) else str(r.status_code) for r in responses)
    errors = n - kinds.pop("200", 0)
    growth = (after - before) / before
    return {
        "requests": n,
        "concurrency": concurrency,
        "errors": errors,
        "error_kinds": dict(kinds),
        "req_per_s": round(n / secs, 1),
        "rss_mib_before": round(before, 1),
        "rss_mib_after": round(after, 1),
        "rss_growth": round(growth, 4),
        "ok": errors == 0 and growth < 0.10,
    }


# -- model and driver ---------------------------------------------------------------------------
def make_model(directory: Path) -> Path:
    import torch

    from ltzoo import zoo

    torch.manual_seed(0)
    counts = [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    cfg = zoo.EnsembleConfig(
        backbone="resnet32",
        num_experts=3,
        num_classes=NUM_CLASSES,
        class_counts=counts,
        name="bench-reliability",
    )
    model = zoo.Ensemble(cfg).eval()
    with torch.no_grad():
        for expert in model.experts:
            expert.classifier.weight.mul_(0.02)  # type: ignore[union-attr,operator]
    model.save_pretrained(directory)
    return directory


def crash_checks(model: Path, tmp: Path, roles: list[str]) -> list[dict[str, Any]]:
    """``roles``: a signal name, "Ctrl+C" or a process role to ``kill -9``; a role ending in
    :data:`SIGCHLD_IGNORED` runs the server under a launcher that ignores SIGCHLD."""
    out = []
    for spec in roles:
        role = spec.removesuffix(SIGCHLD_IGNORED)
        how = role if role.startswith("SIG") or role == "Ctrl+C" else f"kill -9 {role}"
        log = tmp / f"crash-{role}-{len(out)}.log"
        server = Server(model, "torch", log, ignore_sigchld=spec != role)
        try:
            server.wait_ready()
            pids = descendants(server.proc.pid)
            target = server.proc.pid if how == role else server.roles()[role]
            out.append({**stop_check(server, pids, how, target), "how": how + spec[len(role) :]})
        finally:
            server.kill_all()
    return out


def run(quick: bool, allow_busy: bool = False) -> dict[str, Any]:
    guard = LoadGuard.start(allow_busy=quick or allow_busy)  # CI's quick run shares the CPU
    results: dict[str, Any] = {"mode": "quick" if quick else "full"}
    with tempfile.TemporaryDirectory(prefix="ltzoo-rel-") as tmp_name:
        tmp = Path(tmp_name)
        model = make_model(tmp / "model")
        backends = ["torch"] if quick else ["torch", "onnxruntime"]
        for backend in backends:
            started = time.monotonic()
            server = Server(model, backend, tmp / f"{backend}.log")
            try:
                server.wait_ready()
                if backend == "torch":
                    results["hostile"] = run_hostile(server)
                    results["connections"] = run_connections(server)
                    results["small_during_big"] = asyncio.run(_small_during_big(server))
                    results["isolation"] = run_isolation(
                        server, 80 if quick else 400, 8 if quick else 16
                    )
                results.setdefault("load", {})[backend] = run_load(
                    server, 300 if quick else 5000, 16 if quick else 64
                )
                pids = descendants(server.proc.pid)
                results.setdefault("signals", []).append(
                    stop_check(server, pids, "SIGTERM", server.proc.pid)
                )
            finally:
                server.kill_all()
            results.setdefault("seconds", {})[backend] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        results["hub"] = run_hub(tmp, quick)
        results["seconds"]["hub"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        http_ign = "http" + SIGCHLD_IGNORED  # the harder case: covers plain "http" too
        roles = (
            [http_ign, "Ctrl+C"]
            if quick
            else ["SIGINT", "Ctrl+C", "main", "http", http_ign, "worker", "manager"]
        )
        results["signals"] += crash_checks(model, tmp, roles)
        results["seconds"]["crash_checks"] = round(time.monotonic() - started, 1)
    results["machine"] = guard.finish()
    results["ok"] = bool(
        not results["hostile"]["failed"]
        and results["hostile"]["healthy_after"]
        and not results["connections"]["failed"]
        and not results["hub"]["failed"]
        and results["small_during_big"]["ok"]
        and results["isolation"]["ok"]
        and all(v["ok"] for v in results["load"].values())
        and all(s["ok"] for s in results["signals"])
    )
    return results


def print_table(r: dict[str, Any]) -> None:
    h = r["hostile"]
    rows = [
        (
            "hostile inputs",
            f"{h['kinds'] - len(h['failed'])}/{h['kinds']} as expected, healthy after: {h['healthy_after']}",
        ),
        (
            "connection level",
            f"{len(r['connections']['cases']) - len(r['connections']['failed'])}/{len(r['connections']['cases'])} as expected",
        ),
        (
            "local Hub server",
            f"{len(r['hub']['cases']) - len(r['hub']['failed'])}/{len(r['hub']['cases'])} as expected",
        ),
        (
            "28x28 during 2x5000^2",
            f"{r['small_during_big']['small_status']} in {r['small_during_big']['small_seconds']} s",
        ),
        (
            "batch isolation",
            f"{r['isolation']['good_equal_to_solo']}/{r['isolation']['good']} good == solo, {r['isolation']['bad_4xx']}/{r['isolation']['bad']} bad 4xx",
        ),
    ]
    for backend, v in r["load"].items():
        rows.append(
            (
                f"load {backend}",
                f"{v['requests']} @ {v['concurrency']}: {v['errors']} errors, {v['req_per_s']} req/s, RSS {v['rss_growth'] * 100:+.1f}%",
            )
        )
    for s in r["signals"]:
        rows.append(
            (
                s["how"],
                f"stopped in {s['stopped_s']} s, orphans {s['orphans']}, port free {s['port_free']}, exit {s['exit_code']}",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for name, part in (("hostile", h), ("connection", r["connections"]), ("hub", r["hub"])):
        if part["failed"]:
            print(f"failed {name} cases:", ", ".join(part["failed"]))
    print("ALL OK" if r["ok"] else "FAILURES", f"({r['machine']['label']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size (about 2 minutes)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"JSON output (default {RESULTS} for the full run)"
    )
    add_allow_busy(parser)
    args = parser.parse_args(argv)
    if not args.quick and Path("/tmp/ltzoo_quiet").exists():
        print(
            "/tmp/ltzoo_quiet exists: the machine is reserved for timing; not running the full benchmark"
        )
        return 2
    results = run(args.quick, args.allow_busy)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
