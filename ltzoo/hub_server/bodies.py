"""Request bodies of the local Hub: bounded reads, depth-checked JSON and the NDJSON commit
format (base64 file contents streamed to staging, never held whole in memory)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import IO, Any

from fastapi import Request

from .validation import MAX_JSON_DEPTH, HubError

#: NDJSON commit lines up to this size are parsed in memory; in longer ones, strings of
#: more than _SPILL_MIN bytes (file contents) are decoded from the spooled body in chunks.
_INLINE_LINE = 1 << 20
_SPILL_MIN = 1 << 16
_CHUNK = 1 << 22  # a multiple of 4: base64 decodes chunk by chunk


async def _body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body's chunks, answering 413 beyond ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HubError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise HubError(413, f"request body larger than the limit of {limit} bytes")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HubError(413, f"request body larger than the limit of {limit} bytes")
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """Read the request body into memory, answering 413 beyond ``limit`` bytes."""
    return b"".join([chunk async for chunk in _body_chunks(request, limit)])


async def spool_body(request: Request, limit: int, sink: IO[bytes]) -> None:
    """Write the request body into ``sink``, answering 413 beyond ``limit`` bytes."""
    async for chunk in _body_chunks(request, limit):
        sink.write(chunk)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def _json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, strings ignored (no recursion)."""
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw))
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _json_loads(raw: bytes, what: str) -> Any:
    """Parse JSON from the network: malformed or nested deeper than MAX_JSON_DEPTH -> 400."""
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise HubError(400, f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise HubError(400, f"{what}: not valid JSON ({type(exc).__name__})") from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    data = _json_loads(body or b"{}", "malformed JSON body")
    if not isinstance(data, dict):
        raise HubError(400, "malformed JSON body: expected an object")
    return data


# --- streaming NDJSON commits ----------------------------------------------------------------
_STRING_SPECIAL = re.compile(rb'["\\]')


def b64decode(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HubError(400, "file content is not valid base64") from None


def _line_spans(f: IO[bytes]) -> Iterator[tuple[int, int]]:
    """(start, end) offsets of the lines of ``f``, read in chunks (the caller may seek)."""
    start = pos = 0
    while True:
        f.seek(pos)
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        i = 0
        while (j := chunk.find(b"\n", i)) >= 0:
            yield start, pos + j
            start, i = pos + j + 1, j + 1
        pos += len(chunk)
    if start < pos:
        yield start, pos


def _long_strings(f: IO[bytes], start: int, end: int) -> list[tuple[int, int]]:
    """Offsets of the contents of the JSON strings in ``f[start:end]`` longer than _SPILL_MIN."""
    spans: list[tuple[int, int]] = []
    in_string = escaped = False
    opened = pos = start
    while pos < end:
        f.seek(pos)
        chunk = f.read(min(_CHUNK, end - pos))
        i = 0
        while i < len(chunk):
            if escaped:
                escaped, i = False, i + 1
            elif not in_string:
                j = chunk.find(b'"', i)
                if j < 0:
                    break
                in_string, opened, i = True, pos + j + 1, j + 1
            elif (m := _STRING_SPECIAL.search(chunk, i)) is None:
                break
            else:
                i = m.end()
                if m.group() == b"\\":
                    escaped = True
                    continue
                in_string = False
                if pos + m.start() - opened >= _SPILL_MIN:
                    spans.append((opened, pos + m.start()))
        pos += len(chunk)
    return spans


def ndjson_items(f: IO[bytes]) -> Iterator[tuple[Any, dict[str, tuple[int, int]]]]:
    """Parse an NDJSON body without holding long strings in memory.

    Yields (item, spilled) per non-blank line: long strings (file contents) are replaced
    in ``item`` by placeholders, keys of ``spilled``, whose values are their offsets in ``f``.
    """
    for lineno, (start, end) in enumerate(_line_spans(f), 1):
        what = f"malformed NDJSON commit: line {lineno}"
        spans = _long_strings(f, start, end) if end - start > _INLINE_LINE else []
        if (end - start) - sum(e - s for s, e in spans) > _INLINE_LINE:
            raise HubError(400, f"{what} is too large")
        parts, spilled, pos = [], {}, start
        for k, (s, e) in enumerate(spans):
            f.seek(pos)
            parts += [f.read(s - pos), b"\\u0000%d" % k]
            spilled[f"\0{k}"], pos = (s, e), e
        f.seek(pos)
        parts.append(f.read(end - pos))
        raw = b"".join(parts)
        if raw.strip():
            yield _json_loads(raw, what), spilled


def spilled_content(
    spilled: dict[str, tuple[int, int]], content: object, what: str
) -> tuple[int, int] | None:
    """Where ``content``, a line's file content, lies in the spooled body; None when inline.

    Only a file's content may be left in the body: any other spilled string (a commit
    summary, a path, a key) would reach the commit as its placeholder, e.g. a title ``"\\x000"``.
    """
    if any(placeholder != content for placeholder in spilled):
        raise HubError(
            400, f"{what} is too large: only a file's content may be over {_SPILL_MIN} bytes"
        )
    return spilled.get(content) if isinstance(content, str) else None


def b64_file_chunks(f: IO[bytes], start: int, end: int) -> tuple[Iterator[bytes], int]:
    """The decoded bytes of the base64 text at ``f[start:end]``, chunk by chunk, and their size."""
    if (end - start) % 4:
        raise HubError(400, "file content is not valid base64")
    f.seek(end - 2)
    size = (end - start) // 4 * 3 - f.read(2).count(b"=")

    def chunks() -> Iterator[bytes]:
        pos = start
        while pos < end:
            f.seek(pos)
            chunk = f.read(min(_CHUNK, end - pos))
            pos += len(chunk)
            if pos < end and b"=" in chunk:
                raise HubError(400, "file content is not valid base64")
            yield b64decode(chunk)

    return chunks(), size


# --- the app ---------------------------------------------------------------------------------
