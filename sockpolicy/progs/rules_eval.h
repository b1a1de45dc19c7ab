// SPDX-License-Identifier: GPL-2.0
// The kernel rule tables and their evaluation, shared by rules.bpf.c (SK_MSG and framed SK_SKB policing)
// and splice.bpf.c (the splice verdict judges every received skb of a spliced connection with the same
// rule set).  The loaders hand one object's maps to the other (ObjectSpec.reuse_maps: Splicer.open reuses
// an Enforcer's config, slots, rules, counters and targets), which only works while both definitions are
// identical: hence one definition, here.  The layouts must match _rules.py.
#ifndef SOCKPOLICY_RULES_EVAL_H
#define SOCKPOLICY_RULES_EVAL_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_RULES 64
#define RULES_GENS 8 // power of two
#define SLOT_STRIDE (MAX_RULES + 1) // counters: one per rule, then one for "no rule matched"
#define PREFIX_MAX 64
#define MAX_RANGES 4

#define ACT_PASS 0
#define ACT_DROP 1
#define ACT_REDIRECT 2

#define RULE_F_INGRESS 1 // redirect onto the target's receive queue instead of out of it
#define RULE_F_SEND 2    // rule applies to sent messages (SK_MSG)
#define RULE_F_RECEIVE 4 // rule applies to received framed messages (SK_SKB)

struct port_range {
    __u16 lo;
    __u16 hi;
};

// Must match _rules.py (_RULE_FORMAT).
struct rule {
    struct port_range lports[MAX_RANGES]; // n_lports == 0: any local port
    struct port_range rports[MAX_RANGES]; // n_rports == 0: any remote port
    __u32 n_lports;
    __u32 n_rports;
    __u32 len_min;
    __u32 len_max;
    __u32 prefix_len; // 0: no payload match; bytes past prefix_len have a zero mask
    __u32 action;
    __u32 flags;
    __u32 target; // label id in `targets`
    __u32 apply_bytes;
    __u32 cork_bytes;
    __u64 prefix[PREFIX_MAX / 8]; // already masked
    __u64 mask[PREFIX_MAX / 8];
};

// Must match _rules.py (_SLOT_FORMAT).
struct slot_meta {
    __u32 nrules;
    __u32 max_prefix;     // longest prefix of any rule in the slot: how much payload to read
    __u32 default_action; // ACT_PASS or ACT_DROP when no rule matches
    __u32 frame_size;     // 0: no framing (each skb is one message), else 2 or 4 (big-endian length)
    __u32 frame_offset;   // offset of the length field from the start of a message
    __u32 frame_adjust;   // bytes of header before the payload the length counts: offset + size
    __u32 frame_max;      // largest accepted frame (header included); a larger one is an error
    __u32 state;          // userspace bookkeeping: 0 free, 1 active, 2 retired awaiting a grace period
    __u64 gen;            // userspace bookkeeping: the generation number written into this slot
};

struct config {
    __u32 slot; // active slot, 0 .. RULES_GENS - 1
    __u32 pad;
};

struct counter {
    __u64 msgs;
    __u64 bytes;
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct config);
} config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, RULES_GENS);
    __type(key, __u32);
    __type(value, struct slot_meta);
} slots SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, RULES_GENS * MAX_RULES);
    __type(key, __u32);
    __type(value, struct rule);
} rules SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, RULES_GENS * SLOT_STRIDE);
    __type(key, __u32);
    __type(value, struct counter);
} counters SEC(".maps");

// Redirect targets, keyed by label id (crc32 of the label's name).
struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 4096);
    __type(key, __u32);
    __type(value, __u64);
} targets SEC(".maps");

// What a rule is matched against: ports, length, and up to PREFIX_MAX payload bytes (zero-padded).
struct view {
    __u32 lport;
    __u32 rport;
    __u32 len;
    __u32 avail; // payload bytes copied into buf
    __u64 buf[PREFIX_MAX / 8];
};

static __always_inline int in_ranges(const struct port_range *ranges, __u32 n, __u32 port)
{
    if (n == 0)
        return 1;
#pragma unroll
    for (int i = 0; i < MAX_RANGES; i++)
        if (i < n && port >= ranges[i].lo && port <= ranges[i].hi)
            return 1;
    return 0;
}

static __always_inline int rule_matches(const struct rule *r, const struct view *v, __u32 direction)
{
    if (!(r->flags & direction))
        return 0;
    if (v->len < r->len_min || v->len > r->len_max)
        return 0;
    if (!in_ranges(r->lports, r->n_lports, v->lport) || !in_ranges(r->rports, r->n_rports, v->rport))
        return 0;
    if (r->prefix_len) {
        if (v->avail < r->prefix_len)
            return 0;
#pragma unroll
        for (int w = 0; w < PREFIX_MAX / 8; w++)
            if ((v->buf[w] & r->mask[w]) != r->prefix[w])
                return 0;
    }
    return 1;
}

// Returns the index of the first matching rule of the slot, or MAX_RULES when none matches.
static __always_inline __u32 first_match(__u32 slot, __u32 nrules, const struct view *v, __u32 direction,
                                         struct rule **found)
{
    for (__u32 i = 0; i < MAX_RULES; i++) {
        if (i >= nrules)
            break;
        __u32 key = slot * MAX_RULES + i;
        struct rule *r = bpf_map_lookup_elem(&rules, &key);
        if (!r)
            break;
        if (rule_matches(r, v, direction)) {
            *found = r;
            return i;
        }
    }
    return MAX_RULES;
}

static __always_inline void count(__u32 slot, __u32 index, __u32 bytes)
{
    __u32 key = slot * SLOT_STRIDE + index;
    struct counter *c = bpf_map_lookup_elem(&counters, &key);
    if (c) {
        // Per-CPU slot, but a preempted sender on the same CPU could interleave: add atomically.
        __sync_fetch_and_add(&c->msgs, 1);
        __sync_fetch_and_add(&c->bytes, bytes);
    }
}

static __always_inline struct slot_meta *active_slot(__u32 *slot)
{
    __u32 zero = 0;
    struct config *cfg = bpf_map_lookup_elem(&config, &zero);
    if (!cfg)
        return NULL;
    *slot = cfg->slot & (RULES_GENS - 1);
    return bpf_map_lookup_elem(&slots, slot);
}

// Judges [off, off + len) of a received skb (SK_SKB programs) against the rule set in `slot` (from
// active_slot, read once per message by the caller), counts it in the matching rule's counters (or "no
// rule matched"), and returns the rule (NULL: none matched, the slot's default applies).
static __always_inline struct rule *judge_skb(struct __sk_buff *skb, __u32 slot, struct slot_meta *meta,
                                              __u32 off, __u32 len)
{
    struct view v = {};
    v.len = len;
    v.lport = skb->local_port;
    v.rport = bpf_ntohl(skb->remote_port);

    __u32 need = meta->max_prefix;
    if (need > PREFIX_MAX)
        need = PREFIX_MAX;
    if (need > v.len)
        need = v.len;
    if (need == PREFIX_MAX) {
        if (bpf_skb_load_bytes(skb, off, v.buf, PREFIX_MAX) == 0)
            v.avail = PREFIX_MAX;
    } else if (need) {
        // Constant-size loads only (the verifier cannot bound a variable size here).
        __u8 *buf = (__u8 *)v.buf;
#pragma unroll
        for (int i = 0; i < PREFIX_MAX; i++)
            if (i < need && bpf_skb_load_bytes(skb, off + i, buf + i, 1) == 0)
                v.avail = i + 1;
    }

    struct rule *r = NULL;
    __u32 index = first_match(slot, meta->nrules, &v, RULE_F_RECEIVE, &r);
    count(slot, index, v.len);
    return r;
}

#endif
