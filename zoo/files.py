"""File names of a saved ensemble, where a local directory keeps its model, and the one way
files that must survive a kill are written (torch-free, so `ltzoo list` and the registry stay
light)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def local_model_dir(directory: str | Path) -> Path:
    """The model directory of a local ``directory``: a run directory's ``model/``, or
    ``directory`` itself; ``FileNotFoundError`` saying what is missing otherwise."""
    path = Path(directory)
    if (path / "model" / CONFIG_NAME).is_file():
        return path / "model"
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "run.json").is_file():
        raise FileNotFoundError(
            f"run directory {directory} has no model/ yet (training has not finished): "
            f"resume it with `ltzoo train RECIPE --out {directory} --resume`"
        )
    raise FileNotFoundError(
        f"{directory} is neither a model directory (config.json, model.safetensors) "
        "nor a run directory of `ltzoo train` (model/)"
    )


def _temp_for(path: Path) -> Path:
    """This thread's temp file (or folder) for writing ``path``: one per process and thread,
    since two may fill the same cache at once; its pid lets a later writer clear it."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def _discard(tmp: Path) -> None:
    """Remove ``tmp``, a file or a folder (a pid can be reused: either may be there)."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _remove_stale_temps(path: Path) -> None:
    """Remove the temp files and folders that killed writers of ``path`` left (their process
    is gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _discard(tmp)
        except OSError:  # alive, owned by someone else
            pass


@contextmanager
def staging_dir(path: Path) -> Iterator[Path]:
    """A private folder beside ``path`` to write several files in before renaming them into
    place (one rename is atomic, a folder of files is not); removed on exit, and, should the
    writer be killed, by the next writer of ``path``."""
    _remove_stale_temps(path)
    tmp = _temp_for(path)
    _discard(tmp)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        _discard(tmp)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; best effort, since some file systems (and
    Windows) cannot open or fsync a directory, and the file itself is already written."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object] | bytes) -> None:
    """Write ``path`` through a temp file and a rename (``write``: the bytes, or a function
    that writes to the open file): a kill leaves the old file or the new one, never half of
    one. A failed write removes the temp file (a killed writer's is removed by the next
    write); a full disk raises ``OSError(ENOSPC)`` naming ``path`` (torch's own error names
    a C++ source file)."""
    _remove_stale_temps(path)
    tmp = _temp_for(path)
    _discard(tmp)
    try:
        with open(tmp, "wb") as fh:  # a Python file: write errors keep their errno
            if isinstance(write, bytes):
                fh.write(write)
            else:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # the rename itself survives a power cut too
    except BaseException as exc:
        _discard(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device: {path}") from exc
        raise


def write_json(path: Path, obj: Any, **dumps: Any) -> None:
    """``obj`` as indented JSON through :func:`atomic_write` (``dumps``: more json.dumps options)."""
    atomic_write(path, (json.dumps(obj, indent=2, **dumps) + "\n").encode())


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "atomic_write",
    "local_model_dir",
    "staging_dir",
    "write_json",
]
