// SPDX-License-Identifier: GPL-2.0
// The sockpolicy dispatcher: an SK_LOOKUP program that steers new TCP connections and UDP datagrams, by
// (protocol, destination prefix, destination port range), to one socket per label.
//
// The tables are computed in userspace (sockpolicy/_dispatcher.py, docs/dispatcher.md); the program only
// does two map lookups to find the label:
//   1. port_class[gen][port] -> class id (0 = no binding covers this port: fast SK_PASS);
//   2. LPM lookup of {gen, proto, class, family, addr} in `trie` -> label id.  Userspace inserts, for every
//      (proto, family, prefix) and every port class, the label of the narrowest range of that prefix
//      covering the class, so the longest match is "longest prefix, then narrowest port range".
// Bindings over ALL ports (1-65535) are kept out of the classes: they live under the reserved class 0
// and are found with a second LPM lookup.  Otherwise every catch-all prefix would need one entry per
// class that other prefixes' ranges create.  The longer of the two matched prefixes wins; on equal
// prefixes the class match wins (its range is narrower than 1-65535).
// `gen` (0 or 1) is read once from `config`; userspace fills the inactive generation, then flips it, so a
// lookup never sees a half-written table.  No loops: the verifier is happy on 5.9+.
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define EAFNOSUPPORT 97

#define NUM_PORTS 65536
#define LAYOUT_VERSION 2
// Bits of the trie key before the address: gen (8) + proto (8) + class (16) + family (8).
#define KEY_HEADER_BITS 40

struct config {
    __u32 active_gen;  // 0 or 1: which generation of port_class and trie the program uses
    __u32 dirty;       // userspace only: a writer started an update and has not finished it
    __u64 serial;      // userspace only: incremented by every completed update
    __u32 version;     // userspace only: LAYOUT_VERSION of the writer that created the maps
    __u32 _pad;
};

// One whole generation of the port -> class table in one array value, so that userspace writes a
// generation with a single syscall.
struct port_table {
    __u16 cls[NUM_PORTS];
    __u32 has_all_ports; // some binding covers 1-65535 (class 0 entries exist in this generation)
    __u32 _pad;
};

struct trie_key {
    __u32 prefixlen;
    __u8 gen;
    __u8 proto;    // IPPROTO_TCP or IPPROTO_UDP
    __u16 cls;     // port class, network byte order (LPM keys compare bytes in order)
    __u8 family;   // 4 or 6: keeps an IPv6 ::/0 binding from matching IPv4 traffic
    __u8 addr[16]; // IPv4 in the first 4 bytes
} __attribute__((packed));

struct trie_value {
    __u32 label_id;
    __u32 prefixlen; // of the binding's address prefix, to compare the two lookups' matches
};

struct counters {
    __u64 lookups; // a binding matched (index 0: lookups that matched no binding)
    __u64 misses;  // the label had no usable socket: dropped
    __u64 errors;  // bpf_sk_assign failed: dropped
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct config);
} config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, struct port_table);
} port_class SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, 1 << 20);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct trie_key);
    __type(value, struct trie_value);
} trie SEC(".maps");

// Socket per (label, proto, family): slot = label_id * 4 + is_udp * 2 + is_v6.
struct {
    __uint(type, BPF_MAP_TYPE_SOCKMAP);
    __uint(max_entries, 16384 * 4);
    __type(key, __u32);
    __type(value, __u64);
} sockets SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 16384);
    __type(key, __u32);
    __type(value, struct counters);
} counters SEC(".maps");

// Userspace-only maps, created with the object so that the whole state lives in one pinned directory.
struct label_name {
    char name[32];
};

struct binding_key {
    __u8 proto;
    __u8 family;
    __u8 prefixlen;
    __u8 _pad;
    __u16 lo;
    __u16 hi;
    __u8 addr[16];
};

struct sock_meta {
    __u64 cookie;
    __u32 v6only;
    __u32 _pad;
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);
    __type(key, struct label_name);
    __type(value, __u32);
} labels SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);
    __type(key, __u32);
    __type(value, struct label_name);
} label_names SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1 << 20);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct binding_key);
    __type(value, __u32);
} bindings SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384 * 4);
    __type(key, __u32);
    __type(value, struct sock_meta);
} sock_meta SEC(".maps");

static __always_inline void count(__u32 label_id, int which)
{
    struct counters *c = bpf_map_lookup_elem(&counters, &label_id);

    if (!c)
        return;
    // Per-CPU slot: plain increments are enough (no other CPU writes it; preemption is disabled).
    if (which == 0)
        c->lookups++;
    else if (which == 1)
        c->misses++;
    else
        c->errors++;
}

SEC("sk_lookup")
int dispatch(struct bpf_sk_lookup *ctx)
{
    __u32 zero = 0, is_udp, is_v6, gen, port, slot;
    struct config *cfg;
    struct port_table *table;
    struct trie_value *val = NULL, *all;
    struct trie_key key = {};
    struct bpf_sock *sk;
    __u16 cls;
    long err;

    // Only TCP and UDP are steered; anything else takes the normal socket lookup.
    if (ctx->protocol == IPPROTO_TCP)
        is_udp = 0;
    else if (ctx->protocol == IPPROTO_UDP)
        is_udp = 1;
    else
        return SK_PASS;

    if (ctx->family == AF_INET)
        is_v6 = 0;
    else if (ctx->family == AF_INET6)
        is_v6 = 1;
    else
        return SK_PASS;

    cfg = bpf_map_lookup_elem(&config, &zero);
    if (!cfg)
        return SK_PASS;
    gen = cfg->active_gen & 1;

    table = bpf_map_lookup_elem(&port_class, &gen);
    if (!table)
        return SK_PASS;
    port = ctx->local_port; // host byte order
    cls = table->cls[port & (NUM_PORTS - 1)];
    if (cls == 0 && (!table->has_all_ports || port == 0)) {
        // No binding covers this port: normal socket lookup.
        count(0, 0);
        return SK_PASS;
    }

    key.gen = gen;
    key.proto = is_udp ? IPPROTO_UDP : IPPROTO_TCP;
    if (is_v6) {
        key.prefixlen = KEY_HEADER_BITS + 128;
        key.family = 6;
        __builtin_memcpy(&key.addr[0], &ctx->local_ip6[0], 4);
        __builtin_memcpy(&key.addr[4], &ctx->local_ip6[1], 4);
        __builtin_memcpy(&key.addr[8], &ctx->local_ip6[2], 4);
        __builtin_memcpy(&key.addr[12], &ctx->local_ip6[3], 4);
    } else {
        key.prefixlen = KEY_HEADER_BITS + 32;
        key.family = 4;
        __builtin_memcpy(&key.addr[0], &ctx->local_ip4, 4);
    }

    if (cls) {
        key.cls = bpf_htons(cls);
        val = bpf_map_lookup_elem(&trie, &key);
    }
    if (table->has_all_ports && port != 0) {
        key.cls = 0; // the all-ports bindings
        all = bpf_map_lookup_elem(&trie, &key);
        if (all && (!val || all->prefixlen > val->prefixlen))
            val = all;
    }
    if (!val) {
        // The port is bound somewhere, but not for this protocol and address: normal socket lookup.
        count(0, 0);
        return SK_PASS;
    }
    count(val->label_id, 0);

    slot = val->label_id * 4 + is_udp * 2 + is_v6;
    sk = bpf_map_lookup_elem(&sockets, &slot);
    if (!sk && !is_v6) {
        // An IPv4 packet may go to the label's dual-stack IPv6 socket (IPV6_V6ONLY=0).
        slot += 1;
        sk = bpf_map_lookup_elem(&sockets, &slot);
    }
    if (!sk) {
        // The binding claims this destination but its label has no socket: refuse (client sees
        // ECONNREFUSED) rather than let an unrelated socket bound to the address take it.
        count(val->label_id, 1);
        return SK_DROP;
    }

    // Flags 0: the kernel still picks inside the socket's SO_REUSEPORT group.
    err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err == -EAFNOSUPPORT && !is_v6) {
        // The only socket is an IPV6_V6ONLY one, which cannot take IPv4: same as having no socket.
        count(val->label_id, 1);
        return SK_DROP;
    }
    if (err) {
        // E.g. a registered UDP socket was connect()ed later, or another program assigned first:
        // fail closed, as for a missing socket.
        count(val->label_id, 2);
        return SK_DROP;
    }
    // Redirect: the assigned socket receives the connection/datagram.
    return SK_PASS;
}

char _license[] SEC("license") = "GPL";
