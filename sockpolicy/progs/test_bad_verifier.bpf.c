// SPDX-License-Identifier: GPL-2.0
// A program the verifier MUST reject, for tests/test_objects.py (VerifierError carries the log).
// It compiles cleanly; only the verifier sees the bug.  Nothing in sockpolicy loads this object.
// A HASH map, not an ARRAY: recent verifiers know an in-bounds constant-key ARRAY lookup cannot be NULL.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} values SEC(".maps");

SEC("socket")
int deref_without_null_check(struct __sk_buff *skb)
{
    __u32 key = 0;
    __u64 *value = bpf_map_lookup_elem(&values, &key);

    // Deliberate: bpf_map_lookup_elem may return NULL, and the verifier refuses the dereference.
    return (int)*value;
}

char _license[] SEC("license") = "GPL";
