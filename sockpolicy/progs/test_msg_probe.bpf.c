// SPDX-License-Identifier: GPL-2.0
// Feasibility probe (tests/probe_msg_sink.py), not a feature: an SK_MSG verdict on the SINK of a splice.
//
// probe_skb (SK_SKB verdict on `socks`, no parser) redirects every skb received by the source socket
// (cookie CFG_SRC_COOKIE) to the egress of the sink (key 1, flags 0), like splice.bpf.c; a bare FIN is
// dropped (as splice.bpf.c does once spliced).  probe_msg (SK_MSG verdict on the same map) runs on every
// sendmsg into a socket of the map; it acts only on the sink (msg->local_port == CFG_SINK_PORT), logs
// every call and applies the mode under test.  `off` is the stream offset (in bytes sent into the sink,
// before any pop) of the first byte of the current message.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MODE_COUNT 0  // log and pass
#define MODE_POP 1    // pop the stream ranges [D0_LO, D0_HI) and [D1_LO, D1_HI), pass
#define MODE_CORK 2   // first call: cork_bytes(CORK_N); then pass everything
#define MODE_APPLY 3  // every call: apply_bytes(APPLY_N), pass
#define MODE_FRAMED 4 // frames = 4-byte big-endian length + payload; payload[0] odd: Drop (pop), else Pass
#define MODE_APPLY_CORK 5 // cycle: apply_bytes(size - 2); the re-run on the 2 left corks 3 more; then pass

#define CFG_MODE 0
#define CFG_SINK_PORT 1
#define CFG_SRC_COOKIE 2
#define CFG_CORK_N 3
#define CFG_APPLY_N 4
#define CFG_D0_LO 5
#define CFG_D0_HI 6
#define CFG_D1_LO 7
#define CFG_D1_HI 8
#define CFG_UNCORK 9 // non-zero: every call that does not cork calls bpf_msg_cork_bytes(msg, 0)
#define CFG_NOPOP 10 // MODE_FRAMED: judge and count, but pop nothing (everything passes)
#define N_CFG 11

#define ST_CALLS 0     // probe_msg calls on the sink
#define ST_OFF 1       // stream offset of the next new byte (bytes seen, before pops)
#define ST_POPPED 2    // bytes removed with bpf_msg_pop_data
#define ST_POP_FAIL 3  // bpf_msg_pop_data errors
#define ST_CORKED 4    // MODE_CORK: 1 once the cork was requested; MODE_FRAMED: corks requested
#define ST_REDIR 5     // bytes probe_skb redirected
#define ST_REDIR_FAIL 6
#define ST_OTHER 7     // probe_msg calls on other sockets
#define ST_FIN_DROPPED 8
#define ST_SKIP 9      // MODE_FRAMED: bytes of the current frame still to pass/drop
#define ST_SKIP_DROP 10 // MODE_FRAMED: 1 if those bytes are dropped
#define ST_FRAMES 11   // MODE_FRAMED: frames judged
#define ST_FRAMES_DROPPED 12
#define ST_PULL_FAIL 13
#define ST_HEAD 14     // MODE_FRAMED: judged bytes at the head of the corked message
#define ST_SKBS 15     // skbs probe_skb redirected
#define ST_LIMIT 16    // MODE_FRAMED: frame limit reached, rest left to a re-run (apply_bytes)
#define ST_STUCK 17    // MODE_FRAMED: ... with nothing judged left to send (the rest passes unjudged)
#define ST_TARGET 18   // MODE_FRAMED: size the last cork asked for (0: none)
#define ST_CORK_SHORT 19 // MODE_FRAMED: re-runs after a cork with fewer bytes than asked for
#define ST_PHASE 20    // MODE_APPLY_CORK
#define N_ST 21

#define LOG_SLOTS 65536

struct rec {
    __u32 size;  // msg->size on entry
    __u32 off;   // stream offset of its first byte (before pops)
    __u32 after; // msg->size on exit
    __s32 ret;   // last helper result (pop/cork/apply), 0 if none
    __u32 head;  // its first 4 bytes if the first scatterlist element holds them (no pull), else 0
    __u32 head_in; // MODE_FRAMED: ST_HEAD on entry
    __u32 skip_in; // MODE_FRAMED: ST_SKIP on entry
    __u32 flags;   // MODE_FRAMED: 1 corked, 2 frame limit (apply_bytes), 4 a length > 0xffff was read
    __u32 pos;     // MODE_FRAMED: bytes judged
};

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 8);
    __type(key, __u32);
    __type(value, __u64);
} socks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, N_CFG);
    __type(key, __u32);
    __type(value, __u64);
} cfg SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, N_ST);
    __type(key, __u32);
    __type(value, __u64);
} st SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, LOG_SLOTS);
    __type(key, __u32);
    __type(value, struct rec);
} calls SEC(".maps");

static __always_inline __u64 *slot(void *map, __u32 key)
{
    return bpf_map_lookup_elem(map, &key);
}

static __always_inline __u64 get(void *map, __u32 key)
{
    __u64 *v = slot(map, key);
    return v ? *v : 0;
}

static __always_inline void add(__u32 key, __u64 n)
{
    __u64 *v = slot(&st, key);
    if (v)
        __sync_fetch_and_add(v, n);
}

static __always_inline void set(__u32 key, __u64 n)
{
    __u64 *v = slot(&st, key);
    if (v)
        *v = n;
}

SEC("sk_skb")
int probe_skb(struct __sk_buff *skb)
{
    if (bpf_get_socket_cookie(skb) != get(&cfg, CFG_SRC_COOKIE))
        return SK_PASS;
    __u32 len = skb->len;
    if (len == 0) {
        add(ST_FIN_DROPPED, 1);
        return SK_DROP;
    }
    __u32 key = 1;
    if (bpf_sk_redirect_hash(skb, &socks, &key, 0) == SK_PASS) {
        add(ST_REDIR, len);
        add(ST_SKBS, 1);
        return SK_PASS;
    }
    add(ST_REDIR_FAIL, 1);
    return SK_DROP;
}

// Remove the part of [lo, hi) (stream offsets) that lies in the message [off, off + size).
static __always_inline int pop_range(struct sk_msg_md *msg, __u64 off, __u64 size, __u64 lo, __u64 hi)
{
    if (hi <= off || lo >= off + size || lo >= hi)
        return 0;
    __u64 a = lo > off ? lo : off;
    __u64 b = hi < off + size ? hi : off + size;
    int ret = bpf_msg_pop_data(msg, (__u32)(a - off), (__u32)(b - a), 0);
    if (ret)
        add(ST_POP_FAIL, 1);
    else
        add(ST_POPPED, b - a);
    return ret;
}

// MODE_FRAMED, one message: walk its frames from the stream state (ST_HEAD bytes at its head already
// judged in a call that corked, then ST_SKIP bytes of the current frame still to go, dropped if
// ST_SKIP_DROP).  Drops are popped back to front so that earlier offsets stay valid.  When a header
// (4-byte length + tag byte) is cut, the message is corked until it is complete; the judged head then
// comes back in the next call.  After MAX_FRAMES frames, apply_bytes(judged bytes left) makes the kernel
// send those and run the program again on the rest of the message (ST_STUCK if nothing is left to send).
#define MAX_FRAMES 16
static __always_inline void framed(struct sk_msg_md *msg, struct rec *r)
{
    __u32 size = msg->size;
    __u32 pos = (__u32)get(&st, ST_HEAD);
    __u32 drop_at[MAX_FRAMES + 1];
    __u32 drop_len[MAX_FRAMES + 1];
    __u32 n = 0, dropped = 0, need = 0;
    __u64 skip = get(&st, ST_SKIP);
    __u64 dropping = get(&st, ST_SKIP_DROP);
    int i;

    r->head_in = pos;
    r->skip_in = (__u32)skip;
    set(ST_HEAD, 0);
    __u64 target = get(&st, ST_TARGET);
    if (target && size < target)
        add(ST_CORK_SHORT, 1); // the kernel ran the program before the cork was complete
    set(ST_TARGET, 0);
    if (skip && pos < size) {
        __u32 take = skip < size - pos ? skip : size - pos;
        if (dropping && !get(&cfg, CFG_NOPOP)) {
            drop_at[0] = pos;
            drop_len[0] = take;
            n = 1;
        }
        pos += take;
        skip -= take;
    }
    for (i = 0; i < MAX_FRAMES; i++) {
        if (skip || pos >= size)
            break;
        if (size - pos < 5) {
            need = 5 - (size - pos); // header and tag byte not all here: cork until they are
            break;
        }
        if (bpf_msg_pull_data(msg, pos, pos + 5, 0)) {
            add(ST_PULL_FAIL, 1);
            break;
        }
        __u8 *data = msg->data;
        __u8 *end = msg->data_end;
        if (data + 5 > end)
            break;
        __u32 len = ((__u32)data[0] << 24) | ((__u32)data[1] << 16) | ((__u32)data[2] << 8) | data[3];
        __u32 total = len + 4;
        __u32 drop = data[4] & 1;
        if (len > 0xffff)
            r->flags |= 4;
        add(ST_FRAMES, 1);
        add(ST_FRAMES_DROPPED, drop);
        __u32 take = total < size - pos ? total : size - pos;
        if (drop && n <= MAX_FRAMES && !get(&cfg, CFG_NOPOP)) {
            drop_at[n] = pos;
            drop_len[n] = take;
            n++;
        }
        pos += take;
        skip = total - take;
        dropping = drop;
    }
    set(ST_SKIP, skip);
    set(ST_SKIP_DROP, dropping);
    for (i = MAX_FRAMES; i >= 0; i--) {
        if ((__u32)i >= n)
            continue;
        int ret = bpf_msg_pop_data(msg, drop_at[i], drop_len[i], 0);
        if (ret) {
            add(ST_POP_FAIL, 1);
        } else {
            add(ST_POPPED, drop_len[i]);
            dropped += drop_len[i];
        }
        r->ret = ret;
    }
    __u32 uncork = get(&cfg, CFG_UNCORK);
    if (need) {
        // The kernel compares cork_bytes with the message size after the pops.
        r->ret = bpf_msg_cork_bytes(msg, msg->size + need);
        set(ST_TARGET, msg->size + need);
        r->flags |= 1;
        add(ST_CORKED, 1);
        set(ST_HEAD, pos - dropped);
    } else if (uncork) {
        bpf_msg_cork_bytes(msg, 0); // the kernel keeps a released cork's cork_bytes in its message
    }
    if (!need && !skip && pos < size) {
        // Frame limit: send the judged part, judge the rest in the next run.
        if (pos > dropped)
            bpf_msg_apply_bytes(msg, pos - dropped);
        else
            add(ST_STUCK, 1);
        add(ST_LIMIT, 1);
        r->flags |= 2;
    } else if (uncork) {
        bpf_msg_apply_bytes(msg, 0);
    }
    r->pos = pos;
}

SEC("sk_msg")
int probe_msg(struct sk_msg_md *msg)
{
    if (msg->local_port != get(&cfg, CFG_SINK_PORT)) {
        add(ST_OTHER, 1);
        return SK_PASS;
    }
    __u32 size = msg->size;
    __u64 mode = get(&cfg, CFG_MODE);
    __u64 off = get(&st, ST_OFF);
    struct rec r = {.size = size, .off = (__u32)off};
    __u8 *data = msg->data;
    if (data + 4 <= (__u8 *)msg->data_end)
        r.head = *(__u32 *)data;
    __u64 *n = slot(&st, ST_CALLS);
    __u32 idx = n ? (__u32)__sync_fetch_and_add(n, 1) : 0;

    if (mode == MODE_POP) {
        // Later range first, so that the first range's offsets are unchanged.
        r.ret = pop_range(msg, off, size, get(&cfg, CFG_D1_LO), get(&cfg, CFG_D1_HI));
        int ret = pop_range(msg, off, size, get(&cfg, CFG_D0_LO), get(&cfg, CFG_D0_HI));
        if (ret)
            r.ret = ret;
        set(ST_OFF, off + size);
    } else if (mode == MODE_CORK) {
        if (!get(&st, ST_CORKED)) {
            set(ST_CORKED, 1);
            r.ret = bpf_msg_cork_bytes(msg, (__u32)get(&cfg, CFG_CORK_N));
            // The corked bytes come back in the next call: do not count them as seen yet.
        } else {
            // The re-run sees the corked bytes again at the head of the message.
            set(ST_OFF, size);
            if (get(&cfg, CFG_UNCORK))
                r.ret = bpf_msg_cork_bytes(msg, 0);
        }
    } else if (mode == MODE_APPLY) {
        r.ret = bpf_msg_apply_bytes(msg, (__u32)get(&cfg, CFG_APPLY_N));
        set(ST_OFF, off + size);
    } else if (mode == MODE_APPLY_CORK) {
        // Only helpers that change no byte: whatever they do, the far end must get the stream unchanged.
        __u64 phase = get(&st, ST_PHASE);
        if (phase == 0 && size >= 10) {
            r.ret = bpf_msg_apply_bytes(msg, size - 2);
            bpf_msg_cork_bytes(msg, 0);
            set(ST_PHASE, 1);
        } else if (phase == 1) {
            r.ret = bpf_msg_cork_bytes(msg, size + 3);
            bpf_msg_apply_bytes(msg, 0);
            set(ST_PHASE, 2);
        } else {
            bpf_msg_cork_bytes(msg, 0);
            bpf_msg_apply_bytes(msg, 0);
            set(ST_PHASE, 0);
        }
        set(ST_OFF, off + size);
    } else if (mode == MODE_FRAMED) {
        framed(msg, &r);
    } else {
        set(ST_OFF, off + size);
    }
    r.after = msg->size;
    if (idx < LOG_SLOTS)
        bpf_map_update_elem(&calls, &idx, &r, BPF_ANY);
    return SK_PASS;
}

char _license[] SEC("license") = "GPL";
