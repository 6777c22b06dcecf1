"""The server lives and dies as one: signal handling and process supervision for ``ltzoo serve``.

LitServe runs a main process with several children: the multiprocessing manager (owner of
the request queue), one forked uvicorn process per HTTP server and one spawned process per
inference worker. On its own, SIGTERM to the main process kills only the main process
(the children keep serving as orphans) and the death of an HTTP process or of the manager
goes unnoticed. :func:`run_supervised` closes both gaps:

* SIGTERM, SIGINT and SIGHUP to the main process start LitServe's own shutdown (its
  ``KeyboardInterrupt`` path); whatever is still alive after ``grace + HARD_KILL_AFTER_S``
  seconds is killed;
* a watcher thread waits on the *sentinel* of every child (a pipe that closes when the child
  exits, whoever reaps it): when any child exits, the same shutdown runs and ``ltzoo serve``
  exits with status 1;
* SIGCHLD is reset to its default: a launcher that ignores it (the disposition is inherited
  across ``exec``) would have the kernel reap our children, and multiprocessing would then
  report a dead child as alive forever (``waitpid`` fails with ECHILD);
* every child asks the kernel to kill it when the main process dies (``PR_SET_PDEATHSIG``,
  Linux), so ``kill -9`` of the main process leaves no orphan holding the port;
* inference workers are spawned with SIGINT ignored: a terminal's Ctrl+C reaches the whole
  process group, and only the main process should act on it (it stops the workers itself);
* before the process ends, multiprocessing's exit-time finalizers run: they unlink the named
  semaphores of the shared batch counters, which ``os._exit`` alone would leave to the
  resource tracker ("There appear to be N leaked semaphore objects").
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import connection as mp_connection
from multiprocessing import util as mp_util
from typing import Any, NoReturn

logger = logging.getLogger("ltzoo.serve")

#: seconds the watcher sleeps between two looks at the children
POLL_S = 0.25
#: after a shutdown began, seconds (on top of the grace period) before everything is killed
HARD_KILL_AFTER_S = 6.0
_PR_SET_PDEATHSIG = 1
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when ``parent_pid`` (its parent) exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


class _ForkHook:
    """Run in every child forked by multiprocessing (manager, uvicorn servers)."""

    def __init__(self, main_pid: int) -> None:
        self.main_pid = main_pid

    def __call__(self, _: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):  # uvicorn sets its own
            signal.signal(sig, signal.SIG_DFL)
        if os.getppid() == self.main_pid:
            die_with_parent(self.main_pid)


class Supervisor:
    """Turns signals and child deaths into one bounded shutdown of the whole server."""

    def __init__(self, grace: float) -> None:
        self.main_pid = os.getpid()
        self.grace = grace
        self.reason: str | None = None
        self.crashed = False
        self._lock = threading.Lock()
        self._hook = _ForkHook(self.main_pid)  # kept alive: the registry holds weak references

    def install(self) -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # before any child exists
        mp_util.register_after_fork(self._hook, self._hook)
        for sig in _SIGNALS:
            signal.signal(sig, self._on_signal)
        threading.Thread(target=self._watch, name="ltzoo-supervisor", daemon=True).start()

    def _begin(self, reason: str, crashed: bool) -> bool:
        with self._lock:
            if self.reason is not None:
                return False
            self.reason, self.crashed = reason, crashed
        timer = threading.Timer(self.grace + HARD_KILL_AFTER_S, self._hard_exit)
        timer.daemon = True
        timer.start()
        return True

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if os.getpid() != self.main_pid:  # a forked child before its own handlers are set
            os._exit(0)
        if self._begin(signal.Signals(signum).name, crashed=False):
            raise KeyboardInterrupt  # LitServe's graceful-shutdown path

    def _watch(self) -> None:
        watched: dict[int, tuple[int, str]] = {}  # sentinel -> (pid, name)
        while self.reason is None:
            # not mp.active_children(): it reaps, so a child that died before this loop first
            # saw it (killed right after start) would vanish unseen; the stdlib's set of
            # started children keeps it until someone reaps it
            for p in list(mp.process._children):  # type: ignore[attr-defined]
                with contextlib.suppress(ValueError):  # not started yet, or closed
                    watched.setdefault(p.sentinel, (p.pid or 0, p.name))
            if not watched:
                time.sleep(POLL_S)
                continue
            exited = [s for s in mp_connection.wait(list(watched), POLL_S) if isinstance(s, int)]
            if exited:
                pid, name = watched[exited[0]]
                # a child that exits during a requested shutdown is that shutdown at work
                if self._begin(f"{name} (pid {pid}) exited", crashed=True):
                    logger.error("ltzoo serve: %s (pid %d) exited; shutting down", name, pid)
                    os.kill(self.main_pid, signal.SIGUSR1)
                return

    def _hard_exit(self) -> None:
        logger.error("ltzoo serve: shutdown took too long; killing every process")
        kill_children(0.0)
        os._exit(1 if self.crashed else 0)


def kill_children(wait: float) -> None:
    """Terminate every live multiprocessing child, waiting ``wait`` s before SIGKILL."""
    children = mp.active_children()
    for child in children:
        with contextlib.suppress(Exception):
            child.terminate()
    deadline = time.monotonic() + wait
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            with contextlib.suppress(Exception):
                child.kill()
                child.join(1.0)


def _spawning_without_sigint(launch: Callable[..., Any]) -> Callable[..., Any]:
    """``launch`` (LitServe's start of the inference workers, in the main thread) run with
    SIGINT ignored: a spawned interpreter keeps an inherited ``SIG_IGN`` instead of raising
    ``KeyboardInterrupt``, so a terminal's Ctrl+C no longer prints each worker's traceback."""

    @functools.wraps(launch)
    def launch_ignoring_sigint(*args: Any, **kwargs: Any) -> Any:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return launch(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)

    return launch_ignoring_sigint


def _release_multiprocessing_resources() -> None:
    """Run multiprocessing's exit-time cleanup (what ``atexit`` would, skipped by
    ``os._exit``): above all, unlink the named semaphores this process created, so the
    resource tracker finds none left to warn about. Bounded by the supervisor's hard-exit timer."""
    with contextlib.suppress(Exception):  # a broken manager must not turn a stop into a crash
        mp_util._exit_function()  # type: ignore[attr-defined]


def run_supervised(server: Any, *, grace: float = 3.0, **run_kwargs: Any) -> NoReturn:
    """``server.run(**run_kwargs)`` under a :class:`Supervisor`, then exit the process.

    Exit status 0 after a requested shutdown (signal), 1 when one of the server's processes
    died; one line on stderr says which. The process ends with ``os._exit`` once every child
    is gone and multiprocessing's own cleanup has run: after a crash, the rest of interpreter
    finalisation can block on proxies of the dead queue manager.
    """
    supervisor = Supervisor(grace)
    # LitServe's monitor watches only inference workers and shuts down from its own thread;
    # ours watches every child and routes the shutdown through the main thread.
    server._monitor_workers = False
    server.uvicorn_graceful_timeout = grace
    server.launch_inference_worker = _spawning_without_sigint(server.launch_inference_worker)
    supervisor.install()

    def _crash_signal(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGUSR1, _crash_signal)
    try:
        server.run(**run_kwargs)
    except KeyboardInterrupt:
        pass  # a signal during start-up, before LitServe's own handler was in place
    except Exception as exc:  # a dead manager breaks LitServe's shutdown half-way
        if supervisor.reason is None:
            raise
        logger.debug("shutdown after %s: %s", supervisor.reason, exc)
    finally:
        kill_children(grace)
    _release_multiprocessing_resources()
    if supervisor.reason:
        print(f"ltzoo serve: stopped ({supervisor.reason})", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if supervisor.crashed else 0)
