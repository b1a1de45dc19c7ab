// SPDX-License-Identifier: GPL-2.0
// Small programs used by the foundation's own tests: a socket filter for BPF_PROG_TEST_RUN, an SK_MSG and
// SK_SKB pass-through for attach tests, and maps of every kind the typed wrappers support.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 16);
    __type(key, __u32);
    __type(value, __u64);
} socks SEC(".maps");

// Returns the packet length and counts calls under key 0: a deterministic result for BPF_PROG_TEST_RUN.
SEC("socket")
int count_packets(struct __sk_buff *skb)
{
    __u32 key = 0;
    __u64 one = 1, *value = bpf_map_lookup_elem(&counters, &key);
    if (value)
        __sync_fetch_and_add(value, 1);
    else
        bpf_map_update_elem(&counters, &key, &one, BPF_ANY);
    return skb->len;
}

// Lets every message through unchanged.
SEC("sk_msg")
int msg_pass(struct sk_msg_md *msg)
{
    return SK_PASS;
}

// Lets every received skb through unchanged.
SEC("sk_skb")
int skb_pass(struct __sk_buff *skb)
{
    return SK_PASS;
}

char _license[] SEC("license") = "GPL";
