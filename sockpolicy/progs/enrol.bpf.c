// SPDX-License-Identifier: GPL-2.0
// Enrolment of a cgroup's TCP sockets into the rule maps of rules.bpf.c, at connection establishment.
//
// Attached to a cgroup v2 as BPF_CGROUP_SOCK_OPS.  ACTIVE_ESTABLISHED_CB (connect() completed) and
// PASSIVE_ESTABLISHED_CB (accept()ed child) run before the application can send or receive a byte, so
// every byte of the connection goes through the SK_MSG / SK_SKB programs.  The maps are shared with the
// rules object (loaded with reuse_maps); a socket leaves them by itself when it closes, and this
// program keeps no per-socket state of its own.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define ENROL_POLICY 1 // enrol into `policy` (sendmsg rules)
#define ENROL_FRAMED 2 // enrol into `framed` (received framed-message rules)

// The loader passes the rules object's maps (same definitions, one header).
#include "enrol_maps.h"

// [0]: ENROL_* flags for this attachment (one object is loaded per cgroup).
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} enrol_config SEC(".maps");

// [0] sockets enrolled, [1] enrolments that failed (map full, ...).
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u64);
} enrol_stats SEC(".maps");

static __always_inline void bump(__u32 key)
{
    __u64 *value = bpf_map_lookup_elem(&enrol_stats, &key);
    if (value)
        __sync_fetch_and_add(value, 1);
}

SEC("sockops")
int enrol(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;
    __u32 zero = 0;
    __u32 *flags = bpf_map_lookup_elem(&enrol_config, &zero);
    if (!flags)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    long err = 0;
    if (*flags & ENROL_POLICY)
        err |= bpf_sock_hash_update(skops, &policy, &cookie, BPF_NOEXIST);
    if (*flags & ENROL_FRAMED)
        err |= bpf_sock_hash_update(skops, &framed, &cookie, BPF_NOEXIST);
    bump(err ? 1 : 0);
    return 1;
}

char _license[] SEC("license") = "GPL";
