"""The only module that touches the cffi ``lib``: thin, checked wrappers over libbpf.

Every function here either returns a plain Python value or raises the typed exception that
:func:`sockpolicy._errors.from_errno` chooses.  Nothing here owns a file descriptor for longer than a call:
ownership lives in :mod:`sockpolicy._objects`.

libbpf >= 1.0 returns ``-errno`` from integer functions and ``NULL`` with ``errno`` set from pointer
functions; :func:`_check` and :func:`_check_ptr` are the two places that turn that into exceptions.
"""

from __future__ import annotations

import errno as _errno
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sockpolicy import _errors
from sockpolicy._libbpf_cffi import ffi, lib

_log = logging.getLogger("sockpolicy.libbpf")

# ---------------------------------------------------------------------------------------------------------
# constants (values come from the system headers, via the cffi build)

ANY = lib.BPF_ANY
NOEXIST = lib.BPF_NOEXIST
EXIST = lib.BPF_EXIST
F_NO_PREALLOC = lib.BPF_F_NO_PREALLOC

MAP_TYPES = {
    "hash": lib.BPF_MAP_TYPE_HASH,
    "array": lib.BPF_MAP_TYPE_ARRAY,
    "percpu_hash": lib.BPF_MAP_TYPE_PERCPU_HASH,
    "percpu_array": lib.BPF_MAP_TYPE_PERCPU_ARRAY,
    "lpm_trie": lib.BPF_MAP_TYPE_LPM_TRIE,
    "sockmap": lib.BPF_MAP_TYPE_SOCKMAP,
    "sockhash": lib.BPF_MAP_TYPE_SOCKHASH,
}

PROG_TYPES = {
    "socket_filter": lib.BPF_PROG_TYPE_SOCKET_FILTER,
    "sched_cls": lib.BPF_PROG_TYPE_SCHED_CLS,
    "xdp": lib.BPF_PROG_TYPE_XDP,
    "sock_ops": lib.BPF_PROG_TYPE_SOCK_OPS,
    "sk_skb": lib.BPF_PROG_TYPE_SK_SKB,
    "sk_msg": lib.BPF_PROG_TYPE_SK_MSG,
    "sk_lookup": lib.BPF_PROG_TYPE_SK_LOOKUP,
}

ATTACH_TYPES = {
    "cgroup_sock_ops": lib.BPF_CGROUP_SOCK_OPS,
    "sk_skb_stream_parser": lib.BPF_SK_SKB_STREAM_PARSER,
    "sk_skb_stream_verdict": lib.BPF_SK_SKB_STREAM_VERDICT,
    "sk_skb_verdict": lib.BPF_SK_SKB_VERDICT,
    "sk_msg_verdict": lib.BPF_SK_MSG_VERDICT,
    "sk_lookup": lib.BPF_SK_LOOKUP,
}

# What each program type and attachment needs from the kernel, for NotSupported messages.
PROG_TYPE_MIN_KERNEL = {
    "socket_filter": "3.19",
    "sched_cls": "4.1",
    "xdp": "4.8",
    "sock_ops": "4.13",
    "sk_skb": "4.14",
    "sk_msg": "4.17",
    "sk_lookup": "5.9",
}
MAP_TYPE_MIN_KERNEL = {
    "hash": "3.19",
    "array": "3.19",
    "percpu_hash": "4.6",
    "percpu_array": "4.6",
    "lpm_trie": "4.11",
    "sockmap": "4.14",
    "sockhash": "4.18",
}
ATTACH_MIN_KERNEL = {
    "cgroup_sock_ops": "5.7",  # as a bpf_link
    "sk_skb_stream_parser": "4.14",
    "sk_skb_stream_verdict": "4.14",
    "sk_skb_verdict": "5.13",
    "sk_msg_verdict": "4.17",
    "sk_lookup": "5.9",
}
TEST_RUN_MIN_KERNEL = {
    "socket_filter": "4.12",
    "sched_cls": "4.12",
    "xdp": "4.12",
    "sk_lookup": "5.14",
}

_PROG_TYPE_NAMES = {v: k for k, v in PROG_TYPES.items()}
_MAP_TYPE_NAMES = {v: k for k, v in MAP_TYPES.items()}
_ATTACH_TYPE_NAMES = {v: k for k, v in ATTACH_TYPES.items()}


def prog_type_name(value: int) -> str:
    return _PROG_TYPE_NAMES.get(value, f"prog_type_{value}")


def map_type_name(value: int) -> str:
    return _MAP_TYPE_NAMES.get(value, f"map_type_{value}")


def attach_type_name(value: int) -> str:
    return _ATTACH_TYPE_NAMES.get(value, f"attach_type_{value}")


# ---------------------------------------------------------------------------------------------------------
# libbpf's log: captured per thread while a load runs, otherwise sent to the logging module

_capture = threading.local()


@ffi.def_extern()
def sockpolicy_libbpf_log(level: int, message: Any) -> None:
    text = ffi.string(message).decode("utf-8", errors="replace")
    buffer = getattr(_capture, "lines", None)
    if buffer is not None:
        buffer.append(text)
    elif level == lib.LIBBPF_WARN:
        _log.warning("%s", text.rstrip())
    else:
        _log.debug("%s", text.rstrip())


lib.sockpolicy_install_print()


class _CaptureLog:
    """Collect what libbpf prints on this thread while the block runs."""

    def __enter__(self) -> list[str]:
        self._previous = getattr(_capture, "lines", None)
        _capture.lines = []
        return _capture.lines

    def __exit__(self, *exc: object) -> None:
        _capture.lines = self._previous


# ---------------------------------------------------------------------------------------------------------
# checks


def _check(ret: int, op: str, context: Mapping[str, Any] | None = None, **feature: str) -> int:
    if ret < 0:
        raise _errors.from_errno(-ret, op, context, **feature)
    return ret


def _check_ptr(ptr: Any, op: str, context: Mapping[str, Any] | None = None, **feature: str) -> Any:
    if ptr == ffi.NULL:
        raise _errors.from_errno(ffi.errno or 22, op, context, **feature)
    return ptr


def _string(ptr: Any) -> str:
    return "" if ptr == ffi.NULL else ffi.string(ptr).decode()


# ---------------------------------------------------------------------------------------------------------
# objects


def object_open(path: str, *, pin_root: str | None = None) -> Any:
    opts = ffi.new("struct bpf_object_open_opts *")
    opts.sz = ffi.sizeof("struct bpf_object_open_opts")
    keep = []
    if pin_root is not None:
        keep.append(ffi.new("char[]", pin_root.encode()))
        opts.pin_root_path = keep[-1]
    with _CaptureLog() as lines:
        obj = lib.bpf_object__open_file(path.encode(), opts)
    if obj == ffi.NULL:
        err = ffi.errno
        raise _errors.LoadError(
            f"cannot open BPF object {path}: {_errors._describe(err)}", "".join(lines), err
        )
    return obj


def object_load(obj: Any, path: str) -> None:
    with _CaptureLog() as lines:
        ret = lib.bpf_object__load(obj)
    if ret < 0:
        log = "".join(lines)
        err = -ret
        if err in (1, 13) and _errors.missing_capabilities():
            raise _errors.from_errno(err, "object_load", {"path": path})
        cls = _errors.VerifierError if "BEGIN PROG LOAD LOG" in log else _errors.LoadError
        kind = "rejected by the verifier" if cls is _errors.VerifierError else _errors._describe(err)
        raise cls(f"loading BPF object {path} failed: {kind}", log, err)


def object_close(obj: Any) -> None:
    lib.bpf_object__close(obj)


def object_programs(obj: Any) -> Iterator[Any]:
    prog = lib.bpf_object__next_program(obj, ffi.NULL)
    while prog != ffi.NULL:
        yield prog
        prog = lib.bpf_object__next_program(obj, prog)


def object_maps(obj: Any) -> Iterator[Any]:
    map_ = lib.bpf_object__next_map(obj, ffi.NULL)
    while map_ != ffi.NULL:
        yield map_
        map_ = lib.bpf_object__next_map(obj, map_)


@dataclass(frozen=True)
class ProgramDescription:
    name: str
    section: str
    type: int
    expected_attach_type: int


@dataclass(frozen=True)
class MapDescription:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    internal: bool


def program_describe(prog: Any) -> ProgramDescription:
    return ProgramDescription(
        name=_string(lib.bpf_program__name(prog)),
        section=_string(lib.bpf_program__section_name(prog)),
        type=lib.bpf_program__type(prog),
        expected_attach_type=lib.bpf_program__expected_attach_type(prog),
    )


def program_fd(prog: Any) -> int:
    return _check(lib.bpf_program__fd(prog), "program_fd", {"program": _string(lib.bpf_program__name(prog))})


def program_set_type(prog: Any, prog_type: int, attach_type: int | None = None) -> None:
    name = _string(lib.bpf_program__name(prog))
    _check(lib.bpf_program__set_type(prog, prog_type), "program_set_type", {"program": name})
    if attach_type is not None:
        _check(
            lib.bpf_program__set_expected_attach_type(prog, attach_type),
            "program_set_expected_attach_type",
            {"program": name},
        )


def program_set_autoload(prog: Any, autoload: bool) -> None:
    _check(lib.bpf_program__set_autoload(prog, autoload), "program_set_autoload")


def map_describe(map_: Any) -> MapDescription:
    return MapDescription(
        name=_string(lib.bpf_map__name(map_)),
        type=lib.bpf_map__type(map_),
        key_size=lib.bpf_map__key_size(map_),
        value_size=lib.bpf_map__value_size(map_),
        max_entries=lib.bpf_map__max_entries(map_),
        flags=lib.bpf_map__map_flags(map_),
        internal=bool(lib.bpf_map__is_internal(map_)),
    )


def map_fd(map_: Any) -> int:
    return _check(lib.bpf_map__fd(map_), "map_fd", {"map": _string(lib.bpf_map__name(map_))})


def map_set_max_entries(map_: Any, max_entries: int) -> None:
    name = _string(lib.bpf_map__name(map_))
    _check(lib.bpf_map__set_max_entries(map_, max_entries), "map_set_max_entries", {"map": name})


def map_set_pin_path(map_: Any, path: str) -> None:
    name = _string(lib.bpf_map__name(map_))
    _check(lib.bpf_map__set_pin_path(map_, path.encode()), "map_set_pin_path", {"map": name, "path": path})


def map_reuse_fd(map_: Any, fd: int) -> None:
    name = _string(lib.bpf_map__name(map_))
    _check(lib.bpf_map__reuse_fd(map_, fd), "map_reuse_fd", {"map": name})


# ---------------------------------------------------------------------------------------------------------
# maps by fd


def map_create(
    map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0
) -> int:
    opts = ffi.new("struct bpf_map_create_opts *")
    opts.sz = ffi.sizeof("struct bpf_map_create_opts")
    opts.map_flags = flags
    type_name = map_type_name(map_type)
    context = {"map": name, "type": type_name}
    ret = lib.bpf_map_create(
        map_type, name.encode()[:15] or ffi.NULL, key_size, value_size, max_entries, opts
    )
    if ret == -_errno.EINVAL and probe_map_type(map_type):
        # The kernel has this map type, so EINVAL judges the sizes or flags, not the kernel's age.
        raise _errors.InvalidArgument(
            -ret,
            "map_create",
            context,
            f"the kernel refused key_size={key_size} value_size={value_size} max_entries={max_entries} "
            f"flags={flags:#x} for a {type_name} map",
        )
    return _check(
        ret,
        "map_create",
        context,
        feature=f"{type_name} maps",
        min_kernel=MAP_TYPE_MIN_KERNEL.get(type_name, ""),
    )


def map_lookup(fd: int, key: bytes, value_size: int, context: Mapping[str, Any], flags: int = 0) -> bytes:
    value = ffi.new("unsigned char[]", value_size)
    _check(lib.bpf_map_lookup_elem_flags(fd, ffi.from_buffer(key), value, flags), "map_lookup", context)
    return bytes(ffi.buffer(value, value_size))


def map_lookup_optional(fd: int, key: bytes, value_size: int) -> bytes | None:
    """Like :func:`map_lookup`, but a missing key gives ``None`` (no exception cost on the hot path)."""
    value = ffi.new("unsigned char[]", value_size)
    ret = lib.bpf_map_lookup_elem(fd, ffi.from_buffer(key), value)
    if ret == -2:  # ENOENT
        return None
    _check(ret, "map_lookup")
    return bytes(ffi.buffer(value, value_size))


def map_update(fd: int, key: bytes, value: bytes, flags: int, context: Mapping[str, Any]) -> None:
    _check(
        lib.bpf_map_update_elem(fd, ffi.from_buffer(key), ffi.from_buffer(value), flags),
        "map_update",
        context,
    )


def map_delete(fd: int, key: bytes, context: Mapping[str, Any]) -> None:
    _check(lib.bpf_map_delete_elem(fd, ffi.from_buffer(key)), "map_delete", context)


def map_next_key(fd: int, key: bytes | None, key_size: int, context: Mapping[str, Any]) -> bytes | None:
    next_key = ffi.new("unsigned char[]", key_size)
    current = ffi.NULL if key is None else ffi.from_buffer(key)
    ret = lib.bpf_map_get_next_key(fd, current, next_key)
    if ret == -2:  # ENOENT: no more keys
        return None
    _check(ret, "map_next_key", context)
    return bytes(ffi.buffer(next_key, key_size))


# ---------------------------------------------------------------------------------------------------------
# attachment, links, pinning


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, context: Mapping[str, Any]) -> None:
    name = attach_type_name(attach_type)
    ctx = {**context, "attach_type": name}
    ret = lib.bpf_prog_attach(prog_fd, target_fd, attach_type, 0)
    if ret == -_errno.EOPNOTSUPP:
        # The kernel's answer for a target that takes no such program (e.g. SK_SKB on a HASH map): a wrong
        # argument, not a missing kernel feature.
        raise _errors.InvalidArgument(-ret, "prog_attach", ctx, f"the target does not take {name} programs")
    _check(ret, "prog_attach", ctx)


def prog_detach(prog_fd: int, target_fd: int, attach_type: int, context: Mapping[str, Any]) -> None:
    name = attach_type_name(attach_type)
    _check(
        lib.bpf_prog_detach2(prog_fd, target_fd, attach_type), "prog_detach", {**context, "attach_type": name}
    )


def prog_query(target_fd: int, attach_type: int, context: Mapping[str, Any]) -> list[int]:
    count = ffi.new("__u32 *", 64)
    ids = ffi.new("__u32[]", 64)
    flags = ffi.new("__u32 *")
    _check(lib.bpf_prog_query(target_fd, attach_type, 0, flags, ids, count), "prog_query", context)
    return [ids[i] for i in range(count[0])]


def link_create(prog_fd: int, target_fd: int, attach_type: int, context: Mapping[str, Any]) -> int:
    name = attach_type_name(attach_type)
    return _check(
        lib.bpf_link_create(prog_fd, target_fd, attach_type, ffi.NULL),
        "link_create",
        {**context, "attach_type": name},
    )


def link_update(link_fd: int, prog_fd: int, context: Mapping[str, Any]) -> None:
    _check(lib.bpf_link_update(link_fd, prog_fd, ffi.NULL), "link_update", context)


def link_detach(link_fd: int, context: Mapping[str, Any]) -> None:
    _check(lib.bpf_link_detach(link_fd), "link_detach", context)


def obj_pin(fd: int, path: str, context: Mapping[str, Any]) -> None:
    _check(lib.bpf_obj_pin(fd, path.encode()), "obj_pin", {**context, "path": path})


def obj_get(path: str) -> int:
    return _check(lib.bpf_obj_get(path.encode()), "obj_get", {"path": path})


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str
    run_time_ns: int
    run_cnt: int


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int


def map_info(fd: int) -> MapInfo:
    info = ffi.new("struct bpf_map_info *")
    size = ffi.new("__u32 *", ffi.sizeof("struct bpf_map_info"))
    _check(lib.bpf_obj_get_info_by_fd(fd, info, size), "map_info", {"fd": fd})
    return MapInfo(
        info.type, info.id, info.key_size, info.value_size, info.max_entries, info.map_flags,
        ffi.string(info.name).decode(errors="replace"),
    )  # fmt: skip


def prog_info(fd: int) -> ProgInfo:
    info = ffi.new("struct bpf_prog_info *")
    size = ffi.new("__u32 *", ffi.sizeof("struct bpf_prog_info"))
    _check(lib.bpf_obj_get_info_by_fd(fd, info, size), "prog_info", {"fd": fd})
    name = ffi.string(info.name).decode(errors="replace")
    return ProgInfo(info.type, info.id, name, info.run_time_ns, info.run_cnt)


def link_info(fd: int) -> LinkInfo:
    info = ffi.new("struct bpf_link_info *")
    size = ffi.new("__u32 *", ffi.sizeof("struct bpf_link_info"))
    _check(lib.bpf_obj_get_info_by_fd(fd, info, size), "link_info", {"fd": fd})
    return LinkInfo(info.type, info.id, info.prog_id)


def prog_fd_by_id(prog_id: int) -> int:
    return _check(lib.bpf_prog_get_fd_by_id(prog_id), "prog_get_fd_by_id", {"id": prog_id})


def map_fd_by_id(map_id: int) -> int:
    return _check(lib.bpf_map_get_fd_by_id(map_id), "map_get_fd_by_id", {"id": map_id})


# ---------------------------------------------------------------------------------------------------------
# test runs, statistics, misc


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    duration_ns: int
    data_out: bytes
    ctx_out: bytes


def prog_test_run(
    prog_fd: int,
    *,
    data: bytes,
    ctx: bytes | None,
    ctx_out_size: int,
    repeat: int,
    context: Mapping[str, Any],
    feature: str,
    min_kernel: str,
) -> TestRunResult:
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    data_in = ffi.from_buffer(data) if data else ffi.NULL
    out_size = max(len(data) + 256, 256) if data else 0
    data_out = ffi.new("unsigned char[]", out_size) if out_size else ffi.NULL
    opts.data_in = data_in
    opts.data_size_in = len(data)
    opts.data_out = data_out
    opts.data_size_out = out_size
    ctx_in = ffi.from_buffer(ctx) if ctx else ffi.NULL
    ctx_out = ffi.new("unsigned char[]", ctx_out_size) if ctx_out_size else ffi.NULL
    if ctx:
        opts.ctx_in = ctx_in
        opts.ctx_size_in = len(ctx)
    if ctx_out_size:
        opts.ctx_out = ctx_out
        opts.ctx_size_out = ctx_out_size
    opts.repeat = repeat
    _check(
        lib.bpf_prog_test_run_opts(prog_fd, opts),
        "prog_test_run",
        context,
        feature=feature,
        min_kernel=min_kernel,
    )
    out = bytes(ffi.buffer(data_out, opts.data_size_out)) if out_size else b""
    ctx_bytes = bytes(ffi.buffer(ctx_out, opts.ctx_size_out)) if ctx_out_size else b""
    return TestRunResult(opts.retval, opts.duration, out, ctx_bytes)


def enable_run_time_stats() -> int:
    """Turn on kernel BPF run-time statistics; returns an fd that keeps them on until closed."""
    return _check(
        lib.bpf_enable_stats(lib.BPF_STATS_RUN_TIME),
        "enable_stats",
        feature="BPF_ENABLE_STATS",
        min_kernel="5.8",
    )


def num_possible_cpus() -> int:
    return _check(lib.libbpf_num_possible_cpus(), "num_possible_cpus")


def probe_prog_type(prog_type: int) -> bool:
    return lib.libbpf_probe_bpf_prog_type(prog_type, ffi.NULL) == 1


def probe_map_type(map_type: int) -> bool:
    return lib.libbpf_probe_bpf_map_type(map_type, ffi.NULL) == 1


def setns_net(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` (only this thread moves)."""
    if lib.setns(fd, lib.CLONE_NEWNET) != 0:
        raise _errors.from_errno(ffi.errno, "setns", {"fd": fd})
