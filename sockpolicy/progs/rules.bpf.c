// SPDX-License-Identifier: GPL-2.0
// Per-message policy evaluated in the kernel (sockpolicy._rules compiles the rule set into these maps).
//
//  - rules_msg (SK_MSG, attached to the `policy` SOCKHASH): runs on every sendmsg of an enrolled socket.
//  - rules_parser + rules_skb (SK_SKB stream parser / verdict, attached to the `framed` SOCKHASH): run once
//    per length-prefixed message received by a socket enrolled for framed receive policing.
//
// Rule sets are kept in a ring of RULES_GENS generations: `rules` holds RULES_GENS slots of MAX_RULES rules,
// `slots` the per-slot header, and `config` which slot is active.  Userspace writes a complete rule set
// into a free slot, then flips `config.slot` (one aligned 4-byte store).  Before a retired slot is read
// for its final counters or reused, userspace waits for an RCU grace period (an update of the `barrier`
// map-in-map makes the kernel call synchronize_rcu), so no program still runs against it.  A program
// reads the slot number once, so every message is evaluated against exactly one complete rule set, and
// counted in that slot's counters.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "rules_eval.h"
#include "enrol_maps.h"


// Never read by a program: updating a map-in-map from userspace waits for an RCU grace period, which is
// how the rule-set writer knows that no program still uses the slot it just deactivated.
struct barrier_inner {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} barrier_inner SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
    __uint(max_entries, 1);
    __type(key, __u32);
    __array(values, struct barrier_inner);
} barrier SEC(".maps") = {
    .values = {[0] = &barrier_inner},
};

// Never read by a program: the JSON description of the rule set in each slot (names, labels, source),
// so that another process (`sockpolicy rules`) can show what is loaded.
struct source {
    __u32 len;
    __u8 data[65532];
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, RULES_GENS);
    __type(key, __u32);
    __type(value, struct source);
} sources SEC(".maps");

// [0] bpf_msg_pull_data calls (a prefix straddled scatterlist elements), [1] of them failed,
// [2] framed-receive resyncs (the per-socket frame position was missing or inconsistent, see `frames`).
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u64);
} pulls SEC(".maps");

static __always_inline void bump_pulls(__u32 key)
{
    __u64 *value = bpf_map_lookup_elem(&pulls, &key);
    if (value)
        __sync_fetch_and_add(value, 1);
}

// Where the current received frame starts, per framed socket (keyed by socket cookie).
//
// strparser hands the parser and the verdict the whole received skb (a clone of the skb on the TCP
// receive queue, or a head with the following skbs chained to it); the message it is working on starts
// at strp_msg(skb)->offset, which a program cannot read.  skb->len and bpf_skb_load_bytes(skb, 0, ...)
// count from the start of that skb, not from the message (observed on 6.18, see docs/rules.md).  So the
// programs track the message start themselves, as a TCP sequence number:
//  - the first parser call of a message gets a clone of a TCP skb, whose control block still holds
//    TCP_SKB_CB(skb)->seq and ->end_seq in the first 8 bytes of skb->cb: in SK_SKB programs that is
//    __sk_buff cb[0] and cb[1] (strparser keeps its own state after the 20 bytes BPF programs see).
//    The message starts at `next` (where the previous message ended), i.e. at next - seq in this skb;
//  - a parser call that returned 0 (header not complete) is retried on the same head, grown at its
//    end (or wrapped by a new head that chains it first, whose cb is zeroed), so the offset is kept;
//  - the verdict judges [off, off + len) as the parser stored it.
// Sequence numbers, not lengths, because TCP may coalesce new data into the skb strparser is reading,
// so "the next message starts at offset 0 of a new skb" does not hold.  cb[1] - cb[0] must be skb->len
// (+1 with a FIN) for cb to be trusted; otherwise the programs resync at the skb's start and count it.
// BPF_MAP_TYPE_SK_STORAGE would free this state with the socket, but SK_SKB programs cannot call
// bpf_sk_storage_get on 6.18 ("program of this type cannot use helper"): an LRU hash keyed by cookie
// (unique for the kernel's lifetime) is used; entries of closed sockets are the ones evicted.
#define FRAME_IDLE 0   // the next parser call starts a new message
#define FRAME_HEADER 1 // the parser returned 0: the next call retries the same message
#define FRAME_LENGTH 2 // the parser returned off/len: the next verdict judges that message

struct frame_state {
    __u32 phase;
    __u32 off;   // offset of the current message from the start of the skb the programs see
    __u32 len;   // its length (FRAME_LENGTH)
    __u32 start; // TCP sequence number of its first byte (valid when `known`)
    __u32 next;  // TCP sequence number where the next message starts (valid when `known`)
    __u16 known; // start/next are valid
    __u16 seen;  // the parser ran for this socket before
};

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, struct frame_state);
} frames SEC(".maps");

SEC("sk_msg")
int rules_msg(struct sk_msg_md *msg)
{
    __u32 slot;
    struct slot_meta *meta = active_slot(&slot);
    if (!meta)
        return SK_PASS; // no rule set loaded yet

    struct view v = {};
    v.len = msg->size;
    v.lport = msg->local_port;
    v.rport = bpf_ntohl(msg->remote_port);

    __u32 need = meta->max_prefix;
    if (need > PREFIX_MAX)
        need = PREFIX_MAX;
    if (need > v.len)
        need = v.len;
    if (need) {
        void *data = msg->data, *end = msg->data_end;
        if (data + need > end) {
            // The prefix straddles scatterlist elements: make [0, need) linear.
            bump_pulls(0);
            if (bpf_msg_pull_data(msg, 0, need, 0))
                bump_pulls(1); // prefix rules then see only the bytes available
            data = msg->data;
            end = msg->data_end;
        }
        __u8 *buf = (__u8 *)v.buf;
        for (int i = 0; i < PREFIX_MAX; i++) {
            if (i >= need || data + i + 1 > end)
                break;
            buf[i] = ((__u8 *)data)[i];
            v.avail = i + 1;
        }
    }

    struct rule *r = NULL;
    __u32 index = first_match(slot, meta->nrules, &v, RULE_F_SEND, &r);
    // With apply_bytes the verdict covers only the next apply_bytes bytes: count those.
    count(slot, index, (r && r->apply_bytes && r->apply_bytes < v.len) ? r->apply_bytes : v.len);
    if (!r) {
        // No rule matched: the rule set's default; a default drop fails the sender's sendmsg (EACCES).
        return meta->default_action == ACT_DROP ? SK_DROP : SK_PASS;
    }
    if (r->apply_bytes)
        bpf_msg_apply_bytes(msg, r->apply_bytes);
    if (r->cork_bytes)
        bpf_msg_cork_bytes(msg, r->cork_bytes);
    if (r->action == ACT_DROP)
        return SK_DROP; // Drop rule: the data is freed and the sender's sendmsg fails with EACCES
    if (r->action == ACT_REDIRECT) {
        __u32 key = r->target;
        // Redirect rule: out of the labelled socket, or onto its receive queue with BPF_F_INGRESS.
        // A label with no socket makes the helper return SK_DROP (the sender sees EACCES).
        return bpf_msg_redirect_hash(msg, &targets, &key, (r->flags & RULE_F_INGRESS) ? BPF_F_INGRESS : 0);
    }
    return SK_PASS;
}

static __always_inline struct frame_state *frame_state(struct __sk_buff *skb, __u64 *cookie)
{
    *cookie = bpf_get_socket_cookie(skb);
    struct frame_state *st = bpf_map_lookup_elem(&frames, cookie);
    if (!st) {
        // First message of this socket: it starts at offset 0 (nothing consumed before enrolment).
        struct frame_state init = {};
        bpf_map_update_elem(&frames, cookie, &init, BPF_ANY);
        st = bpf_map_lookup_elem(&frames, cookie);
    }
    return st;
}

SEC("sk_skb")
int rules_parser(struct __sk_buff *skb)
{
    __u64 cookie;
    struct frame_state *st = frame_state(skb, &cookie);
    __u32 off = 0;
    if (st) {
        if (st->phase == FRAME_HEADER) {
            off = st->off; // retry of the same message on a grown head
        } else {
            __u32 seq = skb->cb[0], span = skb->cb[1] - seq;
            int seq_ok = span == skb->len || span == skb->len + 1;
            if (st->known && seq_ok && st->next - seq < skb->len)
                off = st->next - seq;
            else if (st->seen)
                bump_pulls(2); // lost track: resync at the start of this skb
            // else: the socket's first message, at the start of the first skb strparser reads
            st->start = seq + off;
            st->known = seq_ok;
            st->seen = 1;
        }
        st->off = off;
        st->phase = FRAME_IDLE;
    }
    __u32 avail = skb->len - off;

    __u32 slot;
    struct slot_meta *meta = active_slot(&slot);
    __u64 total;
    if (!meta || meta->frame_size == 0) {
        total = avail; // unframed: the rest of what arrived is one message
    } else {
        __u32 foff = meta->frame_offset;
        if (foff > 4096)
            return -1; // cannot happen: userspace bounds the offset
        __u32 header = foff + meta->frame_size;
        if (avail < header) {
            if (st)
                st->phase = FRAME_HEADER;
            return 0; // need more data to read the length
        }
        __u32 length;
        if (meta->frame_size == 2) {
            __u16 be16;
            if (bpf_skb_load_bytes(skb, off + foff, &be16, 2))
                return -1;
            length = bpf_ntohs(be16);
        } else {
            __u32 be32;
            if (bpf_skb_load_bytes(skb, off + foff, &be32, 4))
                return -1;
            length = bpf_ntohl(be32);
        }
        total = (__u64)meta->frame_adjust + length;
        if (total > meta->frame_max || total == 0)
            return -1; // an oversized frame is a stream error (the socket gets EMSGSIZE-like failure)
    }
    if (st) {
        st->len = total;
        st->next = st->start + total;
        st->phase = FRAME_LENGTH;
    }
    return total;
}

SEC("sk_skb")
int rules_skb(struct __sk_buff *skb)
{
    // The message is [off, off + len) of the skb (see `frames`).
    __u64 cookie = bpf_get_socket_cookie(skb);
    struct frame_state *st = bpf_map_lookup_elem(&frames, &cookie);
    __u32 off = 0, len = skb->len;
    if (st && st->phase == FRAME_LENGTH && st->len <= skb->len && st->off <= skb->len - st->len) {
        off = st->off;
        len = st->len;
    } else {
        bump_pulls(2); // no parser state: judge the skb from its start (as if one message per skb)
        if (st)
            st->known = 0;
    }
    if (st)
        st->phase = FRAME_IDLE;

    __u32 slot;
    struct slot_meta *meta = active_slot(&slot);
    if (!meta)
        return SK_PASS; // no rule table readable
    struct rule *r = judge_skb(skb, slot, meta, off, len);
    if (!r) {
        // No rule matched: the rule set's default; a default drop discards the received message.
        return meta->default_action == ACT_DROP ? SK_DROP : SK_PASS;
    }
    if (r->action == ACT_DROP)
        return SK_DROP; // Drop rule: the received message is discarded; the reader never sees it
    if (r->action == ACT_REDIRECT) {
        __u32 key = r->target;
        // Redirect rule: transmit out of the labelled socket (splice), or queue it for that socket's
        // reader with BPF_F_INGRESS; a label with no socket makes the helper return SK_DROP.
        return bpf_sk_redirect_hash(skb, &targets, &key, (r->flags & RULE_F_INGRESS) ? BPF_F_INGRESS : 0);
    }
    return SK_PASS;
}

char _license[] SEC("license") = "GPL";
