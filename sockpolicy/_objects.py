"""Live kernel objects: :class:`Map`, :class:`Program`, :class:`Link`, :class:`Object`, and their description.

An :class:`ObjectSpec` describes a compiled BPF object (a path plus the overrides to apply before load);
it owns nothing.  :meth:`ObjectSpec.load` produces an :class:`Object`, whose maps and programs are
independent :class:`Map` and :class:`Program` objects, each with its own duplicated file descriptor: closing
the :class:`Object` does not invalidate a :class:`Map` taken from it, and vice versa.

Every fd-owning class has an idempotent ``close()`` and is a context manager.  An object that is
garbage-collected unclosed closes its fd then.
"""

from __future__ import annotations

import contextlib
import enum
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Self

from sockpolicy import _errors, _libbpf
from sockpolicy._errors import ClosedError

PathLike = str | os.PathLike[str]


class MapType(enum.IntEnum):
    HASH = _libbpf.MAP_TYPES["hash"]
    ARRAY = _libbpf.MAP_TYPES["array"]
    PERCPU_HASH = _libbpf.MAP_TYPES["percpu_hash"]
    PERCPU_ARRAY = _libbpf.MAP_TYPES["percpu_array"]
    LPM_TRIE = _libbpf.MAP_TYPES["lpm_trie"]
    SOCKMAP = _libbpf.MAP_TYPES["sockmap"]
    SOCKHASH = _libbpf.MAP_TYPES["sockhash"]


class ProgramType(enum.IntEnum):
    SOCKET_FILTER = _libbpf.PROG_TYPES["socket_filter"]
    SCHED_CLS = _libbpf.PROG_TYPES["sched_cls"]
    XDP = _libbpf.PROG_TYPES["xdp"]
    SOCK_OPS = _libbpf.PROG_TYPES["sock_ops"]
    SK_SKB = _libbpf.PROG_TYPES["sk_skb"]
    SK_MSG = _libbpf.PROG_TYPES["sk_msg"]
    SK_LOOKUP = _libbpf.PROG_TYPES["sk_lookup"]


class AttachType(enum.IntEnum):
    CGROUP_SOCK_OPS = _libbpf.ATTACH_TYPES["cgroup_sock_ops"]
    SK_SKB_STREAM_PARSER = _libbpf.ATTACH_TYPES["sk_skb_stream_parser"]
    SK_SKB_STREAM_VERDICT = _libbpf.ATTACH_TYPES["sk_skb_stream_verdict"]
    SK_SKB_VERDICT = _libbpf.ATTACH_TYPES["sk_skb_verdict"]
    SK_MSG_VERDICT = _libbpf.ATTACH_TYPES["sk_msg_verdict"]
    SK_LOOKUP = _libbpf.ATTACH_TYPES["sk_lookup"]


class UpdateFlags(enum.IntEnum):
    """How :meth:`Map.update` treats an existing key."""

    ANY = _libbpf.ANY  #: create or replace
    NOEXIST = _libbpf.NOEXIST  #: create only; :class:`~sockpolicy.KeyExists` if present
    EXIST = _libbpf.EXIST  #: replace only; :class:`~sockpolicy.KeyNotFound` if absent


# Which program types attach to which targets, so a wrong target is a typed error before any syscall.
_MAP_ATTACH = {
    AttachType.SK_SKB_STREAM_PARSER: ProgramType.SK_SKB,
    AttachType.SK_SKB_STREAM_VERDICT: ProgramType.SK_SKB,
    AttachType.SK_SKB_VERDICT: ProgramType.SK_SKB,
    AttachType.SK_MSG_VERDICT: ProgramType.SK_MSG,
}
_SOCK_MAP_TYPES = (MapType.SOCKMAP, MapType.SOCKHASH)


class _FdOwner:
    """Owns one file descriptor; ``close()`` is idempotent; usable as a context manager."""

    _fd: int | None = None

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        """The owned file descriptor.

        :raises ClosedError: after :meth:`close`.
        """
        if self._fd is None:
            raise ClosedError(f"{self!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        """Close the file descriptor.  Calling it again does nothing."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _open_path_fd(target: PathLike | int, what: str) -> tuple[int, bool]:
    """Return (fd, owned) for a path or an fd the caller keeps."""
    if isinstance(target, int):
        return target, False
    try:
        return os.open(os.fspath(target), os.O_RDONLY | os.O_CLOEXEC), True
    except OSError as exc:
        raise _errors.from_errno(exc.errno or 2, f"open_{what}", {"path": os.fspath(target)}) from None


def _check_bpffs_parent(path: PathLike) -> None:
    parent = Path(os.fspath(path)).parent
    if not parent.is_dir():
        raise _errors.from_errno(2, "pin", {"path": os.fspath(path)})
    if not _is_on_bpffs(parent):
        raise _errors.BpffsNotMounted(
            f"cannot pin at {os.fspath(path)}: {parent} is not on a bpffs mount "
            "(mount -t bpf bpf /sys/fs/bpf)"
        )


def _is_on_bpffs(path: Path) -> bool:
    path = path.resolve()
    best = ("", "")
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point, fstype = fields[1], fields[2]
            if (path == Path(mount_point) or Path(mount_point) in path.parents) and len(mount_point) > len(
                best[0]
            ):
                best = (mount_point, fstype)
    return best[1] == "bpf"


# ---------------------------------------------------------------------------------------------------------
# maps


class Map(_FdOwner):
    """A live BPF map, addressed with raw ``bytes`` keys and values.

    The typed wrappers in :mod:`sockpolicy.maps` add codecs on top.  For per-CPU maps a value is all CPUs'
    slots concatenated, each padded to 8 bytes (:attr:`lookup_size`).
    """

    def __init__(self, fd: int, *, name: str | None = None) -> None:
        super().__init__(fd)
        info = _libbpf.map_info(fd)
        self.type = MapType(info.type) if info.type in MapType._value2member_map_ else info.type
        self.id = info.id
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.flags = info.flags
        self.name = name if name is not None else info.name

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Map {self.name!r} {getattr(self.type, 'name', self.type)} {state}>"

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        map_type: MapType,
        key_size: int,
        value_size: int,
        max_entries: int,
        *,
        name: str = "",
        flags: int = 0,
    ) -> Map:
        """Create a new map in the kernel.

        :raises NotSupported: the kernel lacks this map type.
        :raises PermissionDenied: no CAP_BPF.
        :raises InvalidArgument: sizes the kernel rejects for this type.
        """
        fd = _libbpf.map_create(int(map_type), name, key_size, value_size, max_entries, flags)
        return cls(fd, name=name or None)

    @classmethod
    def from_pin(cls, path: PathLike) -> Map:
        """Open a map pinned in bpffs.  :raises KeyNotFound: nothing is pinned there (ENOENT)."""
        return cls(_libbpf.obj_get(os.fspath(path)))

    @classmethod
    def from_fd(cls, fd: int) -> Map:
        """Wrap a duplicate of ``fd``; the caller keeps ownership of ``fd`` itself."""
        return cls(os.dup(fd))

    @classmethod
    def from_id(cls, map_id: int) -> Map:
        return cls(_libbpf.map_fd_by_id(map_id))

    def clone(self) -> Map:
        """Another :class:`Map` object for the same kernel map, with its own fd."""
        return Map(os.dup(self.fd), name=self.name)

    # -- data ----------------------------------------------------------------------------------------------

    @property
    def is_per_cpu(self) -> bool:
        return self.type in (MapType.PERCPU_ARRAY, MapType.PERCPU_HASH)

    @property
    def lookup_size(self) -> int:
        """Bytes a lookup returns: ``value_size``, or one 8-byte-aligned slot per possible CPU."""
        if self.is_per_cpu:
            return ((self.value_size + 7) // 8 * 8) * _libbpf.num_possible_cpus()
        if self.type in _SOCK_MAP_TYPES:
            return 8  # a lookup from userspace yields the socket cookie
        return self.value_size

    def _ctx(self, op_key: bytes | None = None) -> dict[str, Any]:
        ctx: dict[str, Any] = {"map": self.name}
        if op_key is not None:
            ctx["key"] = op_key.hex()
        return ctx

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise _errors.InvalidArgument(
                22,
                "map_key",
                self._ctx(),
                f"key is {len(key)} bytes, map {self.name!r} needs {self.key_size}",
            )

    def lookup(self, key: bytes) -> bytes:
        """Return the value stored under ``key``.  :raises KeyNotFound: absent."""
        self._check_key(key)
        return _libbpf.map_lookup(self.fd, key, self.lookup_size, self._ctx(key))

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        self._check_key(key)
        value = _libbpf.map_lookup_optional(self.fd, key, self.lookup_size)
        return default if value is None else value

    def update(self, key: bytes, value: bytes, flags: UpdateFlags = UpdateFlags.ANY) -> None:
        """Store ``value`` under ``key``.

        :raises KeyExists: ``flags`` is NOEXIST and the key is present.
        :raises KeyNotFound: ``flags`` is EXIST and the key is absent.
        :raises MapFull: no room for a new key.
        :raises BadSocket: on a SOCKMAP/SOCKHASH, the kernel refused the socket (EOPNOTSUPP: wrong kind of
            socket, or a TCP socket neither listening nor established, or an unbound UDP socket).
        """
        self._check_key(key)
        try:
            _libbpf.map_update(self.fd, key, value, int(flags), self._ctx(key))
        except _errors.NotSupported as exc:
            # For a socket map EOPNOTSUPP judges the socket, not the kernel's age: say so.
            if self.type not in _SOCK_MAP_TYPES:
                raise
            fd = int.from_bytes(value, sys.byteorder, signed=True)
            raise _errors.BadSocket(
                f"map {self.name!r}: the kernel refused socket fd {fd} (EOPNOTSUPP): a socket map takes "
                "listening or established TCP, bound UDP and connected unix stream sockets",
                exc.errno,
            ) from None

    def delete(self, key: bytes) -> None:
        """Remove ``key``.  :raises KeyNotFound: absent."""
        self._check_key(key)
        _libbpf.map_delete(self.fd, key, self._ctx(key))

    def keys(self) -> Iterator[bytes]:
        """Iterate over the keys.  Keys added or removed meanwhile may or may not be seen."""
        key = None
        ctx = self._ctx()
        while True:
            key = _libbpf.map_next_key(self.fd, key, self.key_size, ctx)
            if key is None:
                return
            yield key

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in self.keys():
            value = _libbpf.map_lookup_optional(self.fd, key, self.lookup_size)
            if value is not None:  # deleted between get_next_key and lookup
                yield key, value

    # -- pinning -------------------------------------------------------------------------------------------

    def pin(self, path: PathLike) -> None:
        """Pin the map at ``path`` (on bpffs), so it outlives this process."""
        _check_bpffs_parent(path)
        _libbpf.obj_pin(self.fd, os.fspath(path), self._ctx())


# ---------------------------------------------------------------------------------------------------------
# programs


@dataclass(frozen=True)
class RunStats:
    """Kernel run-time statistics of a program (collected while stats are enabled)."""

    run_count: int
    run_time_ns: int

    @property
    def ns_per_run(self) -> float:
        return self.run_time_ns / self.run_count if self.run_count else 0.0


class Program(_FdOwner):
    """A loaded BPF program.  Attaching returns a :class:`Link` or a :class:`MapAttachment`."""

    def __init__(self, fd: int, *, name: str | None = None, section: str = "") -> None:
        super().__init__(fd)
        info = _libbpf.prog_info(fd)
        self.type = ProgramType(info.type) if info.type in ProgramType._value2member_map_ else info.type
        self.id = info.id
        self.name = name if name is not None else info.name
        self.section = section

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Program {self.name!r} {getattr(self.type, 'name', self.type)} {state}>"

    @classmethod
    def from_pin(cls, path: PathLike) -> Program:
        return cls(_libbpf.obj_get(os.fspath(path)))

    @classmethod
    def from_id(cls, prog_id: int) -> Program:
        return cls(_libbpf.prog_fd_by_id(prog_id))

    def clone(self) -> Program:
        return Program(os.dup(self.fd), name=self.name, section=self.section)

    def pin(self, path: PathLike) -> None:
        _check_bpffs_parent(path)
        _libbpf.obj_pin(self.fd, os.fspath(path), {"program": self.name})

    def _require(self, expected: ProgramType, target: str) -> None:
        if self.type != expected:
            raise _errors.InvalidArgument(
                22,
                "attach",
                {"program": self.name, "target": target},
                f"a {getattr(self.type, 'name', self.type)} program cannot attach to {target}; "
                f"it needs a {expected.name} program",
            )

    def attach_netns(self, netns: PathLike | int = "/proc/self/ns/net") -> Link:
        """Attach an SK_LOOKUP program to a network namespace with a bpf_link.

        :param netns: a namespace path (``/proc/self/ns/net``, ``/run/netns/NAME``) or an open fd.
        :returns: the :class:`Link`; the program stays attached while the link is open or pinned.
        :raises InvalidArgument: this is not an SK_LOOKUP program.
        :raises NotSupported: the kernel has no SK_LOOKUP (Linux < 5.9).
        """
        self._require(ProgramType.SK_LOOKUP, "a network namespace")
        fd, owned = _open_path_fd(netns, "netns")
        try:
            link_fd = _libbpf.link_create(self.fd, fd, int(AttachType.SK_LOOKUP), {"program": self.name})
        except _errors.InvalidArgument as exc:
            raise _errors.NotSupported(
                exc.errno, "link_create", exc.context, feature="SK_LOOKUP netns links", min_kernel="5.9"
            ) from None
        finally:
            if owned:
                os.close(fd)
        return Link(link_fd, description=f"{self.name} -> netns {netns}")

    def attach_cgroup(
        self, cgroup: PathLike | int, attach_type: AttachType = AttachType.CGROUP_SOCK_OPS
    ) -> Link:
        """Attach a SOCK_OPS program to a cgroup v2 directory with a bpf_link.

        :raises InvalidArgument: not a SOCK_OPS program, or the path is not a cgroup v2 directory.
        """
        self._require(ProgramType.SOCK_OPS, "a cgroup")
        if not isinstance(cgroup, int):
            path = os.fspath(cgroup)
            if not os.path.isdir(path):
                raise _errors.InvalidArgument(2, "attach_cgroup", {"path": path}, "no such cgroup directory")
        fd, owned = _open_path_fd(cgroup, "cgroup")
        try:
            link_fd = _libbpf.link_create(
                self.fd, fd, int(attach_type), {"program": self.name, "cgroup": cgroup}
            )
        finally:
            if owned:
                os.close(fd)
        return Link(link_fd, description=f"{self.name} -> cgroup {cgroup}")

    def attach_map(self, target: Map, attach_type: AttachType) -> MapAttachment:
        """Attach an SK_MSG or SK_SKB program to a SOCKMAP/SOCKHASH (``BPF_PROG_ATTACH``).

        The kernel keeps the attachment for as long as the map exists, whatever happens to this process;
        :meth:`MapAttachment.detach` removes it.

        :raises InvalidArgument: the program type does not fit ``attach_type``, or ``target`` is not a
            socket map.
        :raises Busy: an exclusive attachment conflicts (STREAM_VERDICT and SK_SKB_VERDICT on one map).
        """
        expected = _MAP_ATTACH.get(attach_type)
        if expected is None:
            raise _errors.InvalidArgument(
                22, "attach_map", {"program": self.name}, f"{attach_type.name} does not attach to a map"
            )
        self._require(expected, f"{attach_type.name} on map {target.name!r}")
        if target.type not in _SOCK_MAP_TYPES:
            raise _errors.InvalidArgument(
                22,
                "attach_map",
                {"program": self.name, "map": target.name},
                f"{attach_type.name} needs a SOCKMAP or SOCKHASH, "
                f"not {getattr(target.type, 'name', target.type)}",
            )
        _libbpf.prog_attach(self.fd, target.fd, int(attach_type), {"program": self.name, "map": target.name})
        return MapAttachment(self.clone(), target.clone(), attach_type)

    def test_run(
        self, data: bytes = b"", *, ctx: bytes | None = None, ctx_out_size: int = 0, repeat: int = 1
    ):
        """Run the program once (or ``repeat`` times) on ``data`` with ``BPF_PROG_TEST_RUN``.

        :raises NotSupported: the kernel cannot test-run this program type.
        """
        type_name = getattr(self.type, "name", str(self.type)).lower()
        return _libbpf.prog_test_run(
            self.fd,
            data=data,
            ctx=ctx,
            ctx_out_size=ctx_out_size,
            repeat=repeat,
            context={"program": self.name},
            feature=f"BPF_PROG_TEST_RUN for {type_name.upper()} programs",
            min_kernel=_libbpf.TEST_RUN_MIN_KERNEL.get(type_name, ""),
        )

    def run_stats(self) -> RunStats:
        """Run count and total run time; non-zero only while :func:`enable_run_time_stats` is on."""
        info = _libbpf.prog_info(self.fd)
        return RunStats(info.run_cnt, info.run_time_ns)


class StatsEnabled(_FdOwner):
    """Keeps kernel BPF run-time statistics on until closed."""


def enable_run_time_stats() -> StatsEnabled:
    return StatsEnabled(_libbpf.enable_run_time_stats())


# ---------------------------------------------------------------------------------------------------------
# attachments


class Link(_FdOwner):
    """A bpf_link.  Closing the last fd of an unpinned link detaches the program; a pinned link stays."""

    def __init__(self, fd: int, *, description: str = "", pin_path: str | None = None) -> None:
        super().__init__(fd)
        self.description = description
        self.pin_path = pin_path

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Link {self.description} {state}>"

    @classmethod
    def from_pin(cls, path: PathLike) -> Link:
        """Open a pinned link.  :raises KeyNotFound: nothing pinned at ``path``."""
        return cls(_libbpf.obj_get(os.fspath(path)), description=os.fspath(path), pin_path=os.fspath(path))

    @property
    def info(self) -> _libbpf.LinkInfo:
        return _libbpf.link_info(self.fd)

    def pin(self, path: PathLike) -> None:
        """Pin the link in bpffs: the attachment then outlives this process."""
        _check_bpffs_parent(path)
        _libbpf.obj_pin(self.fd, os.fspath(path), {"link": self.description})
        self.pin_path = os.fspath(path)

    def unpin(self) -> None:
        """Remove the pin (the attachment ends once every fd is closed).  Idempotent."""
        if self.pin_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pin_path)
            self.pin_path = None

    def update(self, program: Program) -> None:
        """Atomically replace the attached program."""
        _libbpf.link_update(self.fd, program.fd, {"link": self.description, "program": program.name})

    def detach(self) -> None:
        """Detach now, even if the link is pinned or has other fds."""
        _libbpf.link_detach(self.fd, {"link": self.description})


class MapAttachment:
    """A program attached to a socket map with ``BPF_PROG_ATTACH``.

    :meth:`close` releases this object's fds and leaves the attachment in place (the kernel ties it to the
    map's lifetime); :meth:`detach` removes it.
    """

    def __init__(self, program: Program, target: Map, attach_type: AttachType) -> None:
        self.program = program
        self.map = target
        self.attach_type = attach_type

    def __repr__(self) -> str:
        return f"<MapAttachment {self.program.name} {self.attach_type.name} -> {self.map.name}>"

    def detach(self) -> None:
        """Detach the program from the map.  :raises KeyNotFound: it was no longer attached."""
        _libbpf.prog_detach(
            self.program.fd,
            self.map.fd,
            int(self.attach_type),
            {"program": self.program.name, "map": self.map.name},
        )

    def close(self) -> None:
        self.program.close()
        self.map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# object files


def program_object_path(name: str) -> Path:
    """Path of a compiled object shipped in ``sockpolicy/progs`` (``name`` without ``.bpf.o``)."""
    path = Path(str(resources.files("sockpolicy.progs").joinpath(f"{name}.bpf.o")))
    if not path.exists():
        raise FileNotFoundError(
            f"compiled BPF object {path} is missing: reinstall sockpolicy (pip install .) "
            "or run 'make progs' in a development checkout"
        )
    return path


@dataclass
class ObjectSpec:
    """A description of a BPF object file and the changes to make before it is loaded.  Owns no fds.

    :ivar max_entries: map name -> new ``max_entries``.
    :ivar pin_paths: map name -> bpffs path; an existing pin is reused, otherwise the map is pinned there.
    :ivar reuse_maps: map name -> an existing :class:`Map` to use instead of creating a new one.
    :ivar program_types: program name -> (type, expected attach type) overrides.
    :ivar autoload: program name -> False to skip loading it.
    """

    path: Path
    max_entries: dict[str, int] = field(default_factory=dict)
    pin_paths: dict[str, str] = field(default_factory=dict)
    reuse_maps: dict[str, Map] = field(default_factory=dict)
    program_types: dict[str, tuple[ProgramType, AttachType | None]] = field(default_factory=dict)
    autoload: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: PathLike) -> ObjectSpec:
        return cls(Path(os.fspath(path)))

    @classmethod
    def from_package(cls, name: str) -> ObjectSpec:
        """The spec of ``sockpolicy/progs/NAME.bpf.o``."""
        return cls(program_object_path(name))

    def load(self) -> Object:
        """Open the object file, apply the overrides and load every program into the kernel.

        :raises LoadError: the file cannot be opened or loaded; :attr:`LoadError.log` holds libbpf's log.
        :raises VerifierError: a program was rejected; the exception holds the verifier log.
        :raises PermissionDenied: no CAP_BPF.
        :raises KeyError: an override names a map or program the object does not have.
        """
        if not self.path.exists():
            raise _errors.LoadError(f"BPF object {self.path} does not exist")
        handle = _libbpf.object_open(str(self.path))
        try:
            maps = {_libbpf.map_describe(m).name: m for m in _libbpf.object_maps(handle)}
            progs = {_libbpf.program_describe(p).name: p for p in _libbpf.object_programs(handle)}
            for kind, names, known in (
                ("map", [*self.max_entries, *self.pin_paths, *self.reuse_maps], maps),
                ("program", [*self.program_types, *self.autoload], progs),
            ):
                for name in names:
                    if name not in known:
                        raise KeyError(
                            f"{self.path.name} has no {kind} named {name!r} (has: {', '.join(known)})"
                        )
            for name, entries in self.max_entries.items():
                _libbpf.map_set_max_entries(maps[name], entries)
            for name, pin in self.pin_paths.items():
                _check_bpffs_parent(pin)
                _libbpf.map_set_pin_path(maps[name], pin)
            for name, existing in self.reuse_maps.items():
                _libbpf.map_reuse_fd(maps[name], existing.fd)
            for name, (prog_type, attach_type) in self.program_types.items():
                _libbpf.program_set_type(
                    progs[name], int(prog_type), None if attach_type is None else int(attach_type)
                )
            for name, autoload in self.autoload.items():
                _libbpf.program_set_autoload(progs[name], autoload)
            _libbpf.object_load(handle, str(self.path))
            loaded_maps = {
                name: Map(os.dup(_libbpf.map_fd(m)), name=name)
                for name, m in maps.items()
                if not _libbpf.map_describe(m).internal
            }
            loaded_progs = {}
            for name, p in progs.items():
                if self.autoload.get(name, True):
                    desc = _libbpf.program_describe(p)
                    loaded_progs[name] = Program(
                        os.dup(_libbpf.program_fd(p)), name=name, section=desc.section
                    )
        finally:
            # Every map and program now has its own fd; libbpf's object is no longer needed.
            _libbpf.object_close(handle)
        return Object(self.path, loaded_maps, loaded_progs)


class Object:
    """A loaded BPF object: its programs and (non-internal) maps, each owning its own fd.

    :meth:`close` closes every program and map obtained from it that the caller did not :meth:`take`.
    """

    def __init__(self, path: Path, maps: dict[str, Map], programs: dict[str, Program]) -> None:
        self.path = path
        self.maps = maps
        self.programs = programs

    def __repr__(self) -> str:
        return f"<Object {self.path.name} programs={list(self.programs)} maps={list(self.maps)}>"

    def take_map(self, name: str) -> Map:
        """Remove a map from this object and hand its ownership to the caller."""
        return self.maps.pop(name)

    def take_program(self, name: str) -> Program:
        return self.programs.pop(name)

    def close(self) -> None:
        for owner in [*self.maps.values(), *self.programs.values()]:
            owner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_bpffs(path: PathLike) -> bool:
    """Whether ``path`` lies on a bpffs mount."""
    return _is_on_bpffs(Path(os.fspath(path)))


def fd_kind(fd: int) -> str:
    """A short description of what ``fd`` is (for error messages)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "closed"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "other"
