// SPDX-License-Identifier: GPL-2.0
// Tests only (tests/test_splice.py, the overlapping-retransmission test): a tc egress program that drops
// every IPv4 TCP segment with RST set.  A hand-made TCP client on a raw socket has no kernel socket, so
// the kernel would reset every segment the proxy sends it; this keeps those resets off the wire in the
// test's own namespace.  Attached with `tc filter add dev lo egress bpf da obj ... sec tc`.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

SEC("tc")
int drop_rst(struct __sk_buff *skb)
{
    __u8 ip[20];
    if (skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_load_bytes(skb, ETH_HLEN, ip, sizeof(ip)) != 0)
        return TC_ACT_OK;
    if (ip[9] != 6) // IPPROTO_TCP
        return TC_ACT_OK;
    __u8 flags;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + (ip[0] & 0x0f) * 4 + 13, &flags, 1) != 0)
        return TC_ACT_OK;
    return (flags & 0x04) ? TC_ACT_SHOT : TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
