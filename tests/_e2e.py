"""Helpers for end-to-end tests that run the real ``sockpolicy`` command inside a test namespace.

``nsenter --net=`` is used rather than ``ip netns exec``: the latter also creates a mount namespace with
a fresh ``/sys`` where bpffs is not mounted, so the pinned dispatcher would be invisible.  ``nsenter``
execs the command, so a ``Popen``'s pid is sockpolicy itself and signals reach it directly.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

SCRIPT = str(Path(sys.executable).parent / "sockpolicy")


def in_ns(ns: Any) -> list[str]:
    """The argv prefix that runs a command inside ``ns``'s network namespace only."""
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        pytest.fail("nsenter (util-linux) is not installed", pytrace=False)
    return [nsenter, f"--net={ns.path}"]


def sockpolicy(ns: Any, *args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``sockpolicy ARGS`` inside ``ns`` and return the finished process (not checked)."""
    return subprocess.run(
        [*in_ns(ns), SCRIPT, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def start_serve(ns: Any, *args: str) -> subprocess.Popen[str]:
    """Start ``sockpolicy serve ARGS`` inside ``ns``; stop it with :func:`stop`."""
    return subprocess.Popen(
        [*in_ns(ns), SCRIPT, "serve", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Signal ``proc`` and wait for it; returns (exit code, stderr)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def wait_until_serving(proc: subprocess.Popen[str], probe: Callable[[], T], timeout: float = 20) -> T:
    """Call ``probe`` until it stops raising ``OSError``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return probe()
        except OSError:
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"serve exited with {proc.returncode}: {err}", pytrace=False)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
