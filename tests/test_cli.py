"""Tests for the ``sockpolicy`` command line (:mod:`sockpolicy._cli`).

The dispatcher is replaced by an in-memory fake (``fake_dispatcher``) so the wiring, the error boundary
and "validate before touching the kernel" are tested without BPF.  A few cases run the real
``.venv/bin/sockpolicy`` script and ``python -m sockpolicy`` in a subprocess.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
from _e2e import SCRIPT, in_ns, start_serve, stop
from click.testing import CliRunner, Result

from sockpolicy import _errors, _serve
from sockpolicy._cli import cli
from sockpolicy._dispatcher import Binding as FakeBinding  # a pure value class: no BPF involved
from sockpolicy._dispatcher import BindingConflict

VENV_BIN = Path(sys.executable).parent
NON_LOCAL = "198.51.100.0/24"  # TEST-NET-2: documentation only, never routed locally


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit 2, exactly one stderr line starting 'sockpolicy: error:', no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sockpolicy: error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# --- a fake dispatcher -------------------------------------------------------------------------------


class FakeDispatcher:
    loaded: ClassVar[bool] = False
    table: ClassVar[list[FakeBinding]] = []
    socks: ClassVar[dict[str, Any]] = {}
    calls: ClassVar[list[str]] = []
    fail_on_add: ClassVar[int | None] = None  # raise on the n-th add_binding (0-based)

    @classmethod
    def reset(cls) -> None:
        cls.loaded, cls.table, cls.socks, cls.calls, cls.fail_on_add = False, [], {}, [], None

    @classmethod
    def open(cls, create: bool = True) -> FakeDispatcher:
        cls.calls.append(f"open(create={create})")
        if not cls.loaded:
            if not create:
                raise _errors.NotLoaded("sockpolicy is not loaded in this network namespace")
            cls.loaded = True
        return cls()

    def __enter__(self) -> FakeDispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_binding(self, b: FakeBinding) -> None:
        n = sum(c.startswith("add") for c in self.calls)
        self.calls.append(f"add {b.proto} {b.prefix}")
        if self.fail_on_add == n:
            raise _errors.NotSupported(
                errno.EINVAL,
                "link_create",
                {"prog": "dispatch"},
                feature="SK_LOOKUP programs",
                min_kernel="5.9",
            )
        if b in self.table:
            return  # like the real one: adding an identical binding is a no-op
        if any(o.key == b.key for o in self.table):
            raise BindingConflict(f"{b.proto} {b.prefix} {b.ports} is already bound to another label")
        self.table.append(b)

    def remove_binding(self, b: FakeBinding) -> None:
        self.calls.append(f"remove {b.proto} {b.prefix}")
        if b not in self.table:
            raise _errors.KeyNotFound(errno.ENOENT, "remove_binding", {"binding": str(b.prefix)})
        self.table.remove(b)

    def bindings(self) -> list[FakeBinding]:
        return list(self.table)

    def register_socket(self, label: str, sock: Any) -> None:
        self.calls.append(f"register {label}")
        self.socks[f"{label}/{sock.type.name}/{sock.family.name}"] = sock.fileno()

    def sockets(self) -> dict[str, list[dict[str, Any]]]:
        return (
            {"default": [{"proto": "tcp", "family": "ipv4", "cookie": 7, "v6only": None}]}
            if self.socks
            else {}
        )

    def counters(self) -> dict[str, dict[str, int]]:
        return {"default": {"lookups": 3, "misses": 1, "errors": 0}}

    def unload(self) -> None:
        self.calls.append("unload")
        type(self).loaded = False
        self.table.clear()


@pytest.fixture
def fake_dispatcher(monkeypatch: pytest.MonkeyPatch) -> type[FakeDispatcher]:
    FakeDispatcher.reset()
    import sockpolicy._dispatcher as real

    module = types.ModuleType("sockpolicy._dispatcher")
    module.__dict__.update(real.__dict__)  # Binding, BindingConflict, InvalidLabel, ...
    module.Dispatcher = FakeDispatcher  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sockpolicy._dispatcher", module)
    monkeypatch.setattr(_serve, "require_privileges", lambda: None)
    return FakeDispatcher


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make any attempt to reach the kernel (or start serving) fail the test; collect serve configs."""
    started: list[Any] = []

    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("the kernel was touched before validation finished")

    module = types.ModuleType("sockpolicy._dispatcher")
    module.Dispatcher = types.SimpleNamespace(open=forbidden)  # type: ignore[attr-defined]
    module.Binding = forbidden  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sockpolicy._dispatcher", module)
    monkeypatch.setattr(_serve, "serve_main", lambda config: started.append(config) or 0)
    monkeypatch.setattr(_serve, "require_privileges", lambda: None)
    return started


def write(tmp_path: Path, name: str, text: str, mode: int = 0o644) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


# --- help --------------------------------------------------------------------------------------------

COMMANDS = ["serve", "reload", "bindings", "status", "bind", "unbind", "unload", "policy", "enforce", "rules"]


def test_every_command_is_tested() -> None:
    assert sorted(cli.commands) == sorted(COMMANDS)


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: sockpolicy" in result.stdout
    assert result.stderr == ""


def test_serve_help_lists_every_option() -> None:
    out = run("serve", "--help").stdout
    for option in [
        "--ports",
        "--addr",
        "--proto",
        "--upstream",
        "--policy",
        "--workers",
        "--label",
        "--drain-timeout",
        "--log-level",
        "8000-8999",
    ]:
        assert option in out


def test_no_arguments_shows_help() -> None:
    result = run()
    assert result.exit_code == 2
    assert "Commands:" in result.output


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert "sockpolicy" in result.stdout


# --- serve: every bad input is one line, exit 2, before the kernel -----------------------------------


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--ports", "0"], ["invalid port range '0': port 0 is out of range"]),
        (["--ports", "70000"], ["invalid port range '70000'"]),
        (["--ports", "5-3"], ["invalid port range '5-3': start 5 is greater than end 3"]),
        (["--ports", "a-b"], ["invalid port range 'a-b'"]),
        (["--ports", ""], ["no ports given"]),
        (["--addr", "127.0.0.1/8"], ["host bits are set; did you mean 127.0.0.0/8?"]),
        (["--addr", "nonsense"], ["invalid prefix 'nonsense'"]),
        (
            ["--addr", NON_LOCAL],
            [f"prefix {NON_LOCAL} is not local", f"ip route add local {NON_LOCAL} dev lo"],
        ),
        (["--addr", "2001:db8::/64"], ["ip -6 route add local 2001:db8::/64 dev lo"]),
        (["--proto", "sctp"], ["Invalid value for '--proto'"]),
        (["--upstream", "::1:80"], ["--upstream: invalid endpoint '::1:80'", "brackets"]),
        (["--upstream", "127.0.0.2:0"], ["--upstream: invalid endpoint"]),
        (["--upstream", "127.0.0.2:http"], ["--upstream: invalid endpoint"]),
        (["--upstream", "[::1"], ["missing ']'"]),
        (["--upstream", "127.0.0.1"], ["would connect to itself"]),
        (["--upstream", "[::1]:8080"], ["would connect to itself"]),
        (["--workers", "0"], ["Invalid value for '--workers'"]),
        (["--workers", "x"], ["Invalid value for '--workers'"]),
        (["--drain-timeout", "-1"], ["Invalid value for '--drain-timeout'"]),
        (["--label", "bad label"], ["invalid label 'bad label'"]),
        (["--label", ""], ["invalid label ''"]),
        (["--log-level", "loud"], ["Invalid value for '--log-level'"]),
        (["--bogus"], ["No such option '--bogus'", "sockpolicy serve --help"]),
        (["extra"], ["Got unexpected extra argument"]),
    ],
)
def test_serve_bad_input(no_kernel: list[Any], args: list[str], fragments: list[str]) -> None:
    assert_user_error(run("serve", "--upstream", "127.0.0.2", *args), *fragments)
    assert no_kernel == []


def test_unknown_command() -> None:
    assert_user_error(run("bogus"), "No such command 'bogus'")


@pytest.mark.parametrize(
    "name,text,mode,fragments",
    [
        ("p.py", "def broken(:\n", 0o644, [":1: SyntaxError: "]),
        ("p.py", "import sockpolicy_no_such_module\n", 0o644, [":1: ModuleNotFoundError"]),
        ("p.py", "x = 1\n", 0o644, ["defines no 'policy'"]),
        ("p.toml", "[[rule]]\naction = 5\n", 0o644, ["rule #1: 'action' must be a string, not integer 5"]),
        ("p.toml", '[[rule]]\nports = 22\naction = "drop"\n', 0o644, ["'ports' must be a string"]),
        ("p.toml", "[[rule]\n", 0o644, [":1:", "invalid TOML"]),
        ("p.toml", '[[rule]]\naction = "redirect"\n', 0o644, ["needs 'to'"]),
        ("p.toml", "", 0o666, ["is writable by group/others (mode 0666); chmod go-w"]),
        ("p.py", "", 0o646, ["is writable by group/others (mode 0646)"]),
        ("p.yaml", "", 0o644, ["unsupported policy file type '.yaml'"]),
    ],
)
def test_serve_bad_policy(
    no_kernel: list[Any], tmp_path: Path, name: str, text: str, mode: int, fragments: list[str]
) -> None:
    path = write(tmp_path, name, text, mode)
    line = assert_user_error(run("serve", "--upstream", "127.0.0.2", "--policy", str(path)), *fragments)
    assert str(path) in line
    assert no_kernel == []


def test_serve_missing_policy(no_kernel: list[Any], tmp_path: Path) -> None:
    assert_user_error(run("serve", "--policy", str(tmp_path / "nope.toml")), "nope.toml: no such file")


def test_serve_builds_config(no_kernel: list[Any], tmp_path: Path) -> None:
    result = run(
        "serve",
        "--ports",
        "80, 443,8000-8999",
        "--addr",
        "127.0.0.0/8",
        "--addr",
        "::1",
        "--proto",
        "TCP",
        "--upstream",
        "[::1]:9000",
        "--workers",
        "3",
        "--label",
        "web",
        "--drain-timeout",
        "2.5",
        "--log-level",
        "debug",
    )
    assert result.exit_code == 0, result.output
    (config,) = no_kernel
    assert str(config.ports) == "80,443,8000-8999"
    assert config.addrs == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert config.protos == ("tcp",)
    assert config.upstream == ("::1", 9000)
    assert (config.workers, config.label, config.drain_timeout, config.log_level) == (3, "web", 2.5, "debug")


def test_serve_defaults(no_kernel: list[Any]) -> None:
    assert run("serve").exit_code == 0
    (config,) = no_kernel
    assert str(config.ports) == "8000-8999"
    assert [str(a) for a in config.addrs] == ["127.0.0.1/32", "::1/128"]
    assert config.protos == ("tcp", "udp")
    assert config.upstream is None
    assert config.label == "default"


def test_serve_upstream_host_means_original_port(no_kernel: list[Any]) -> None:
    assert run("serve", "--upstream", "127.0.0.2").exit_code == 0
    assert no_kernel[0].upstream == ("127.0.0.2", None)


def test_serve_toml_policy_loaded(no_kernel: list[Any], tmp_path: Path) -> None:
    if not hasattr(pytest.importorskip("sockpolicy.proxy"), "Policy"):
        pytest.skip("sockpolicy.proxy.Policy not available yet")
    path = write(tmp_path, "p.toml", '[[rule]]\nports = "22"\naction = "drop"\n')
    assert run("serve", "--policy", str(path)).exit_code == 0
    assert no_kernel[0].policy is not None


def test_not_root(monkeypatch: pytest.MonkeyPatch, no_kernel: list[Any]) -> None:
    monkeypatch.setattr(_errors, "missing_capabilities", lambda *a: ["CAP_BPF", "CAP_NET_ADMIN"])
    monkeypatch.setattr(_serve, "require_privileges", _REAL_REQUIRE_PRIVILEGES)
    assert_user_error(run("serve"), "permission denied: needs CAP_BPF and CAP_NET_ADMIN (run as root)")
    assert no_kernel == []


_REAL_REQUIRE_PRIVILEGES = _serve.require_privileges


# --- bind / unbind / bindings / status / unload ------------------------------------------------------


def test_bind_unbind_roundtrip(fake_dispatcher: type[FakeDispatcher]) -> None:
    result = run("bind", "--proto", "tcp", "--addr", "127.0.0.0/8", "--ports", "1-65535", "--label", "L")
    assert result.exit_code == 0, result.output
    assert result.stdout == "bound tcp 127.0.0.0/8 ports 1-65535 label L\n"
    listing = run("bindings")
    assert listing.stdout == "tcp 127.0.0.0/8 ports 1-65535 label L\n"
    data = json.loads(run("bindings", "--json").stdout)
    assert data == [{"proto": "tcp", "prefix": "127.0.0.0/8", "ports": "1-65535", "label": "L"}]
    result = run("unbind", "--proto", "tcp", "--addr", "127.0.0.0/8", "--ports", "1-65535", "--label", "L")
    assert result.exit_code == 0, result.output
    assert run("bindings").stdout == ""


def test_bind_both_protocols_and_two_prefixes(fake_dispatcher: type[FakeDispatcher]) -> None:
    result = run("bind", "--addr", "127.0.0.0/8", "--addr", "::1", "--ports", "80,443")
    assert result.exit_code == 0, result.output
    assert [(b.proto, str(b.prefix), str(b.ports), b.label) for b in fake_dispatcher.table] == [
        (proto, prefix, ports, "default")
        for proto in ("tcp", "udp")
        for prefix in ("127.0.0.0/8", "::1/128")
        for ports in ("80", "443")
    ]


def test_bind_is_all_or_nothing(fake_dispatcher: type[FakeDispatcher]) -> None:
    fake_dispatcher.fail_on_add = 2
    result = run("bind", "--addr", "127.0.0.0/8", "--addr", "::1", "--ports", "80")
    assert_user_error(result, "SK_LOOKUP programs not supported", "needs Linux >= 5.9")
    assert fake_dispatcher.table == []


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--ports", "0", "--addr", "127.0.0.1"], "invalid port range '0'"),
        (["--ports", "80", "--addr", NON_LOCAL], "ip route add local"),
        (["--ports", "80", "--addr", "127.0.0.1", "--label", "a b"], "invalid label"),
        (["--ports", "80"], "Missing option '--addr'"),
        (["--addr", "127.0.0.1"], "Missing option '--ports'"),
    ],
)
def test_bind_bad_input_touches_nothing(
    fake_dispatcher: type[FakeDispatcher], args: list[str], fragment: str
) -> None:
    assert_user_error(run("bind", *args), fragment)
    assert fake_dispatcher.calls == []


def test_bind_twice_is_idempotent_and_conflicts_are_user_errors(
    fake_dispatcher: type[FakeDispatcher],
) -> None:
    args = ["bind", "--proto", "tcp", "--addr", "127.0.0.1", "--ports", "80"]
    assert run(*args).exit_code == 0
    assert run(*args).exit_code == 0
    assert len(fake_dispatcher.table) == 1
    assert_user_error(run(*args, "--label", "other"), "already bound to another label")
    assert len(fake_dispatcher.table) == 1


def test_failed_bind_keeps_preexisting_bindings(fake_dispatcher: type[FakeDispatcher]) -> None:
    assert run("bind", "--proto", "tcp", "--addr", "127.0.0.1", "--ports", "80").exit_code == 0
    fake_dispatcher.fail_on_add = 1  # the first add is the tcp one above; the next new one fails
    result = run("bind", "--proto", "tcp", "--addr", "127.0.0.1", "--ports", "80,81")
    assert_user_error(result, "not supported")
    assert [str(b) for b in fake_dispatcher.table] == ["tcp 127.0.0.1/32 80 -> default"]


def test_unbind_skips_locality_check(fake_dispatcher: type[FakeDispatcher]) -> None:
    fake_dispatcher.loaded = True
    fake_dispatcher.table.append(
        FakeBinding("tcp", ipaddress.ip_network(NON_LOCAL), _parse("80")[0], "default")
    )
    result = run("unbind", "--proto", "tcp", "--addr", NON_LOCAL, "--ports", "80")
    assert result.exit_code == 0, result.output
    assert fake_dispatcher.table == []


def _parse(text: str) -> Any:
    from sockpolicy._ranges import parse_ports

    return parse_ports(text)


def test_unbind_when_not_loaded(fake_dispatcher: type[FakeDispatcher]) -> None:
    assert_user_error(
        run("unbind", "--addr", "127.0.0.1", "--ports", "80"), "not loaded in this network namespace"
    )


def test_unbind_unknown_binding(fake_dispatcher: type[FakeDispatcher]) -> None:
    fake_dispatcher.loaded = True
    assert_user_error(run("unbind", "--proto", "tcp", "--addr", "127.0.0.1", "--ports", "80"), "ENOENT")


def test_nouns_when_not_loaded(fake_dispatcher: type[FakeDispatcher]) -> None:
    result = run("bindings")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    assert json.loads(run("bindings", "--json").stdout) == []
    result = run("status")
    assert (result.exit_code, result.stdout) == (0, "dispatcher: not loaded\n")
    assert json.loads(run("status", "--json").stdout)["loaded"] is False
    assert fake_dispatcher.loaded is False  # reading never loads


def test_status(fake_dispatcher: type[FakeDispatcher]) -> None:
    assert run("bind", "--proto", "udp", "--addr", "127.0.0.1", "--ports", "53").exit_code == 0
    result = run("status")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[:3] == [
        "dispatcher: loaded",
        "bindings: 1",
        "  udp 127.0.0.1/32 ports 53 label default",
    ]
    assert "  default: lookups=3 misses=1 errors=0" in result.stdout
    doc = json.loads(run("status", "--json").stdout)
    assert doc["counters"] == {"default": {"lookups": 3, "misses": 1, "errors": 0}}


def test_unload(fake_dispatcher: type[FakeDispatcher]) -> None:
    result = run("unload")
    assert (result.exit_code, result.stderr) == (0, "sockpolicy: nothing loaded\n")
    fake_dispatcher.loaded = True
    result = run("unload")
    assert (result.exit_code, result.stdout) == (0, "unloaded\n")
    assert fake_dispatcher.loaded is False


# --- the error boundary ------------------------------------------------------------------------------


def test_multiline_kernel_error_is_one_line(
    fake_dispatcher: type[FakeDispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: object, b: object) -> None:
        raise _errors.VerifierError(
            "load(prog='dispatch'): verifier rejected the program", log="0: r1 = 1\n1: exit\n"
        )

    monkeypatch.setattr(FakeDispatcher, "add_binding", boom)
    assert_user_error(run("bind", "--addr", "127.0.0.1", "--ports", "80"), "verifier rejected the program")


def test_bug_keeps_its_traceback(
    fake_dispatcher: type[FakeDispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(FakeDispatcher, "bindings", boom)
    fake_dispatcher.loaded = True
    result = run("bindings")
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def test_plain_value_error_is_a_bug(
    fake_dispatcher: type[FakeDispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: object) -> None:
        raise ValueError("not a user error")

    monkeypatch.setattr(FakeDispatcher, "bindings", boom)
    fake_dispatcher.loaded = True
    assert isinstance(run("bindings").exception, ValueError)


# --- policy ------------------------------------------------------------------------------------------


def test_policy_prints_rules(tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", '[[rule]]\nname = "ssh"\nproto = "tcp"\nports = "22"\naction = "drop"\n')
    result = run("policy", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "rule #1 (ssh): tcp ports 22 -> drop",
        f"{path}: 1 rule(s), unmatched connections pass",
    ]


def test_policy_bad(tmp_path: Path) -> None:
    path = write(tmp_path, "p.toml", "[[rule]]\nproto = 1\n")
    assert_user_error(run("policy", str(path)), "'proto' must be a string")


# --- real subprocesses -------------------------------------------------------------------------------


def _subprocess(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("SOCKPOLICY_DEBUG", None)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["serve", "--ports", "0"], "invalid port range '0'"),
        (["serve", "--ports", "5-3"], "start 5 is greater than end 3"),
        (["serve", "--addr", NON_LOCAL], f"ip route add local {NON_LOCAL} dev lo"),
        (["serve", "--upstream", "::1:80"], "--upstream: invalid endpoint"),
        (["bind", "--addr", "127.0.0.1", "--ports", "a-b"], "invalid port range 'a-b'"),
    ],
)
def test_script_user_errors(args: list[str], fragment: str) -> None:
    script = VENV_BIN / "sockpolicy"
    if not script.exists():
        pytest.skip("sockpolicy console script not installed")
    proc = _subprocess([str(script), *args])
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sockpolicy: error: "), proc.stderr
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_script_bad_policy_files(tmp_path: Path) -> None:
    for name, text, mode in [
        ("syntax.py", "def f(:\n", 0o644),
        ("types.toml", "[[rule]]\naction = 5\n", 0o644),
        ("open.toml", "", 0o666),
    ]:
        path = write(tmp_path, name, text, mode)
        proc = _subprocess([sys.executable, "-m", "sockpolicy", "serve", "--policy", str(path)])
        assert proc.returncode == 2, proc
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"sockpolicy: error: {path}"), proc.stderr


def test_python_dash_m_help() -> None:
    proc = _subprocess([sys.executable, "-m", "sockpolicy", "--help"])
    assert proc.returncode == 0
    assert "Usage: sockpolicy" in proc.stdout


# --- privileged end to end: real dispatcher, real proxy, in a throwaway network namespace -----------


def _echo(ns: Any, proto: str, host: str, port: int, payload: bytes = b"hello") -> bytes:
    """Send ``payload`` from inside ``ns`` and return the reply (b"" if the connection was dropped)."""
    import socket as socketlib

    def go() -> bytes:
        family = socketlib.AF_INET6 if ":" in host else socketlib.AF_INET
        kind = socketlib.SOCK_STREAM if proto == "tcp" else socketlib.SOCK_DGRAM
        with socketlib.socket(family, kind) as s:
            s.settimeout(2)
            if proto == "tcp":
                s.connect((host, port))
                s.sendall(payload)
                try:
                    return s.recv(100)
                except ConnectionResetError:
                    return b""
            s.sendto(payload, (host, port))
            return s.recvfrom(100)[0]

    return ns.call(go)


def _wait_echo(ns: Any, proto: str, host: str, port: int, proc: subprocess.Popen[str]) -> bytes:
    import time

    deadline = time.monotonic() + 20
    while True:
        try:
            return _echo(ns, proto, host, port)
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}: {proc.stderr.read()}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _sp(ns: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return _subprocess([*in_ns(ns), SCRIPT, *args])


@pytest.mark.privileged
def test_e2e_serve_steers_applies_toml_policy_and_cleans_up(netns: Any, tmp_path: Path) -> None:
    policy = write(
        tmp_path, "p.toml", '[[rule]]\nname = "no-8022"\nproto = "tcp"\nports = "8022"\naction = "drop"\n'
    )
    proc = start_serve(
        netns, "--ports", "8000-8999", "--addr", "127.0.0.0/8", "--addr", "::1", "--policy", str(policy)
    )
    try:
        assert _wait_echo(netns, "tcp", "127.0.0.5", 8123, proc) == b"hello"
        assert _echo(netns, "tcp", "::1", 8999) == b"hello"
        assert _echo(netns, "udp", "127.0.0.1", 8000) == b"hello"
        assert _echo(netns, "tcp", "127.0.0.1", 8022) == b""  # dropped by the TOML rule
        listing = _sp(netns, "bindings").stdout.splitlines()
        assert "tcp 127.0.0.0/8 ports 8000-8999 label default" in listing
        assert len(listing) == 4
        status = json.loads(_sp(netns, "status", "--json").stdout)
        assert {(s["proto"], s["family"]) for s in status["sockets"]["default"]} == {
            ("tcp", "ipv4"),
            ("tcp", "ipv6"),
            ("udp", "ipv4"),
            ("udp", "ipv6"),
        }
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "Traceback" not in err
    # serve loaded the dispatcher, so it unloaded it again: nothing attached or pinned is left.
    assert _sp(netns, "status").stdout == "dispatcher: not loaded\n"


@pytest.mark.privileged
def test_e2e_failed_serve_leaves_the_running_one_alone(netns: Any) -> None:
    proc = start_serve(netns, "--ports", "9000-9099", "--addr", "127.0.0.1", "--proto", "tcp")
    try:
        assert _wait_echo(netns, "tcp", "127.0.0.1", 9050, proc) == b"hello"
        before = _sp(netns, "bindings").stdout
        second = _sp(netns, "serve", "--ports", "9000-9099", "--addr", "127.0.0.1")
        assert second.returncode == 2
        assert second.stderr.startswith("sockpolicy: error: label 'default' is already being served")
        assert len(second.stderr.splitlines()) == 1
        assert _sp(netns, "bindings").stdout == before
        assert _echo(netns, "tcp", "127.0.0.1", 9050) == b"hello"
        # A non-local prefix fails before anything changes.
        third = _sp(netns, "bind", "--addr", NON_LOCAL, "--ports", "80")
        assert third.returncode == 2 and "ip route add local" in third.stderr
        assert _sp(netns, "bindings").stdout == before
    finally:
        code, err = stop(proc)
    assert code == 0, err


@pytest.mark.privileged
def test_e2e_workers_and_local_route(netns: Any) -> None:
    netns.ip("route", "add", "local", NON_LOCAL, "dev", "lo")
    proc = start_serve(netns, "--workers", "3", "--addr", NON_LOCAL, "--ports", "7000", "--proto", "tcp")
    try:
        assert _wait_echo(netns, "tcp", "198.51.100.77", 7000, proc) == b"hello"
        for _ in range(20):
            assert _echo(netns, "tcp", "198.51.100.9", 7000) == b"hello"
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert _sp(netns, "status").stdout == "dispatcher: not loaded\n"


@pytest.mark.privileged
def test_e2e_bind_unbind_unload(netns: Any) -> None:
    args = ["--proto", "udp", "--addr", "127.0.0.0/8", "--ports", "53,5353"]
    assert _sp(netns, "bind", *args).returncode == 0
    assert _sp(netns, "bindings").stdout.splitlines() == [
        "udp 127.0.0.0/8 ports 53 label default",
        "udp 127.0.0.0/8 ports 5353 label default",
    ]
    assert _sp(netns, "unbind", *args).returncode == 0
    assert _sp(netns, "bindings").stdout == ""
    assert _sp(netns, "unload").stdout == "unloaded\n"
    assert _sp(netns, "status").stdout == "dispatcher: not loaded\n"
