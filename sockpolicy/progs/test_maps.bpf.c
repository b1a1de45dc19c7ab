// SPDX-License-Identifier: GPL-2.0
// Programs used by tests/test_maps.py, test_objects.py and test_sockmap.py (never loaded by sockpolicy
// itself): a per-CPU counter for BPF_PROG_TEST_RUN, an SK_MSG drop verdict, a sock_ops program counting
// established callbacks, and an SK_LOOKUP pass-through used for wrong-target attach checks.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} percpu_hits SEC(".maps");

// Index 0: active (connect) side established, 1: passive (accept) side established.
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u64);
} established SEC(".maps");

// Adds one to this CPU's slot; no atomics needed because a per-CPU slot is only touched by its own CPU.
SEC("socket")
int count_percpu(struct __sk_buff *skb)
{
    __u32 key = 0;
    __u64 *value = bpf_map_lookup_elem(&percpu_hits, &key);
    if (value)
        *value += 1;
    return 0;
}

// Refuses every message: the sender's sendmsg() fails with EACCES.
SEC("sk_msg")
int msg_drop(struct sk_msg_md *msg)
{
    return SK_DROP;
}

SEC("sockops")
int count_established(struct bpf_sock_ops *ops)
{
    __u32 key;
    __u64 *value;

    if (ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        key = 0;
    else if (ops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        key = 1;
    else
        return 1;
    value = bpf_map_lookup_elem(&established, &key);
    if (value)
        __sync_fetch_and_add(value, 1);
    return 1;
}

SEC("sk_lookup")
int lookup_pass(struct bpf_sk_lookup *ctx)
{
    return SK_PASS;
}

char _license[] SEC("license") = "GPL";
