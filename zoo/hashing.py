"""Streaming file digests shared by the Hub client side (``zoo.hub_io``) and the local Hub."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def _update(digest: hashlib._Hash, path: str | Path) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (the Hub's LFS oid), read in chunks."""
    return _update(hashlib.sha256(), path)


def git_blob_sha1(path: str | Path) -> str:
    """The git blob id of a file (the Hub's ETag of a regular, non-LFS file), read in chunks."""
    return _update(hashlib.sha1(b"blob %d\0" % Path(path).stat().st_size), path)
