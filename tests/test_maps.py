"""Typed maps (sockpolicy.maps) against the real kernel: codecs, dict semantics, update flags, LPM matching,
per-CPU sums driven by BPF_PROG_TEST_RUN, array bounds, pinning across processes."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sockpolicy import (
    BpffsNotMounted,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    Map,
    MapFull,
    MapType,
    ObjectSpec,
    UpdateFlags,
)
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
    Hash,
    IPv4,
    IPv6,
    LpmTrie,
    PerCpuArray,
    PerCpuHash,
    Struct,
)

REPO = Path(__file__).resolve().parent.parent
privileged = pytest.mark.privileged


# ---------------------------------------------------------------------------------------------------------
# codecs (pure Python)


def test_int_codecs_use_host_order_and_exact_sizes() -> None:
    assert (U8.size, U16.size, U32.size, U64.size) == (1, 2, 4, 8)
    assert U32.encode(1) == (1).to_bytes(4, sys.byteorder)
    assert U64.decode((2**40 + 5).to_bytes(8, sys.byteorder)) == 2**40 + 5
    assert BE16.encode(8080) == b"\x1f\x90"
    assert BE32.encode(0x0A000001) == b"\x0a\x00\x00\x01"
    assert BE16.decode(b"\x00\x50") == 80


@pytest.mark.parametrize(
    ("codec", "value", "message"),
    [
        (U32, 2**40, "value 1099511627776 does not fit U32 (0..4294967295)"),
        (U8, -1, "value -1 does not fit U8 (0..255)"),
        (U16, "7", "value '7' is not an int (codec U16)"),
        (Bytes(4), b"abc", "value of 3 bytes does not fit Bytes(4)"),
        (IPv4, "::1", "value '::1' is not an IPv4 address"),
        (Bool, 2, "value 2 is not a bool"),
    ],
)
def test_codec_errors_are_one_line_value_errors(codec, value, message: str) -> None:
    with pytest.raises(ValueError) as info:
        codec.encode(value)
    assert str(info.value) == message


def test_address_struct_bool_codecs_round_trip() -> None:
    assert IPv4.encode("10.1.2.3") == b"\x0a\x01\x02\x03"
    assert IPv4.decode(b"\x7f\x00\x00\x01") == ipaddress.IPv4Address("127.0.0.1")
    assert IPv6.decode(IPv6.encode("2001:db8::1")) == ipaddress.IPv6Address("2001:db8::1")
    assert Bool.encode(True) == b"\x01" and Bool.decode(b"\x00") is False
    record = Struct("=QI4x", names=("packets", "drops"))
    assert record.size == 16
    decoded = record.decode(record.encode((7, 3)))
    assert decoded.packets == 7 and decoded.drops == 3
    with pytest.raises(ValueError, match="has 2 fields but 3 names"):
        Struct("=QI", names=("a", "b", "c"))


# ---------------------------------------------------------------------------------------------------------
# Hash


@privileged
def test_hash_dict_api() -> None:
    with Hash.create(key=U32, value=U64, max_entries=8, name="counters") as counters:
        assert len(counters) == 0
        counters[1] = 10
        counters[2] = 20
        assert counters[1] == 10
        assert 2 in counters and 3 not in counters
        assert sorted(counters) == [1, 2]
        assert sorted(counters.items()) == [(1, 10), (2, 20)]
        assert sorted(counters.values()) == [10, 20]
        assert len(counters) == 2
        assert counters.get(3) is None and counters.get(3, -1) == -1
        del counters[1]
        assert list(counters.keys()) == [2]
        counters.clear()
        assert len(counters) == 0


@privileged
def test_hash_missing_key_is_keynotfound_and_keyerror() -> None:
    with Hash.create(key=U32, value=U64, max_entries=4, name="counters") as counters:
        with pytest.raises(KeyNotFound) as info:
            counters[7]
        assert isinstance(info.value, KeyError)
        assert str(info.value) == "map_lookup(map='counters', key=7): not found (ENOENT)"
        with pytest.raises(KeyError):
            del counters[7]


@privileged
def test_hash_put_noexist_exist_semantics() -> None:
    with Hash.create(key=U32, value=U64, max_entries=4, name="flags") as m:
        m.put(1, 100, UpdateFlags.NOEXIST)
        with pytest.raises(KeyExists) as exists:
            m.put(1, 200, UpdateFlags.NOEXIST)
        assert "key=1" in str(exists.value) and "(EEXIST)" in str(exists.value)
        assert m[1] == 100  # the refused write changed nothing
        m.put(1, 300, UpdateFlags.EXIST)
        assert m[1] == 300
        with pytest.raises(KeyNotFound):
            m.put(2, 1, UpdateFlags.EXIST)
        assert 2 not in m
        m.put(2, 5)  # ANY creates ...
        m.put(2, 6)  # ... and replaces
        assert m[2] == 6


@privileged
def test_hash_full_raises_mapfull() -> None:
    with Hash.create(key=U32, value=U32, max_entries=2, name="small") as m:
        m[1] = 1
        m[2] = 2
        with pytest.raises(MapFull):
            m[3] = 3
        m[2] = 22  # replacing an existing key needs no room
        assert m[2] == 22


@privileged
def test_value_that_does_not_fit_names_the_map() -> None:
    with Hash.create(key=U32, value=U32, max_entries=2, name="counters") as m:
        with pytest.raises(ValueError) as info:
            m[1] = 2**40
        assert str(info.value) == "map 'counters': value 1099511627776 does not fit U32 (0..4294967295)"
        with pytest.raises(ValueError) as key_info:
            m[-1] = 0
        assert str(key_info.value) == "map 'counters': key -1 does not fit U32 (0..4294967295)"
        assert len(m) == 0


@privileged
def test_struct_values_decode_as_namedtuples() -> None:
    value = Struct("=QI4x", names="packets drops")
    with Hash.create(key=IPv4, value=value, max_entries=4, name="stats") as m:
        m["10.0.0.1"] = (5, 1)
        got = m[ipaddress.IPv4Address("10.0.0.1")]
        assert got == (5, 1) and got.packets == 5 and got.drops == 1
        assert list(m) == [ipaddress.IPv4Address("10.0.0.1")]


@privileged
def test_wrapping_checks_type_and_sizes() -> None:
    with Map.create(MapType.ARRAY, 4, 8, 4, name="arr") as raw:
        with pytest.raises(InvalidArgument) as wrong_type:
            Hash(raw, key=U32, value=U64)
        assert "Hash needs a HASH map, but map 'arr' is a ARRAY" in str(wrong_type.value)
        assert not raw.closed  # the caller still owns a map the wrapper refused
    with Map.create(MapType.HASH, 8, 4, 4, name="h") as raw:
        with pytest.raises(InvalidArgument) as wrong_key:
            Hash(raw, key=U32, value=U32)
        assert "key codec U32 is 4 bytes, but map 'h' has key_size 8" in str(wrong_key.value)
        with pytest.raises(InvalidArgument) as wrong_value:
            Hash(raw, key=U64, value=U64)
        assert "value codec U64 is 8 bytes, but map 'h' has value_size 4" in str(wrong_value.value)


@privileged
def test_close_is_idempotent_and_use_after_close_raises() -> None:
    from sockpolicy import ClosedError

    m = Hash.create(key=U32, value=U32, max_entries=2, name="c")
    m.close()
    m.close()
    assert m.closed
    with pytest.raises(ClosedError):
        m[1] = 1
    with pytest.raises(ClosedError):
        len(m)


# ---------------------------------------------------------------------------------------------------------
# Array


@privileged
def test_array_bounds_len_and_no_delete() -> None:
    with Array.create(value=U64, max_entries=4, name="arr") as arr:
        assert len(arr) == 4
        assert list(arr) == [0, 1, 2, 3]
        assert [arr[i] for i in range(4)] == [0, 0, 0, 0]
        arr[3] = 33
        assert arr[3] == 33 and 3 in arr and 4 not in arr
        with pytest.raises(IndexError) as info:
            arr[4] = 1
        assert str(info.value) == "map 'arr': index 4 out of range (ARRAY of 4 entries: 0..3)"
        with pytest.raises(IndexError):
            arr[4]
        assert arr.get(4, "none") == "none"
        with pytest.raises(TypeError, match="cannot be deleted"):
            del arr[0]
        arr.clear()
        assert dict(arr.items()) == {0: 0, 1: 0, 2: 0, 3: 0}


# ---------------------------------------------------------------------------------------------------------
# per-CPU maps


def _possible_cpus() -> int:
    """Count /sys/devices/system/cpu/possible ("0-3,8"): per-CPU values have one slot per possible CPU."""
    count = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


@privileged
def test_percpu_array_sum_counts_test_runs() -> None:
    runs = 2500
    with ObjectSpec.from_package("test_maps").load() as obj:
        hits = PerCpuArray(obj.take_map("percpu_hits"), value=U64)
        with hits:
            result = obj.programs["count_percpu"].test_run(bytes(64), repeat=runs)
            assert result.retval == 0
            per_cpu = hits[0]
            assert len(per_cpu) == hits.cpus == _possible_cpus()
            assert hits.sum(0) == runs
            obj.programs["count_percpu"].test_run(bytes(64), repeat=1)
            assert hits.sum(0) == runs + 1
            hits.clear()
            assert hits.sum(0) == 0


@privileged
def test_percpu_hash_lists_and_fieldwise_sum() -> None:
    value = Struct("=QQ", names=("packets", "bytes"))
    with PerCpuHash.create(key=U32, value=value, max_entries=4, name="pch") as m:
        cpus = m.cpus
        m[1] = [(i + 1, 100 * (i + 1)) for i in range(cpus)]
        expected = (cpus * (cpus + 1) // 2, 100 * cpus * (cpus + 1) // 2)
        total = m.sum(1)
        assert total == expected and total.packets == expected[0]
        m[2] = (3, 4)  # one value goes to every CPU
        assert m[2] == [(3, 4)] * cpus
        with pytest.raises(
            ValueError, match=f"{cpus + 1} per-CPU values given, this machine has {cpus} CPUs"
        ):
            m[3] = [(0, 0)] * (cpus + 1)
        with pytest.raises(KeyNotFound):
            m.sum(9)


# ---------------------------------------------------------------------------------------------------------
# LPM tries


@privileged
def test_lpm_v4_longest_match_overlapping_prefixes() -> None:
    with LpmTrie.create(family=4, value=U32, max_entries=16, name="lpm4") as trie:
        for label, net in enumerate(["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32"], start=1):
            trie[net] = label
        net = ipaddress.IPv4Network
        assert trie.longest_match("10.1.2.3") == (net("10.1.2.3/32"), 4)
        assert trie.longest_match("10.1.2.4") == (net("10.1.2.0/24"), 3)
        assert trie.longest_match("10.1.9.9") == (net("10.1.0.0/16"), 2)
        assert trie.longest_match("10.200.0.1") == (net("10.0.0.0/8"), 1)
        assert trie.longest_match("11.0.0.1") is None
        assert trie.match("10.1.2.77") == 3
        # Exact (dict) semantics for [] and in, although the kernel lookup itself is longest-prefix:
        assert "10.1.0.0/16" in trie and "10.1.1.0/24" not in trie
        with pytest.raises(KeyNotFound):
            trie["10.1.1.0/24"]
        assert len(trie) == 4
        del trie["10.1.2.0/24"]
        assert trie.longest_match("10.1.2.4") == (net("10.1.0.0/16"), 2)
        with pytest.raises(KeyNotFound):
            del trie["10.1.2.0/24"]
        with pytest.raises(ValueError, match="2001:db8::/32 is an IPv6 network; this trie holds IPv4"):
            trie["2001:db8::/32"] = 1
        with pytest.raises(ValueError, match="has host bits set"):
            trie["10.1.2.3/8"] = 1


@privileged
def test_lpm_v6_longest_match() -> None:
    with LpmTrie.create(family=6, value=U32, max_entries=16, name="lpm6") as trie:
        trie["2001:db8::/32"] = 32
        trie["2001:db8:1::/48"] = 48
        trie["2001:db8:1:2::/64"] = 64
        trie["2001:db8:1:2::5/128"] = 128
        net = ipaddress.IPv6Network
        assert trie.longest_match("2001:db8:1:2::5") == (net("2001:db8:1:2::5/128"), 128)
        assert trie.longest_match("2001:db8:1:2::6") == (net("2001:db8:1:2::/64"), 64)
        assert trie.longest_match("2001:db8:1:3::1") == (net("2001:db8:1::/48"), 48)
        assert trie.longest_match("2001:db8:ffff::1") == (net("2001:db8::/32"), 32)
        assert trie.longest_match("2001:db9::1") is None
        assert sorted(trie.values()) == [32, 48, 64, 128]


@privileged
def test_lpm_with_header_keeps_headers_apart() -> None:
    tcp, udp = 6, 17
    with LpmTrie.create(family=4, value=U32, max_entries=8, name="proto", header=U8) as trie:
        assert trie.map.key_size == 4 + 1 + 4
        trie[(tcp, "192.0.2.0/24")] = 1
        trie[(udp, "192.0.2.0/25")] = 2
        trie[(tcp, "0.0.0.0/0")] = 3
        net = ipaddress.IPv4Network
        assert trie.longest_match((tcp, "192.0.2.1")) == ((tcp, net("192.0.2.0/24")), 1)
        assert trie.longest_match((udp, "192.0.2.1")) == ((udp, net("192.0.2.0/25")), 2)
        assert trie.longest_match((udp, "192.0.2.200")) is None  # the tcp /0 does not cover udp
        assert trie.longest_match((tcp, "198.51.100.1")) == ((tcp, net("0.0.0.0/0")), 3)
        assert (udp, "192.0.2.0/25") in trie


# ---------------------------------------------------------------------------------------------------------
# pinning


_CHILD = textwrap.dedent(
    """
    import sys
    from sockpolicy.maps import Hash, U32, U64
    with Hash.from_pin(sys.argv[1], key=U32, value=U64) as m:
        print(m[1])
        m[2] = 222
    """
)


@privileged
def test_pinned_map_is_shared_with_a_second_process(pin_dir: Path) -> None:
    path = pin_dir / "shared"
    with Hash.create(key=U32, value=U64, max_entries=4, name="shared") as m:
        m[1] = 111
        m.pin(path)
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, cwd=REPO, timeout=30
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == "111"  # the child read what we wrote ...
        assert m[2] == 222  # ... and we see what it wrote
    with Hash.from_pin(path, key=U32, value=U64) as again:  # the pin outlives our fd
        assert dict(again.items()) == {1: 111, 2: 222}
    with pytest.raises(InvalidArgument, match="Array needs a ARRAY map, but map 'shared' is a HASH"):
        Array.from_pin(path, value=U64)


@privileged
def test_pin_outside_bpffs_raises(tmp_path: Path) -> None:
    with Hash.create(key=U32, value=U32, max_entries=2, name="p") as m, pytest.raises(BpffsNotMounted):
        m.pin(tmp_path / "nope")


@privileged
def test_from_pin_missing_raises_keynotfound(pin_dir: Path) -> None:
    with pytest.raises(KeyNotFound):
        Hash.from_pin(pin_dir / "absent", key=U32, value=U32)
