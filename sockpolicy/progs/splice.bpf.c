// SPDX-License-Identifier: GPL-2.0
// Kernel splicing of proxied TCP connections (sockpolicy/proxy/_splice.py drives it; docs/splice.md).
//
//  - splice_sockops (SOCK_OPS on the serving process's dedicated cgroup v2): at *_ESTABLISHED_CB, before
//    any payload can be queued, puts the socket into `socks` and gives it a slot in `conns`; at the
//    socket's TCP_CLOSE it marks the slot closed, so that userspace's sweep frees slots of sockets it
//    never claimed.
//  - splice_verdict (SK_SKB verdict on `socks`): runs on every skb the socket receives.  In MODE_PASS it
//    hands the skb to userspace (SK_PASS) and counts its bytes in `passed`.  In MODE_PENDING it switches
//    to MODE_SPLICED as soon as userspace has written every passed byte to the peer (forwarded ==
//    passed); from then on every skb is redirected out of the peer socket.
//
// With kernel rules (CFG_RULES, see "Kernel rules" in docs/splice.md) the verdict first judges every
// received skb with payload against the rule set of rules_eval.h, whose maps userspace shares with the
// Enforcer (sockpolicy enforce): Drop drops the skb, Redirect sends it out of the labelled socket, Pass
// leaves it to the splice logic above.  Dropped and diverted bytes are counted in neither `passed` nor
// `redirected`, so the switch (forwarded == passed) and the EOF arithmetic (written + redirected) stay
// exact.
//
// `conns` is BPF_F_MMAPABLE: userspace reads the kernel's counters and writes `peer`, `mode` and
// `forwarded` with plain aligned 8/4-byte loads and stores, no syscall on the data path.  Each field has
// one writer at a time (see struct conn), so no lock is needed.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "rules_eval.h"

// The two fields of the kernel's struct tcp_sock the verdict reads (through bpf_skc_to_tcp_sock); libbpf
// relocates their offsets against the running kernel's BTF (CO-RE), so no vmlinux.h is needed.
struct tcp_sock {
    __u32 write_seq; // sequence number after the last byte queued for sending
} __attribute__((preserve_access_index));

#define MODE_PASS 0    // userspace relays; the verdict passes and counts
#define MODE_PENDING 1 // userspace asked to splice; the verdict switches once forwarded == passed
#define MODE_SPLICED 2 // every skb is redirected to the peer (set by the verdict only)

#define CONN_SLOTS 32768 // max_entries of `conns`; a power of two
#define PROBES 8         // slots tried per socket, starting at cookie % CONN_SLOTS

#define STAT_ENROLLED 0      // sockets given a slot and put into `socks`
#define STAT_NO_SLOT 1       // no free slot among PROBES: the socket stays out of `socks`
#define STAT_ENROL_FAILED 2  // bpf_sock_hash_update failed (map full, ...)
#define STAT_PEER_GONE 3     // skbs dropped in MODE_SPLICED because the peer had left `socks`
#define STAT_THROTTLED 4     // MODE_SPLICED -> MODE_PENDING switches (the peer's backlog was too long)
#define STAT_RULE_DROPPED 5  // skbs dropped by a rule (Drop, default Drop, Redirect to a missing label)
#define STAT_RULE_DIVERTED 6 // skbs a Redirect rule sent out of a labelled socket instead of the peer
#define STAT_RULES_FRAMED 7  // skbs not judged: the active rule set is framed (per-frame rules, not per-skb)
#define STAT_OLD_DROPPED 8   // skbs made only of bytes the verdict had already judged (dropped)
#define STAT_OLD_TRIMMED 9   // skbs that started with already-judged bytes, trimmed to their new part
#define STAT_TRIM_FAILED 10  // such skbs that could not be trimmed: dropped, slot marked `broken`
#define STAT_SEQ_UNKNOWN 11  // skbs whose control block did not span the payload: not checked for old bytes
#define N_STATS 12

#define CFG_HIGH 0 // backlog (bytes) above which the verdict hands skbs back to userspace
#define CFG_LOW 1  // backlog (bytes) under which it splices again
#define CFG_RULES 2 // non-zero: judge every received skb with the shared rule set (rules_eval.h)
#define N_CFG 3

// Must match _splice.py (_Conn).  128 bytes: two cache lines per socket.
struct conn {
    __u64 owner;      // cookie of the socket holding the slot (kernel, at enrolment)
    __u64 peer;       // cookie of the socket to redirect to (userspace, before MODE_PENDING)
    __u32 mode;       // MODE_*: userspace writes PENDING once; after that only the verdict writes it
    __u32 closed;     // 1 once the socket reached TCP_CLOSE (kernel)
    __u64 passed;     // payload bytes handed to userspace (verdict only)
    __u64 forwarded;  // passed bytes userspace has written to the peer (userspace only)
    __u64 redirected; // payload bytes redirected to the peer (verdict only)
    __u64 skbs;       // verdict runs with payload (diagnostics)
    __u64 dropped;    // bytes dropped: the peer was gone, or a rule dropped them (verdict only)
    __u64 written;    // bytes userspace wrote INTO this socket (userspace only)
    __u64 seq_base;   // write_seq at enrolment (= snd_nxt: nothing queued yet), the origin for peer_backlog
    __u32 peer_slot;  // slot of `peer` (userspace, before MODE_PENDING)
    __u32 throttles;  // MODE_SPLICED -> MODE_PENDING switches because the peer fell behind (verdict only)
    __u64 diverted;   // bytes a Redirect rule sent out of a labelled socket instead of the peer (verdict)
    __u32 rcv_next;   // TCP sequence number after the last byte the verdict judged (verdict only)
    __u32 seq_known;  // 1 once rcv_next is set (the first skb with a trustworthy control block)
    __u64 old;        // bytes the verdict saw a second time (retransmissions), dropped or trimmed (verdict)
    __u32 broken;     // 1: an skb with old bytes could not be trimmed and was dropped whole (verdict)
    __u32 pad32;
    __u64 pad[1];
};

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, CONN_SLOTS);
    __type(key, __u64);   // socket cookie
    __type(value, __u64); // the socket
} socks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(map_flags, BPF_F_MMAPABLE);
    __uint(max_entries, CONN_SLOTS);
    __type(key, __u32);
    __type(value, struct conn);
} conns SEC(".maps");

// cookie -> slot.  Kernel inserts at enrolment; userspace deletes when it frees the slot.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, CONN_SLOTS);
    __type(key, __u64);
    __type(value, __u32);
} slot_of SEC(".maps");

// slot -> cookie: the allocation lock.  An insert with BPF_NOEXIST succeeds for exactly one socket, so two
// sockets enrolling at once on different CPUs never share a slot.  Userspace deletes it last.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, CONN_SLOTS);
    __type(key, __u32);
    __type(value, __u64);
} owners SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, N_STATS);
    __type(key, __u32);
    __type(value, __u64);
} stats SEC(".maps");

// [CFG_*]: written by userspace before attaching.
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, N_CFG);
    __type(key, __u32);
    __type(value, __u64);
} splice_config SEC(".maps");

static __always_inline void bump(__u32 key)
{
    __u64 *value = bpf_map_lookup_elem(&stats, &key);
    if (value)
        __sync_fetch_and_add(value, 1);
}

static __always_inline void enrol(struct bpf_sock_ops *skops)
{
    __u64 cookie = bpf_get_socket_cookie(skops);
    __u32 slot = 0;
    int found = 0;

    for (int i = 0; i < PROBES; i++) {
        __u32 candidate = (__u32)((cookie + i) & (CONN_SLOTS - 1));
        if (bpf_map_update_elem(&owners, &candidate, &cookie, BPF_NOEXIST) == 0) {
            slot = candidate;
            found = 1;
            break;
        }
    }
    if (!found) {
        // Not an error for the connection: userspace finds no slot and keeps it in the userspace relay.
        bump(STAT_NO_SLOT);
        return;
    }
    struct conn *c = bpf_map_lookup_elem(&conns, &slot);
    if (!c) {
        bpf_map_delete_elem(&owners, &slot);
        bump(STAT_NO_SLOT);
        return;
    }
    // Userspace zeroed the slot before deleting its `owners` key, so only owner needs setting; the rest is
    // rewritten anyway so that a slot never carries a previous connection's counters.
    c->peer = 0;
    c->mode = MODE_PASS;
    c->closed = 0;
    c->passed = 0;
    c->forwarded = 0;
    c->redirected = 0;
    c->skbs = 0;
    c->dropped = 0;
    c->diverted = 0;
    c->written = 0;
    c->peer_slot = 0;
    c->throttles = 0;
    c->rcv_next = 0;
    c->seq_known = 0;
    c->old = 0;
    c->broken = 0;
    c->seq_base = skops->snd_nxt;
    c->owner = cookie;
    if (bpf_map_update_elem(&slot_of, &cookie, &slot, BPF_NOEXIST) != 0) {
        c->owner = 0;
        bpf_map_delete_elem(&owners, &slot);
        bump(STAT_ENROL_FAILED);
        return;
    }
    if (bpf_sock_hash_update(skops, &socks, &cookie, BPF_NOEXIST) != 0) {
        // Leave the slot allocated: the TCP_CLOSE callback below marks it for userspace's sweep.
        bump(STAT_ENROL_FAILED);
    } else {
        bump(STAT_ENROLLED);
    }
    // Ask for state callbacks so that TCP_CLOSE tells userspace about sockets it never claimed.
    bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void closed(struct bpf_sock_ops *skops)
{
    __u64 cookie = bpf_get_socket_cookie(skops);
    __u32 *slot = bpf_map_lookup_elem(&slot_of, &cookie);
    if (!slot)
        return; // userspace already freed it
    struct conn *c = bpf_map_lookup_elem(&conns, slot);
    if (c && c->owner == cookie)
        c->closed = 1;
}

SEC("sockops")
int splice_sockops(struct bpf_sock_ops *skops)
{
    switch (skops->op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        enrol(skops);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        if (skops->args[1] == BPF_TCP_CLOSE)
            closed(skops);
        break;
    }
    return 1;
}

static __always_inline __u64 cfg(__u32 key, __u64 fallback)
{
    __u64 *value = bpf_map_lookup_elem(&splice_config, &key);
    return value && *value ? *value : fallback;
}

// Bytes redirected to the peer that have not reached its write queue yet: the length of its psock backlog,
// which the kernel does not bound (a slow reader behind the peer makes it grow without limit; the write
// queue itself is bounded by the peer's sndbuf).  Everything ever queued on the peer is userspace's
// `written` plus what the backlog delivered, so backlog = redirected + written - (write_seq - seq_base),
// computed modulo 2^32 like TCP sequence numbers (exact while the backlog is under 2 GiB).
// 0 when the peer is gone (the redirect then fails anyway).
static __always_inline __u64 peer_backlog(struct conn *c)
{
    __u32 peer_slot = c->peer_slot;
    struct conn *p = bpf_map_lookup_elem(&conns, &peer_slot);
    if (!p || p->owner != c->peer)
        return 0;
    __u64 peer = c->peer;
    struct bpf_sock *sk = bpf_map_lookup_elem(&socks, &peer);
    if (!sk)
        return 0;
    __u32 write_seq = 0;
    struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
    if (tp)
        write_seq = tp->write_seq;
    bpf_sk_release(sk);
    if (!tp)
        return 0;
    __u32 in = (__u32)(c->redirected + *(volatile __u64 *)&p->written);
    __u32 queued = write_seq - (__u32)p->seq_base;
    __s32 backlog = (__s32)(in - queued);
    return backlog > 0 ? backlog : 0;
}

// The kernel rules' verdict on one received skb with payload: SK_DROP or SK_PASS when a rule decided
// (Drop, or Redirect to a labelled socket), -1 when the skb is the splice's to handle (Pass, the default
// Pass, no rule set loaded, or a framed rule set, whose rules judge frames, not skbs).  Counted in the
// rule's counters (judge_skb) and in the slot: dropped bytes in `dropped`, diverted ones in `diverted`.
static __always_inline int judge(struct __sk_buff *skb, struct conn *c, __u32 len)
{
    __u32 slot;
    struct slot_meta *meta = active_slot(&slot); // read once: the whole message is judged by one set
    if (!meta)
        return -1;
    if (meta->frame_size) {
        // A framed rule set describes messages that span or share skbs; judging skbs with it would
        // apply the rules to arbitrary cuts of the stream.  Not judged, counted (docs/splice.md).
        bump(STAT_RULES_FRAMED);
        return -1;
    }
    struct rule *r = judge_skb(skb, slot, meta, 0, len);
    if (r && r->action == ACT_REDIRECT) {
        __u32 key = r->target;
        if (bpf_sk_redirect_hash(skb, &targets, &key, (r->flags & RULE_F_INGRESS) ? BPF_F_INGRESS : 0) ==
            SK_PASS) {
            __sync_fetch_and_add(&c->diverted, len);
            bump(STAT_RULE_DIVERTED);
            return SK_PASS;
        }
        // No socket has that label: the rules engine drops in this case too (rules_skb).
    } else if (r ? r->action != ACT_DROP : meta->default_action != ACT_DROP) {
        return -1;
    }
    __sync_fetch_and_add(&c->dropped, len);
    bump(STAT_RULE_DROPPED);
    return SK_DROP;
}

// Retransmissions that overlap bytes already received.  TCP queues a retransmitted segment that starts
// before rcv_nxt but ends after it whole (tcp_data_queue, "partial packet"), and recvmsg skips the old
// part with an offset (copied_seq - seq).  tcp_read_skb, which feeds this verdict, ignores that offset
// and hands the whole skb over, so without this check the old bytes would be passed or redirected a
// second time (docs/splice.md, "Why no byte is lost, duplicated or reordered", point 2).  The verdict
// keeps the sequence number after the last byte it judged and removes anything before it: an skb made
// only of old bytes is dropped, one that starts with old bytes is trimmed at its head
// (bpf_skb_adjust_room with a negative len_diff pulls bytes off the head in SK_SKB programs, at most
// 0xfff per call).  The control block (cb[0] = seq, cb[1] = end_seq) is trusted only when it spans
// exactly the payload (or the payload plus a FIN), as in rules.bpf.c.  Returns the new payload length,
// 0 to drop the skb (only old bytes), -1 when the old bytes could not be removed (counted, slot broken:
// the relay resets both sides rather than deliver a duplicate).
#define TRIM_STEP 0xfff
#define TRIM_STEPS 64 // 64 * 4095 > 256 KiB, more than any skb on the receive path here

// Remove n bytes from the head of the skb's payload; 0 on success.
static __always_inline int trim_head(struct __sk_buff *skb, __u32 n)
{
    for (int i = 0; i < TRIM_STEPS && n; i++) {
        __u32 step = n < TRIM_STEP ? n : TRIM_STEP;
        if (bpf_skb_adjust_room(skb, -(__s32)step, 0, 0) != 0)
            return -1;
        n -= step;
    }
    return n ? -1 : 0;
}

static __always_inline int skip_old(struct __sk_buff *skb, struct conn *c, __u32 len)
{
    __u32 seq = skb->cb[0];
    __u32 span = skb->cb[1] - seq;
    if (span != len && span != len + 1) {
        c->seq_known = 0; // not a TCP control block we can read: start again from the next good one
        bump(STAT_SEQ_UNKNOWN);
        return len;
    }
    __u32 end = seq + len;
    if (!c->seq_known) {
        c->rcv_next = end;
        c->seq_known = 1;
        return len;
    }
    __s32 behind = (__s32)(c->rcv_next - seq);
    if (behind <= 0) {
        // In order (behind == 0) or, never seen, after a gap: judge it all; either way it is new.
        c->rcv_next = end;
        return len;
    }
    if ((__u32)behind >= len) {
        // Only old bytes (defensive: TCP itself drops a segment that is entirely old before queueing
        // it, and the forced test saw no such skb).  Trimmed to nothing before the drop in case the
        // kernel advances copied_seq by the length left in a consumed skb; the old bytes were already
        // accounted for.  That effect on copied_seq is from memory of the source, not verified here.
        trim_head(skb, len);
        __sync_fetch_and_add(&c->old, len);
        bump(STAT_OLD_DROPPED);
        return 0;
    }
    if (trim_head(skb, behind) != 0 || skb->len != len - behind) {
        c->broken = 1;
        __sync_fetch_and_add(&c->old, behind);
        bump(STAT_TRIM_FAILED);
        return -1;
    }
    __sync_fetch_and_add(&c->old, behind);
    bump(STAT_OLD_TRIMMED);
    c->rcv_next = end;
    return len - behind;
}

SEC("sk_skb")
int splice_verdict(struct __sk_buff *skb)
{
    __u64 cookie = bpf_get_socket_cookie(skb);
    __u32 *slot = bpf_map_lookup_elem(&slot_of, &cookie);
    if (!slot)
        return SK_PASS; // a socket being freed: plain TCP behaviour
    struct conn *c = bpf_map_lookup_elem(&conns, slot);
    if (!c || c->owner != cookie)
        return SK_PASS;
    __u32 len = skb->len;
    if (len == 0) {
        // A bare FIN arrives as an empty skb.  TCP has already taken the FIN into account (SOCK_DONE,
        // RCV_SHUTDOWN) when the verdict runs, so the skb carries nothing: userspace reads the EOF anyway.
        // Redirected, it makes the peer's psock report EPIPE on the peer socket (observed on 6.18).
        // Passed, it is the same whenever this socket's psock queue already holds skbs, i.e. skbs the
        // PEER redirected here that wait for send buffer: the kernel's backlog worker then meets a 0-byte
        // skb, treats it as a hard error (EPIPE on this socket, transmission disabled), and every
        // redirected byte queued behind it is never sent (observed: the client of a spliced connection
        // half-closed while the other direction was still draining into it).  So once splicing was
        // asked for, drop it.  Userspace must then not trust an EOF while passed bytes are still unread
        // (they may sit in that same queue): see _tcp.py (_receive).
        if (*(volatile __u32 *)&c->mode == MODE_PASS)
            return SK_PASS;
        return SK_DROP;
    }
    c->skbs++; // only this socket's verdict writes it, and its runs are serialised by the socket lock
    int fresh = skip_old(skb, c, len);
    if (fresh <= 0)
        return SK_DROP; // nothing new in it (or, counted and flagged, it could not be trimmed)
    len = fresh;
    if (cfg(CFG_RULES, 0)) {
        // Before the splice logic, in every mode: a message a rule drops or diverts is neither handed to
        // userspace (passed) nor redirected to the peer, so both invariants keep counting only bytes
        // that go that way.
        int ruled = judge(skb, c, len);
        if (ruled >= 0)
            return ruled;
    }
    __u32 mode = *(volatile __u32 *)&c->mode;
    if (mode == MODE_PENDING) {
        // Every byte passed so far has been written to the peer by userspace (it stores `forwarded` only
        // after send() returned), and nothing passed later can exist because this run is the only one for
        // this socket.  So the peer's write queue already ends with the last passed byte, and what we
        // redirect from now on is queued after it: the order holds.  The backlog condition makes a
        // throttled connection (below) wait until the peer has caught up.
        if (*(volatile __u64 *)&c->forwarded == c->passed && peer_backlog(c) <= cfg(CFG_LOW, 1 << 20)) {
            mode = MODE_SPLICED;
            *(volatile __u32 *)&c->mode = MODE_SPLICED;
        }
    } else if (mode == MODE_SPLICED && peer_backlog(c) > cfg(CFG_HIGH, 4 << 20)) {
        // Backpressure: the kernel never blocks a redirect, so a slow reader behind the peer would let the
        // backlog grow without bound.  Pass instead: userspace holds these bytes until the backlog has
        // drained into the peer (order), they stay charged to this socket's receive buffer, and its TCP
        // window closes.  MODE_PENDING then splices again once userspace has caught up.
        mode = MODE_PENDING;
        *(volatile __u32 *)&c->mode = MODE_PENDING;
        c->throttles++;
        bump(STAT_THROTTLED);
    }
    if (mode == MODE_SPLICED) {
        __u64 peer = c->peer;
        // Redirect: transmit this skb out of the peer socket (flags 0 = egress), via the peer's backlog.
        if (bpf_sk_redirect_hash(skb, &socks, &peer, 0) == SK_PASS) {
            __sync_fetch_and_add(&c->redirected, len);
            return SK_PASS;
        }
        // Drop: the peer left `socks`, i.e. it was closed or reset.  The bytes have nowhere to go;
        // userspace sees the peer's end and closes (or resets) this socket too.
        __sync_fetch_and_add(&c->dropped, len);
        bump(STAT_PEER_GONE);
        return SK_DROP;
    }
    // Counted before the skb reaches the receive queue, so userspace never reads a byte not yet in
    // `passed` (forwarded <= passed always holds).
    __sync_fetch_and_add(&c->passed, len);
    return SK_PASS;
}

char _license[] SEC("license") = "GPL";
