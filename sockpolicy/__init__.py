"""sockpolicy: socket-layer proxying and policy on Linux with eBPF.

The public API is re-exported here; everything else lives in private ``_modules``.

- Kernel objects: :class:`ObjectSpec` (a description) -> :class:`Object` with :class:`Program` and
  :class:`Map` (live, fd-owning); attachments are :class:`Link` or :class:`MapAttachment`.
- Typed maps: :mod:`sockpolicy.maps`.
- The proxy: :mod:`sockpolicy.proxy`.
"""

from sockpolicy._errors import (
    BadFileDescriptor,
    BadSocket,
    BpfError,
    BpffsNotMounted,
    Busy,
    ClosedError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    LoadError,
    MapFull,
    NotLoaded,
    NotSupported,
    PermissionDenied,
    SockpolicyError,
    VerifierError,
)
from sockpolicy._objects import (
    AttachType,
    Link,
    Map,
    MapAttachment,
    MapType,
    Object,
    ObjectSpec,
    Program,
    ProgramType,
    RunStats,
    StatsEnabled,
    UpdateFlags,
    enable_run_time_stats,
    is_bpffs,
    program_object_path,
)

__version__ = "0.1.0"

__all__ = [
    "AttachType",
    "BadFileDescriptor",
    "BadSocket",
    "BpfError",
    "BpffsNotMounted",
    "Busy",
    "ClosedError",
    "InvalidArgument",
    "KeyExists",
    "KeyNotFound",
    "Link",
    "LoadError",
    "Map",
    "MapAttachment",
    "MapFull",
    "MapType",
    "NotLoaded",
    "NotSupported",
    "Object",
    "ObjectSpec",
    "PermissionDenied",
    "Program",
    "ProgramType",
    "RunStats",
    "SockpolicyError",
    "StatsEnabled",
    "UpdateFlags",
    "VerifierError",
    "enable_run_time_stats",
    "is_bpffs",
    "program_object_path",
]

# Typed maps (sockpolicy.maps), re-exported at the top level.
from sockpolicy.maps import (
    BE16,
    BE32,
    U8,
    U16,
    U32,
    U64,
    Array,
    Bool,
    Bytes,
    Codec,
    Hash,
    IPv4,
    IPv6,
    LpmTrie,
    PerCpuArray,
    PerCpuHash,
    SockHash,
    SockMap,
    Struct,
    check_socket,
    cookie_of,
)

__all__ += [
    "BE16",
    "BE32",
    "U8",
    "U16",
    "U32",
    "U64",
    "Array",
    "Bool",
    "Bytes",
    "Codec",
    "Hash",
    "IPv4",
    "IPv6",
    "LpmTrie",
    "PerCpuArray",
    "PerCpuHash",
    "SockHash",
    "SockMap",
    "Struct",
    "check_socket",
    "cookie_of",
]

# The SK_LOOKUP dispatcher (sockpolicy._dispatcher).
from sockpolicy._dispatcher import Binding, BindingConflict, Dispatcher, InvalidLabel, TableTooLarge  # noqa: E402

__all__ += ["Binding", "BindingConflict", "Dispatcher", "InvalidLabel", "TableTooLarge"]
from sockpolicy._rules import Enforcer, Framing, GenerationStats, Rule, RuleError, RuleSet, RuleStats  # noqa: E402

__all__ += ["Enforcer", "Framing", "GenerationStats", "Rule", "RuleError", "RuleSet", "RuleStats"]
