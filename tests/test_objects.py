"""The object model (ObjectSpec/Object/Program/Map/Link) and its typed errors against the real kernel:
ownership and fd hygiene, load-time overrides, verifier failures, wrong attach targets, cgroup sock_ops,
link pinning, missing capabilities, unsupported test runs."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockpolicy import (
    AttachType,
    Busy,
    ClosedError,
    InvalidArgument,
    KeyNotFound,
    Link,
    LoadError,
    Map,
    MapType,
    NotSupported,
    ObjectSpec,
    PermissionDenied,
    Program,
    VerifierError,
    _libbpf,
)
from sockpolicy.maps import U32, U64, Array, Hash

pytestmark = pytest.mark.privileged

REPO = Path(__file__).resolve().parent.parent
CGROUP2 = Path("/sys/fs/cgroup/unified")


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------------------
# ownership


def test_close_is_idempotent_and_objects_are_context_managers() -> None:
    obj = ObjectSpec.from_package("test_basic").load()
    program, counters = obj.programs["count_packets"], obj.maps["counters"]
    obj.close()
    obj.close()
    assert program.closed and counters.closed
    with ObjectSpec.from_package("test_basic").load() as obj2:
        inner = obj2.maps["counters"]
    assert inner.closed
    with Map.create(MapType.HASH, 4, 4, 2, name="m") as m:
        pass
    m.close()
    assert m.closed


def test_use_after_close_raises_closederror() -> None:
    with ObjectSpec.from_package("test_basic").load() as obj:
        program, counters = obj.programs["count_packets"], obj.maps["counters"]
    with pytest.raises(ClosedError):
        counters.lookup(U32.encode(0))
    with pytest.raises(ClosedError):
        program.test_run(bytes(64))
    with pytest.raises(ClosedError):
        program.run_stats()
    with pytest.raises(ClosedError):
        counters.clone()


def test_object_close_leaves_taken_maps_and_programs_usable() -> None:
    with ObjectSpec.from_package("test_basic").load() as obj:
        counters = Hash(obj.take_map("counters"), key=U32, value=U64)
        program = obj.take_program("count_packets")
        assert "counters" not in obj.maps
    with counters, program:
        # skb->len of a 64-byte test packet is 50: the kernel strips the 14-byte Ethernet header.
        assert program.test_run(bytes(64), repeat=3).retval == 50
        assert counters[0] == 3  # the program (kept alive by our fd) counted into the map we kept


def test_load_close_cycles_leak_no_fds() -> None:
    spec = ObjectSpec.from_package("test_basic")
    with spec.load():  # warm up: libbpf and cffi allocate lazily on first use
        pass
    before = _open_fd_count()
    for _ in range(50):
        obj = spec.load()
        Hash(obj.take_map("counters"), key=U32, value=U64).close()
        obj.close()
    assert _open_fd_count() == before


def test_max_entries_override_is_applied_before_load() -> None:
    spec = ObjectSpec.from_package("test_basic")
    spec.max_entries["counters"] = 64
    with spec.load() as obj:
        assert obj.maps["counters"].max_entries == 64
        counters = Hash(obj.maps["counters"].clone(), key=U32, value=U64)
        with counters:
            for key in range(64):  # the default (16) would overflow at 16
                counters[key] = key
            assert len(counters) == 64


def test_unknown_override_name_raises_keyerror() -> None:
    spec = ObjectSpec.from_package("test_basic")
    spec.max_entries["nope"] = 4
    with pytest.raises(KeyError, match="has no map named 'nope'"):
        spec.load()
    spec = ObjectSpec.from_package("test_basic")
    spec.autoload["missing_prog"] = False
    with pytest.raises(KeyError, match="has no program named 'missing_prog'"):
        spec.load()


def test_pin_paths_reuse_an_existing_pinned_map(pin_dir: Path) -> None:
    pin = str(pin_dir / "counters")
    first_spec = ObjectSpec.from_package("test_basic")
    first_spec.pin_paths["counters"] = pin
    with first_spec.load() as first:
        first_id = first.maps["counters"].id
        first.maps["counters"].update(U32.encode(9), U64.encode(99))
    assert os.path.exists(pin)  # the pin keeps the map alive after every fd is closed
    second_spec = ObjectSpec.from_package("test_basic")
    second_spec.pin_paths["counters"] = pin
    with second_spec.load() as second:
        assert second.maps["counters"].id == first_id
        assert U64.decode(second.maps["counters"].lookup(U32.encode(9))) == 99


# ---------------------------------------------------------------------------------------------------------
# load errors


def test_verifier_rejection_carries_the_log() -> None:
    with pytest.raises(VerifierError) as info:
        ObjectSpec.from_package("test_bad_verifier").load()
    err = info.value
    assert isinstance(err, LoadError)
    assert err.message.endswith("failed: rejected by the verifier")
    assert "R0 invalid mem access 'map_value_or_null'" in err.log
    assert "deref_without_null_check" in err.log
    assert str(err).startswith(err.message)


def test_missing_object_file_is_loaderror(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="does not exist"):
        ObjectSpec.from_file(tmp_path / "absent.bpf.o").load()


def test_test_run_on_sk_msg_is_notsupported() -> None:
    with ObjectSpec.from_package("test_basic").load() as obj, pytest.raises(NotSupported) as info:
        obj.programs["msg_pass"].test_run(b"x" * 32)
    assert info.value.feature == "BPF_PROG_TEST_RUN for SK_MSG programs"
    assert info.value.feature in str(info.value)
    assert info.value.errno == 524  # the kernel's ENOTSUPP


_UNPRIVILEGED_CHILD = textwrap.dedent(
    """
    from sockpolicy import PermissionDenied
    from sockpolicy.maps import Hash, U32
    try:
        Hash.create(key=U32, value=U32, max_entries=4, name="denied")
    except PermissionDenied as exc:
        print(repr(str(exc)))
    else:
        print("created")
    """
)


def test_missing_capabilities_give_permissiondenied_naming_them() -> None:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to drop capabilities"
    drop = "-bpf,-sys_admin,-net_admin"
    child = subprocess.run(
        [
            setpriv,
            f"--bounding-set={drop}",
            f"--inh-caps={drop}",
            "--",
            sys.executable,
            "-c",
            _UNPRIVILEGED_CHILD,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert child.returncode == 0, child.stderr
    message = eval(child.stdout.strip())  # the repr printed by the child
    assert message.startswith("map_create(map='denied', type='hash'): operation not permitted (EPERM)")
    assert "missing capability CAP_BPF and CAP_NET_ADMIN" in message
    assert "\n" not in message
    assert issubclass(PermissionDenied, PermissionError)


# ---------------------------------------------------------------------------------------------------------
# attach targets


def test_wrong_attach_targets_raise_invalidargument(netns) -> None:
    with (
        ObjectSpec.from_package("test_basic").load() as basic,
        ObjectSpec.from_package("test_maps").load() as extra,
        Map.create(MapType.SOCKMAP, 4, 8, 4, name="sm") as sockmap,
        Map.create(MapType.HASH, 4, 8, 4, name="h") as hash_map,
    ):
        with pytest.raises(InvalidArgument, match="SK_MSG program cannot attach to a network namespace"):
            basic.programs["msg_pass"].attach_netns(netns.fd())
        with pytest.raises(InvalidArgument, match="SK_LOOKUP program cannot attach"):
            extra.programs["lookup_pass"].attach_map(sockmap, AttachType.SK_MSG_VERDICT)
        with pytest.raises(InvalidArgument, match="needs a SOCKMAP or SOCKHASH, not HASH"):
            basic.programs["skb_pass"].attach_map(hash_map, AttachType.SK_SKB_STREAM_VERDICT)
        # Without our pre-check the kernel says EOPNOTSUPP for the same mistake; typed the same way.
        with pytest.raises(InvalidArgument) as raw:
            _libbpf.prog_attach(
                basic.programs["skb_pass"].fd, hash_map.fd, int(AttachType.SK_SKB_STREAM_VERDICT), {}
            )
        assert raw.value.errno == errno.EOPNOTSUPP
        assert "does not take sk_skb_stream_verdict programs" in str(raw.value)
        with pytest.raises(InvalidArgument, match="SK_LOOKUP does not attach to a map"):
            extra.programs["lookup_pass"].attach_map(sockmap, AttachType.SK_LOOKUP)


def test_stream_verdict_and_skb_verdict_on_one_map_is_busy() -> None:
    with (
        ObjectSpec.from_package("test_basic").load() as obj,
        Map.create(MapType.SOCKMAP, 4, 8, 4, name="sm") as sockmap,
    ):
        program = obj.programs["skb_pass"]
        with program.attach_map(sockmap, AttachType.SK_SKB_STREAM_VERDICT) as attachment:
            with pytest.raises(Busy) as info:
                program.attach_map(sockmap, AttachType.SK_SKB_VERDICT)
            assert info.value.errno == errno.EBUSY
            attachment.detach()
            # With the stream verdict gone the other kind fits, and vice versa.
            with program.attach_map(sockmap, AttachType.SK_SKB_VERDICT) as second:
                with pytest.raises(Busy):
                    program.attach_map(sockmap, AttachType.SK_SKB_STREAM_VERDICT)
                second.detach()
                with pytest.raises(KeyNotFound):
                    second.detach()  # nothing attached any more: the kernel says ENOENT


# ---------------------------------------------------------------------------------------------------------
# sock_ops on a cgroup v2


_CGROUP_CHILD = textwrap.dedent(
    """
    import os, socket, sys
    with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        client.sendall(b"x")
        assert server.recv(1) == b"x"
        client.close()
        server.close()
    """
)


@pytest.fixture
def cgroup() -> Iterator[Path]:
    path = CGROUP2 / f"sp-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(50):  # the exited child may take a moment to leave the cgroup
            try:
                path.rmdir()
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)


def test_sock_ops_counts_established_connections_in_a_cgroup(cgroup: Path) -> None:
    def connect_inside() -> None:
        argv = [sys.executable, "-c", _CGROUP_CHILD, str(cgroup)]
        child = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert child.returncode == 0, child.stderr

    with (
        ObjectSpec.from_package("test_maps").load() as obj,
        Array(obj.take_map("established"), value=U64) as established,
    ):
        with obj.programs["count_established"].attach_cgroup(cgroup) as link:
            assert link.info.prog_id == obj.programs["count_established"].id
            connect_inside()
            connect_inside()
            # Two connections, both ends in the cgroup: two active and two passive callbacks, nothing else.
            assert [established[0], established[1]] == [2, 2]
        connect_inside()  # the link is closed: no longer counted
        assert [established[0], established[1]] == [2, 2]


def test_sock_ops_needs_a_sock_ops_program(cgroup: Path) -> None:
    with (
        ObjectSpec.from_package("test_basic").load() as obj,
        pytest.raises(InvalidArgument, match="cannot attach to a cgroup"),
    ):
        obj.programs["msg_pass"].attach_cgroup(cgroup)


# ---------------------------------------------------------------------------------------------------------
# link pinning


def test_link_pin_reopen_unpin(netns, pin_dir: Path) -> None:
    path = pin_dir / "lookup_link"
    with ObjectSpec.from_package("test_maps").load() as obj:
        program: Program = obj.programs["lookup_pass"]
        attached = lambda: _libbpf.prog_query(netns.fd(), int(AttachType.SK_LOOKUP), {})  # noqa: E731
        with program.attach_netns(netns.fd()) as link:
            link.pin(path)
        # Our fd is closed, the pin keeps the program attached.
        assert attached() == [program.id]
        with Link.from_pin(path) as reopened:
            assert reopened.info.prog_id == program.id
            assert reopened.pin_path == str(path)
            reopened.unpin()
            reopened.unpin()  # idempotent
            assert not path.exists()
            assert attached() == [program.id]  # our reopened fd still holds it
        assert attached() == []  # no pin, no fd: detached
        with pytest.raises(KeyNotFound):
            Link.from_pin(path)
