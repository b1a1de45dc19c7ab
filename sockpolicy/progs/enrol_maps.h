// SPDX-License-Identifier: GPL-2.0
// The two enrolment SOCKHASHes, shared by rules.bpf.c (which polices them) and enrol.bpf.c (whose sockops
// program fills them).  The loader hands the rules object's maps to the enrol object (ObjectSpec
// reuse_maps), which only works while both definitions are identical: hence one definition, here.
#ifndef SOCKPOLICY_ENROL_MAPS_H
#define SOCKPOLICY_ENROL_MAPS_H

// Sockets whose sendmsg calls are policed, keyed by socket cookie (SO_COOKIE).
struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, __u64);
} policy SEC(".maps");

// Sockets whose received byte stream is split into frames and policed, keyed by socket cookie.
struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, __u64);
} framed SEC(".maps");

#endif
