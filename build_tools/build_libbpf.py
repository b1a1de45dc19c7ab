"""Out-of-line (API mode) cffi build script for the libbpf binding.

The generated extension is ``sockpolicy._libbpf_cffi``.  Only ``sockpolicy/_libbpf.py`` imports it.
The cdef is deliberately small: only what sockpolicy uses, declared against the system libbpf headers
(Debian ``libbpf-dev``, libbpf >= 1.1), so the C compiler checks every declaration.
"""

from __future__ import annotations

import cffi

CDEF = r"""
typedef uint32_t __u32;
typedef uint64_t __u64;

/* ---- constants (evaluated by the C compiler against the system headers) ---- */
#define BPF_ANY ...
#define BPF_NOEXIST ...
#define BPF_EXIST ...
#define BPF_F_LOCK ...
#define BPF_F_NO_PREALLOC ...
#define BPF_F_RDONLY_PROG ...

#define BPF_MAP_TYPE_HASH ...
#define BPF_MAP_TYPE_ARRAY ...
#define BPF_MAP_TYPE_PERCPU_HASH ...
#define BPF_MAP_TYPE_PERCPU_ARRAY ...
#define BPF_MAP_TYPE_LPM_TRIE ...
#define BPF_MAP_TYPE_SOCKMAP ...
#define BPF_MAP_TYPE_SOCKHASH ...

#define BPF_PROG_TYPE_SOCKET_FILTER ...
#define BPF_PROG_TYPE_SCHED_CLS ...
#define BPF_PROG_TYPE_XDP ...
#define BPF_PROG_TYPE_SOCK_OPS ...
#define BPF_PROG_TYPE_SK_SKB ...
#define BPF_PROG_TYPE_SK_MSG ...
#define BPF_PROG_TYPE_SK_LOOKUP ...

#define BPF_CGROUP_SOCK_OPS ...
#define BPF_SK_SKB_STREAM_PARSER ...
#define BPF_SK_SKB_STREAM_VERDICT ...
#define BPF_SK_SKB_VERDICT ...
#define BPF_SK_MSG_VERDICT ...
#define BPF_SK_LOOKUP ...

#define BPF_STATS_RUN_TIME ...

#define LIBBPF_WARN ...
#define LIBBPF_INFO ...
#define LIBBPF_DEBUG ...

struct bpf_object;
struct bpf_program;
struct bpf_map;
struct bpf_link;

struct bpf_object_open_opts {
    size_t sz;
    const char *object_name;
    const char *pin_root_path;
    char *kernel_log_buf;
    size_t kernel_log_size;
    __u32 kernel_log_level;
    ...;
};

struct bpf_map_create_opts {
    size_t sz;
    __u32 map_flags;
    ...;
};

struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    __u32 data_size_in;
    __u32 data_size_out;
    const void *ctx_in;
    void *ctx_out;
    __u32 ctx_size_in;
    __u32 ctx_size_out;
    __u32 retval;
    int repeat;
    __u32 duration;
    __u32 flags;
    ...;
};

struct bpf_map_info {
    __u32 type;
    __u32 id;
    __u32 key_size;
    __u32 value_size;
    __u32 max_entries;
    __u32 map_flags;
    char name[16];
    ...;
};

struct bpf_prog_info {
    __u32 type;
    __u32 id;
    char name[16];
    __u64 run_time_ns;
    __u64 run_cnt;
    ...;
};

struct bpf_link_info {
    __u32 type;
    __u32 id;
    __u32 prog_id;
    ...;
};

/* ---- objects ---- */
struct bpf_object *bpf_object__open_file(const char *path, const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
const char *bpf_object__name(const struct bpf_object *obj);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj, const char *name);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj, struct bpf_program *prog);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);

/* ---- programs ---- */
const char *bpf_program__name(const struct bpf_program *prog);
const char *bpf_program__section_name(const struct bpf_program *prog);
int bpf_program__fd(const struct bpf_program *prog);
int bpf_program__type(const struct bpf_program *prog);
int bpf_program__set_type(struct bpf_program *prog, int type);
int bpf_program__expected_attach_type(const struct bpf_program *prog);
int bpf_program__set_expected_attach_type(struct bpf_program *prog, int type);
int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);

/* ---- maps ---- */
const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__type(const struct bpf_map *map);
__u32 bpf_map__key_size(const struct bpf_map *map);
__u32 bpf_map__value_size(const struct bpf_map *map);
__u32 bpf_map__max_entries(const struct bpf_map *map);
__u32 bpf_map__map_flags(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, __u32 max_entries);
int bpf_map__set_pin_path(struct bpf_map *map, const char *path);
int bpf_map__reuse_fd(struct bpf_map *map, int fd);
bool bpf_map__is_internal(const struct bpf_map *map);

int bpf_map_create(int map_type, const char *map_name, __u32 key_size, __u32 value_size,
                   __u32 max_entries, const struct bpf_map_create_opts *opts);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_lookup_elem_flags(int fd, const void *key, void *value, __u64 flags);
int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);

/* ---- attachment ---- */
int bpf_prog_attach(int prog_fd, int attachable_fd, int type, unsigned int flags);
int bpf_prog_detach2(int prog_fd, int attachable_fd, int type);
int bpf_prog_query(int target_fd, int type, __u32 query_flags, __u32 *attach_flags,
                   __u32 *prog_ids, __u32 *prog_cnt);
int bpf_link_create(int prog_fd, int target_fd, int attach_type, const void *opts);
int bpf_link_update(int link_fd, int new_prog_fd, const void *opts);
int bpf_link_detach(int link_fd);

/* ---- pinning and ids ---- */
int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);
int bpf_prog_get_fd_by_id(__u32 id);
int bpf_map_get_fd_by_id(__u32 id);

/* ---- misc ---- */
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int bpf_enable_stats(int type);
int libbpf_num_possible_cpus(void);
int libbpf_probe_bpf_prog_type(int prog_type, const void *opts);
int libbpf_probe_bpf_map_type(int map_type, const void *opts);
int setns(int fd, int nstype);
#define CLONE_NEWNET ...

/* libbpf's print callback takes a va_list, which cffi cannot express; a C shim formats each message and
   hands the finished string to Python. */
extern "Python" void sockpolicy_libbpf_log(int level, const char *message);
void sockpolicy_install_print(void);
"""

SOURCE = r"""
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdbool.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>

static void sockpolicy_libbpf_log(int level, const char *message);

static int sockpolicy_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
    char *text = NULL;
    int n = vasprintf(&text, fmt, ap);
    if (n < 0 || text == NULL)
        return 0;
    sockpolicy_libbpf_log((int)level, text);
    free(text);
    return n;
}

static void sockpolicy_install_print(void)
{
    libbpf_set_print(sockpolicy_print);
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("sockpolicy._libbpf_cffi", SOURCE, libraries=["bpf"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
