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
// `conns` is BPF_F_MMAPABLE: userspace reads the kernel's counters and writes `peer`, `mode` and
// `forwarded` with plain aligned 8/4-byte loads and stores, no syscall on the data path.  Each field has
// one writer at a time (see struct conn), so no lock is needed.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MODE_PASS 0    // userspace relays; the verdict passes and counts
#define MODE_PENDING 1 // userspace asked to splice; the verdict switches once forwarded == passed
#define MODE_SPLICED 2 // every skb is redirected to the peer (set by the verdict only)

#define N_SLOTS 32768 // max_entries of `conns`; a power of two
#define PROBES 8       // slots tried per socket, starting at cookie % N_SLOTS

#define STAT_ENROLLED 0      // sockets given a slot and put into `socks`
#define STAT_NO_SLOT 1       // no free slot among PROBES: the socket stays out of `socks`
#define STAT_ENROL_FAILED 2  // bpf_sock_hash_update failed (map full, ...)
#define STAT_PEER_GONE 3     // skbs dropped in MODE_SPLICED because the peer had left `socks`
#define N_STATS 4

// Must match _splice.py (_Conn).  64 bytes: one cache line per connection.
struct conn {
    __u64 owner;      // cookie of the socket holding the slot (kernel, at enrolment)
    __u64 peer;       // cookie of the socket to redirect to (userspace, before MODE_PENDING)
    __u32 mode;       // MODE_*: userspace writes PENDING once; the verdict writes SPLICED once
    __u32 closed;     // 1 once the socket reached TCP_CLOSE (kernel)
    __u64 passed;     // payload bytes handed to userspace (verdict only)
    __u64 forwarded;  // passed bytes userspace has written to the peer (userspace only)
    __u64 redirected; // payload bytes redirected to the peer (verdict only)
    __u64 skbs;       // verdict runs (diagnostics)
    __u64 dropped;    // bytes dropped because the peer was gone (verdict only)
};

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, N_SLOTS);
    __type(key, __u64);   // socket cookie
    __type(value, __u64); // the socket
} socks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(map_flags, BPF_F_MMAPABLE);
    __uint(max_entries, N_SLOTS);
    __type(key, __u32);
    __type(value, struct conn);
} conns SEC(".maps");

// cookie -> slot.  Kernel inserts at enrolment; userspace deletes when it frees the slot.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, N_SLOTS);
    __type(key, __u64);
    __type(value, __u32);
} slot_of SEC(".maps");

// slot -> cookie: the allocation lock.  An insert with BPF_NOEXIST succeeds for exactly one socket, so two
// sockets enrolling at once on different CPUs never share a slot.  Userspace deletes it last.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, N_SLOTS);
    __type(key, __u32);
    __type(value, __u64);
} owners SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, N_STATS);
    __type(key, __u32);
    __type(value, __u64);
} stats SEC(".maps");

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
        __u32 candidate = (__u32)((cookie + i) & (N_SLOTS - 1));
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
    if (len == 0)
        // A bare FIN arrives as an empty skb.  Redirected, it makes the peer's backlog report EPIPE on the
        // peer socket (observed on 6.18), so keep it here: userspace sees the EOF and propagates it.
        return SK_PASS;
    c->skbs++; // only this socket's verdict writes it, and its runs are serialised by the socket lock
    __u32 mode = *(volatile __u32 *)&c->mode;
    if (mode == MODE_PENDING) {
        // Every byte passed so far has been written to the peer by userspace (it stores `forwarded` only
        // after send() returned), and nothing passed later can exist because this run is the only one for
        // this socket.  So the peer's write queue already ends with the last passed byte, and what we
        // redirect from now on is queued after it: the order holds.
        if (*(volatile __u64 *)&c->forwarded == c->passed) {
            mode = MODE_SPLICED;
            *(volatile __u32 *)&c->mode = MODE_SPLICED;
        }
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
