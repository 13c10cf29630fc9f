"""Process plumbing of the long-running commands (``ray-vlm serve``, ``ray-vlm index``).

- ``GracefulStop``: SIGTERM and SIGINT become a stop request that the command acts on (finish or cancel what is in
  flight, shut Ray down, exit 0); a second signal forces an exit (code 128 + signal) after killing what Ray started.
  ``ray.init`` takes SIGTERM over twice: it sets a Python handler (``sys.exit(15)``), and the core worker it starts
  installs a C++ failure handler (it prints ``*** SIGTERM received ... PC: @ ...``); ``start_ray`` re-installs ours
  once ``ray.init`` returns.
- ``RayProcesses``: the processes started below this one after it was created (gcs_server, raylet, dashboard,
  DashboardAgent, RuntimeEnvAgent, log_monitor, workers); after ``ray.shutdown()``, ``reap()`` waits for them and
  kills whatever is left. This process becomes a child subreaper (Linux), so processes orphaned when their parent
  (the raylet) exits first are re-parented here and still found.
- ``ray_output``: while Ray runs, Ray's console output (its C++ log lines on file descriptor 2, Python loggers,
  warnings, progress bars) goes to a log file; the command's own messages go to the real stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, TextIO

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What ``signal.getsignal`` returns and ``signal.signal`` takes.
_SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class StopRequested(BaseException):
    """Raised in the main thread by the first SIGTERM/SIGINT while it waits on Ray (see ``interruptible``).

    A ``BaseException``, so that ``except Exception`` blocks in library code do not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class GracefulStop:
    """SIGTERM / SIGINT → a stop request; the second signal → ``on_force()`` and ``os._exit(128 + signum)``.

    The first signal sets ``requested``; inside ``interruptible()`` it also raises ``StopRequested`` (to leave a
    blocking wait on Ray at once). Outside, the command polls ``requested`` at a point where stopping is safe.
    """

    def __init__(self, on_force: Callable[[], None] | None = None):
        self.signum: int | None = None
        self.on_force = on_force
        self._depth = 0
        self._old: dict[int, _SignalHandler] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> bool:
        """Install (or re-install, e.g. after ``ray.init``) the handlers; only possible in the main thread.

        A SIGINT that was ignored when this process started (a background job of a shell) stays ignored."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in STOP_SIGNALS:
            current = signal.getsignal(sig)
            if sig not in self._old:
                self._old[sig] = current
            if self._old[sig] is signal.SIG_IGN:
                continue
            signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now
            try:
                if self.on_force is not None:
                    self.on_force()
            finally:
                os._exit(128 + signum)
        self.signum = signum
        if self._depth:
            raise StopRequested(signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block that a stop request leaves at once (by ``StopRequested``), e.g. a wait on Ray."""
        if self.signum is not None:
            raise StopRequested(self.signum)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s`` or until a stop is requested; returns ``requested``."""
        end = time.monotonic() + timeout_s
        while self.signum is None and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.25))
        return self.requested


def start_ray(stop: GracefulStop, **init_kwargs) -> None:
    """``ray.init(**init_kwargs)``, leaving ``stop``'s handlers in charge afterwards.

    ``ray.init`` replaces the driver's Python SIGTERM handler with its own (``sys.exit(15)``), and the core worker it
    starts installs a C++ failure handler on SIGTERM that prints ``*** SIGTERM received ... PC: @ ...``; both are
    replaced by ours once it returns. A SIGTERM (or SIGINT) while it starts is a stop request: ``StopRequested``."""
    import ray

    try:
        with stop.interruptible():
            ray.init(**init_kwargs)
    except SystemExit as e:  # ray.init's own handler ran: a SIGTERM while Ray was starting
        if e.code != signal.SIGTERM:
            raise
        if stop.signum is None:
            stop.signum = signal.SIGTERM
        stop.install()
        raise StopRequested(signal.SIGTERM) from None
    stop.install()


def _psutil():
    """psutil: installed, or the copy bundled with Ray (on ``sys.path`` once ``ray`` is imported)."""
    try:
        import psutil
    except ImportError:
        import ray  # noqa: F401  (puts the psutil bundled with Ray on sys.path)

        # isort: split
        import psutil
    return psutil


def _set_child_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init (Linux only; best effort)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


class RayProcesses:
    """The processes started below this one from now on (what a local ``ray.init`` starts), reaped on exit."""

    def __init__(self) -> None:
        psutil = _psutil()

        _set_child_subreaper()
        self._me = psutil.Process()
        self._before = {p.pid for p in self._descendants()}
        self._seen: dict[int, Any] = {}  # pid -> psutil.Process (psutil may come bundled with Ray: untyped)

    def _descendants(self) -> list:
        psutil = _psutil()

        try:
            return self._me.children(recursive=True)
        except psutil.Error:
            return []

    def snapshot(self) -> None:
        """Remember every current descendant that was not there at construction."""
        for p in self._descendants():
            if p.pid not in self._before:
                self._seen.setdefault(p.pid, p)

    def alive(self) -> list:
        psutil = _psutil()

        self.snapshot()
        out = []
        for p in self._seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def kill_all(self) -> None:
        """SIGKILL every remembered process still running (the forced path)."""
        psutil = _psutil()

        for _ in range(3):  # again for any started or re-parented meanwhile
            left = self.alive()
            if not left:
                break
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(left, timeout=0.2)  # SIGKILL: gone at once unless stuck in the kernel

    def reap(self, timeout_s: float = 10.0, rounds: int = 6) -> list[str]:
        """After ``ray.shutdown()``: wait up to ``timeout_s`` for the processes to exit, then SIGTERM, then
        SIGKILL what is left. Returns the names of the processes that had to be killed.

        Each round looks again: a process started meanwhile (a raylet still starting its agents when a start is
        cut short) or re-parented here (its parent killed in the previous round) is found and stopped too."""
        psutil = _psutil()

        def name(p) -> str:
            try:
                return " ".join(p.cmdline()[:1]) or p.name()
            except psutil.Error:
                return str(p.pid)

        left = self.alive()
        if left:
            psutil.wait_procs(left, timeout=timeout_s)
        killed: dict[int, str] = {}
        for i in range(rounds):
            left = self.alive()
            if not left:
                break
            for p in left:
                killed.setdefault(p.pid, name(p))
                with contextlib.suppress(psutil.Error):
                    p.terminate() if i == 0 else p.kill()
            psutil.wait_procs(left, timeout=3.0 if i == 0 else 1.0)
        self._collect_zombies()
        return list(killed.values())

    def _collect_zombies(self) -> None:
        """Wait for those that exited as children of this one (adopted as subreaper), so none stays a zombie."""
        for pid in self._seen:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


def log_path(command: str) -> Path:
    """Where a command writes Ray's console output: ``$TMPDIR/ray-vlm-logs/<command>-<time>-<pid>.log``."""
    d = Path(os.environ.get("RAY_VLM_LOG_DIR") or Path(tempfile.gettempdir()) / "ray-vlm-logs")
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _is_fd(stream, fd: int) -> bool:
    try:
        return stream is not None and stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


class Console(NamedTuple):
    """The command's own output streams while Ray's go to a log file."""

    out: TextIO
    err: TextIO


@contextlib.contextmanager
def ray_output(path: Path | None) -> Iterator[Console]:
    """Until the block ends, send Ray's console output to ``path``: file descriptor 2 (its C++ log lines, stray
    output of its child processes), ``sys.stderr`` (its Python loggers, warnings, progress bars) and ``sys.stdout``
    (the ``(raylet) ...`` error messages Ray prints there). Yields ``Console(out, err)``: streams on the real
    stdout and stderr for the command's own messages. ``path`` None (``--verbose``), or a stderr that is not
    descriptor 2 (a test runner's capture): nothing is redirected, and the streams are ``sys.stdout``/``sys.stderr``.
    """
    if path is None or not _is_fd(sys.stderr, 2):
        yield Console(sys.stdout, sys.stderr)
        return
    sys.stderr.flush()
    sys.stdout.flush()
    saved = os.dup(2)
    err = open(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    old_stdout = sys.stdout
    out = old_stdout
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    if _is_fd(old_stdout, 1):
        out = open(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        sys.stdout = sys.stderr  # now the log file
    try:
        yield Console(out, err)
    finally:
        for stream in (sys.stderr, out, err):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout = old_stdout
        os.dup2(saved, 2)
        os.close(saved)
        err.close()
        if out is not old_stdout:
            out.close()


# ------------------------------------------------------------------------------------------ CPU accounting

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu_ticks(pid: int | str) -> int:
    """utime + stime + cutime + cstime of one process (``/proc/<pid>/stat``), in clock ticks; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return sum(int(x) for x in fields[11:15])  # fields 14-17 of proc(5), counted after the command name


def _child_pids(pid: int | str) -> list[str]:
    out: list[str] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(x.decode() for x in f.read().split())
        except OSError:
            continue
    return out


def tree_cpu_s() -> float:
    """CPU seconds used so far by this process (all its threads), the children it has waited for, and its live
    descendants (a decoder child that outlives one call is counted as it goes). Differences of two readings give
    what a call cost, the processes it drives included. Linux reads ``/proc``; elsewhere ``getrusage`` (this
    process and its waited-for children)."""
    if not os.path.isdir("/proc/self/task"):
        import resource

        own, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime
    ticks = _stat_cpu_ticks("self")
    stack = _child_pids("self")
    seen = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        ticks += _stat_cpu_ticks(pid)
        stack.extend(_child_pids(pid))
    return ticks / _CLOCK_TICKS
