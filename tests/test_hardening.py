"""Hardening: root-only pinned and runtime state, policy file permissions, ``--user`` privilege drop."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_ops import echo, log_of, sp, start, stop, wait_serving

from sockpolicy._privileges import capabilities

pytestmark = pytest.mark.privileged

ARGS = ("--proto", "tcp", "--addr", "127.0.0.1", "--ports", "8000-8099", "--handoff-timeout", "0")
NOBODY = 65534


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/python3", "-c", code], user=NOBODY, group=NOBODY, extra_groups=[],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_pinned_and_runtime_state_is_root_only(netns: Any, tmp_path: Path) -> None:
    proc = start(netns, tmp_path, *ARGS)
    try:
        wait_serving(netns, proc)
        inode = os.stat(netns.path).st_ino
        state = Path(f"/sys/fs/bpf/sockpolicy/{inode}")
        run = Path(f"/run/sockpolicy/{inode}")
        for directory in (state, run):
            st = directory.stat()
            assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0, directory
        for pin in state.iterdir():
            st = pin.stat()
            assert stat.S_IMODE(st.st_mode) & 0o077 == 0 and st.st_uid == 0, pin
        sock = run / "handoff-default.sock"
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        # An unprivileged user can neither read the tables nor reach the handoff socket.
        for path in (state / "bindings", sock):
            denied = _as_nobody(f"import os; os.stat({str(path)!r})")
            assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied
    finally:
        assert stop(proc) == 0, log_of(proc)


def test_group_writable_policy_is_refused_by_the_cli(netns: Any, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[[rule]]\nports = "8022"\naction = "drop"\n')
    policy.chmod(0o664)
    result = sp(netns, "serve", *ARGS, "--policy", str(policy))
    assert result.returncode == 2
    assert (
        result.stderr
        == f"sockpolicy: error: {policy} is writable by group/others (mode 0664); chmod go-w {policy}\n"
    )
    assert sp(netns, "status").stdout == "dispatcher: not loaded\n"


def test_user_drops_every_capability_and_still_serves(netns: Any, tmp_path: Path) -> None:
    proc = start(netns, tmp_path, *ARGS, "--user", "nobody", "--metrics", "127.0.0.1:9464")
    try:
        wait_serving(netns, proc)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == [str(NOBODY)] * 4
        groups = next(line for line in status.splitlines() if line.startswith("Groups:")).split()[1:]
        assert groups == []
        caps = capabilities(proc.pid)
        assert caps["CapEff"] == 0 and caps["CapPrm"] == 0, caps
        assert "NoNewPrivs:\t1" in status
        for port in (8001, 8050, 8099):
            assert echo(netns, "127.0.0.1", port) == b"hello"
    finally:
        code = stop(proc)
    assert code == 0, log_of(proc)
    # Without privileges it cannot change the pinned state any more; it leaves its bindings, and with no
    # socket behind the label the kernel refuses their connections instead of misrouting them.
    assert "leaving the bindings in place" in log_of(proc)
    assert sp(netns, "bindings").stdout == "tcp 127.0.0.1/32 ports 8000-8099 label default\n"
    with pytest.raises(ConnectionRefusedError):
        echo(netns, "127.0.0.1", 8050)
    # The next serve of the label takes them over (state file) and, running as root, cleans up.
    again = start(netns, tmp_path, *ARGS, name="again")
    try:
        wait_serving(netns, again)
    finally:
        assert stop(again) == 0, log_of(again)
    assert sp(netns, "status").stdout == "dispatcher: not loaded\n"


def test_unknown_user_is_a_user_error(netns: Any) -> None:
    result = sp(netns, "serve", *ARGS, "--user", "no-such-user-xyz")
    assert result.returncode == 2
    assert result.stderr == "sockpolicy: error: invalid --user 'no-such-user-xyz': no such user\n"
