"""How much of Ray's own logging a person running the CLI sees: its noise is quieted at the default verbosity, all of
it comes back with ``diffguard -v``, and nothing at WARNING or above that reports a real problem is ever hidden.

Quieted, each for a named reason (the last two stay in the Ray session's logs, /tmp/ray/session_latest/logs):

* Ray's "Token authentication is enabled for this Ray cluster" warning, which a new local Ray prints when
  ``RAY_AUTH_MODE`` is unset: token authentication is what it should have (docs/CLI.md says so, and how to opt out).
* Ray Data's INFO lines on the console (execution plan, start, finish, and the progress it logs every few seconds
  when stdout is not a terminal): the scan logs its own progress. Ray Data's WARNING and ERROR lines still show, and
  so do its progress bars on a terminal.
* :data:`NOISE`: lines Ray's C++ core writes straight to file descriptor 2, past Python's logging. A scan's stderr
  passes through a child process that drops exactly these lines (:func:`filter_stderr`).

The library (``run_scan``, tests) leaves Ray's logging as Ray sets it: only the CLI calls :func:`set_verbose`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import subprocess
import sys

VERBOSE = True  # the CLI sets False at its default verbosity

# Ray's Python loggers -> the start of the one message of theirs that is noise
NOISY_LOGGERS = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
}

NOISE = (
    # Ray Data's actor pools pass object refs to their actors' constructors (ray-project/ray#57733), so Ray's core
    # logs this at ERROR for every scoring actor a scan starts, though the pool holds those refs for its whole life.
    r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*\)' and ID: '\w+' has constructor arguments in "
    r"the object store and max_restarts > 0\.",
)

# The filter process: stdin -> stdout line by line, without the lines matching any pattern in argv. It ignores
# SIGINT (a Ctrl-C is for the CLI) and ends at EOF, when every writer of the pipe has exited.
_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
noise = [re.compile(p.encode()) for p in sys.argv[1:]]
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not any(p.search(line) for p in noise):
        out.write(line)
        out.flush()
"""
_filtering: subprocess.Popen | None = None  # the filter process, once started


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_DROPS = {name: _DropMessage(prefix) for name, prefix in NOISY_LOGGERS.items()}


def set_verbose(verbose: bool) -> None:
    """The CLI's verbosity: False quiets Ray's noise (Python loggers now; Ray Data and fd 2 when a scan starts them)."""
    global VERBOSE
    VERBOSE = verbose
    for name, drop in _DROPS.items():
        (logging.getLogger(name).addFilter if not verbose else logging.getLogger(name).removeFilter)(drop)


def quiet_ray_data() -> None:
    """After ``import ray.data`` (which sets up its loggers): Ray Data's console handler at WARNING; its log file in
    the Ray session keeps everything."""
    if VERBOSE:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)


def is_noise(line: str) -> bool:
    return any(re.search(pattern, line) for pattern in NOISE)


def filter_stderr() -> None:
    """From now until this process exits, its file descriptor 2 passes through a child process that drops the
    :data:`NOISE` lines and forwards every other line as it comes. The child is in its own session and ignores SIGINT,
    and it outlives this process until the pipe is closed, so the last lines of a crash still reach the terminal.
    Only at the default verbosity, and only where stderr is the process's own (not a test's capture)."""
    global _filtering
    if VERBOSE or _filtering is not None or sys.stderr is not sys.__stderr__:
        return
    sys.stderr.flush()
    read, write = os.pipe()
    try:
        _filtering = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER, *NOISE], stdin=read, stdout=2, start_new_session=True
        )
    finally:
        os.close(read)
    original = os.dup(2)
    os.dup2(write, 2)
    os.close(write)
    atexit.register(_unfilter, original)


def _unfilter(original: int) -> None:
    """At exit: stderr back to the original, so the child reads EOF, forwards what is left and exits."""
    with contextlib.suppress(OSError):
        sys.stderr.flush()
        os.dup2(original, 2)
        os.close(original)
    if _filtering is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):  # a process still holds the pipe: the child forwards
            _filtering.wait(timeout=5)  # its lines until that one exits too
