"""Ray's noise at the CLI's default verbosity (pipeline.raylogs): exactly the known lines are dropped from stderr, every
other line passes in order, and a crash's last words still arrive. The scan end to end: tests/integration."""

from __future__ import annotations

import logging
import subprocess
import sys

from pipeline import raylogs
from tests.conftest import ROOT

# As Ray 2.60 prints it for each scoring actor of a scan (issue 27).
RAY_DATA_ACTOR = (
    "[2026-12-05 09:38:27,055 E 22846 22846] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(Scorer))' and ID: '21dedb9321799dc84d97776a01000000' has constructor arguments in the "
    "object store and max_restarts > 0. "
    "If the arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details."
)


def test_only_the_known_noise_is_noise():
    assert raylogs.is_noise(RAY_DATA_ACTOR)
    assert not raylogs.is_noise(RAY_DATA_ACTOR.replace("MapWorker(MapBatches(Scorer))", "MyActor"))  # not Ray Data's
    assert not raylogs.is_noise("[2026-12-05 09:38:27,055 E 1 1] core_worker.cc:123: Failed to connect to GCS")
    assert not raylogs.is_noise("diffguard: the scan failed: object store full (rerun to resume)")


def run_filtered(body: str, verbose: bool = False) -> subprocess.CompletedProcess:
    """A process that filters its stderr as the CLI does, then runs ``body``; its stderr as the terminal gets it."""
    code = (
        "import os, sys\n"
        "from pipeline import raylogs\n"
        f"raylogs.set_verbose({verbose})\n"
        "raylogs.filter_stderr()\n"
        f"NOISE = {RAY_DATA_ACTOR!r}\n" + body
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_filter_drops_the_noise_and_forwards_the_rest_in_order():
    body = (
        "os.write(2, b'first\\n' + NOISE.encode() + b'\\n')\n"  # as Ray's C++ logger writes: straight to fd 2
        "print('WARNING: a real warning', file=sys.stderr)\n"
        "os.write(2, NOISE.encode() + b'\\nERROR: a real error\\n')\n"
        "print('on stdout')\n"
    )
    result = run_filtered(body)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["first", "WARNING: a real warning", "ERROR: a real error"]
    assert result.stdout == "on stdout\n"


def test_verbose_leaves_stderr_alone():
    result = run_filtered("os.write(2, NOISE.encode() + b'\\n')\n", verbose=True)
    assert result.stderr.splitlines() == [RAY_DATA_ACTOR]


def test_a_crash_still_says_why():
    """The filter is a separate process: what the CLI wrote just before dying (a C++ FATAL, a Python traceback)
    reaches the terminal even when the CLI aborts and no exit handler runs."""
    result = run_filtered("os.write(2, NOISE.encode() + b'\\nF check failed: the last words\\n')\nos.abort()\n")
    assert result.returncode != 0
    assert result.stderr.splitlines() == ["F check failed: the last words"]


def test_the_token_auth_notice_is_quiet_by_default_and_back_with_verbose(caplog):
    """Ray's notice that a new local cluster has token authentication: dropped at the default verbosity, nothing else
    from that logger is (a missing token is a real problem)."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    try:
        raylogs.set_verbose(False)
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.warning(notice)
            logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
            logger.error("Authentication token is missing or incorrect")
        assert [r.getMessage()[:40] for r in caplog.records] == [
            "Token authentication is disabled for thi",
            "Authentication token is missing or incor",
        ]
        caplog.clear()
        raylogs.set_verbose(True)
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.warning(notice)
        assert [r.getMessage() for r in caplog.records] == [notice]
    finally:
        raylogs.set_verbose(True)
