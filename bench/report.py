"""Turn a results JSON of ``bench/run.py`` into ``docs/benchmarks.md`` and ``docs/img/bench-*.png``.

``python bench/report.py [results.json] [--md PATH] [--img DIR]`` (default: ``bench/out/latest.json``).
Every word and number of the report comes from here and from the JSON; nothing is edited by hand.
Spread: each cell is the median over the interleaved rounds, with [min-max] over the rounds.  Target
ratios are computed per round from measurements taken back to back in that round, then summarised the
same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

DESCRIPTIONS = {
    "direct": "client to server, no proxy, a plain bound listener",
    "direct-steered": "client to server, no proxy, steered to the listener by the SK_LOOKUP dispatcher",
    "haproxy": "HAProxy (Debian package), `mode tcp`, `nbthread 1`, default buffers",
    "trio-copy": "minimal trio copy loop (`bench/copyproxy.py`): 64 KiB `recv_into`/`send`",
    "sp-userspace": "sockpolicy proxy, steered by SK_LOOKUP, `on_message` returning `Pass()` always",
    "sp-spliced": "sockpolicy proxy, steered by SK_LOOKUP, `on_connect` returning `Pass(splice=True)`",
    "sp-spliced-kernel": "bulk measurements only: `sp-spliced` with `Splicer.open(backlog_high={high}, "
    "backlog_low={low})`, so large that no connection is ever throttled back to userspace: what the kernel "
    "redirect alone moves. **Not a production setting**: nothing then bounds the kernel's redirect backlog "
    "(docs/splice.md, Backpressure)",
}
DATA_PATH = ["direct", "haproxy", "trio-copy", "sp-userspace", "sp-spliced"]
#: bulk-only: the spliced proxy with throttling disabled (the bound of spliced bulk throughput)
KERNEL_ONLY = "sp-spliced-kernel"


def bulk_names(results: dict[str, Any]) -> list[str]:
    """DATA_PATH, plus the kernel-only spliced candidate when this run measured it."""
    data = results.get("data", {})
    measured = any(data.get(f"bulk_{n}", {}).get(KERNEL_ONLY) for n in results["settings"]["bulk_streams"])
    return DATA_PATH + ([KERNEL_ONLY] if measured else [])


def _mib(n: Any) -> str:
    return f"{n / 2**20:.0f} MiB" if isinstance(n, int) else "see bench/run.py"


# --------------------------------------------------------------------------------------------------
# numbers


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: Sequence[float], digits: int = 1, unit: str = "") -> str:
    if not values:
        return "n/a"
    med, lo, hi = spread(values)
    if len(values) == 1:
        return f"{med:.{digits}f}{unit}"
    return f"{med:.{digits}f}{unit} [{lo:.{digits}f}-{hi:.{digits}f}]"


def series(
    results: dict[str, Any], key: str, name: str, get: Callable[[dict[str, Any]], float]
) -> list[float]:
    """The values of the rounds that succeeded (failed rounds are listed under Errors)."""
    runs = results.get("data", {}).get(key, {}).get(name, [])
    return [get(r) for r in runs if "error" not in r]


def failures(results: dict[str, Any], key: str, name: str) -> list[str]:
    runs = results.get("data", {}).get(key, {}).get(name, [])
    return [r["error"] for r in runs if "error" in r]


def unavailable(results: dict[str, Any], name: str) -> str | None:
    cand = results.get("candidates", {}).get(name)
    if cand is None:
        return "not measured"
    return None if cand["available"] else cand["reason"]


def cell(
    results: dict[str, Any], key: str, name: str, get: Callable[[dict[str, Any]], float], digits: int = 1
) -> str:
    why = unavailable(results, name)
    if why is not None:
        return "not available"
    failed = failures(results, key, name)
    return fmt(series(results, key, name, get), digits) + (f" ({len(failed)} failed)" if failed else "")


def per_round_ratio(
    results: dict[str, Any], key: str, a: str, b: str, get: Callable[[dict[str, Any]], float]
) -> list[float]:
    data = results.get("data", {}).get(key, {})
    pairs = zip(data.get(a, []), data.get(b, []), strict=False)  # the same round of each
    return [get(x) / get(y) for x, y in pairs if "error" not in x and "error" not in y and get(y)]


# --------------------------------------------------------------------------------------------------
# targets


def p50(r: dict[str, Any]) -> float:
    return r["p50_us"]


def gbit(r: dict[str, Any]) -> float:
    return r["gbit_s"]


def conn_s(r: dict[str, Any]) -> float:
    return r["conn_s"]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: description, measured ratios per round, the limit, and met / not met / unavailable."""
    sizes = results["settings"]["rtt_sizes"]
    streams = results["settings"]["bulk_streams"]
    rows: list[dict[str, Any]] = []

    def ratio(
        what: str, key: str, a: str, b: str, get: Callable[[dict[str, Any]], float], op: str, limit: float
    ) -> None:
        why = unavailable(results, a) or unavailable(results, b)
        vals = [] if why else per_round_ratio(results, key, a, b, get)
        rows.append(
            {
                "what": what,
                "values": vals,
                "op": op,
                "limit": limit,
                "unit": "x",
                "why": why,
                "key": key,
                "a": a,
                "b": b,
            }
        )

    for size in sizes:
        ratio(f"spliced RTT p50, {size} B / direct", f"rtt_{size}", "sp-spliced", "direct", p50, "<=", 1.3)
    for size in sizes:
        ratio(f"spliced RTT p50, {size} B / HAProxy", f"rtt_{size}", "sp-spliced", "haproxy", p50, "<=", 0.6)
    for n in streams:
        ratio(f"spliced bulk, {n} stream(s) / HAProxy", f"bulk_{n}", "sp-spliced", "haproxy", gbit, ">=", 1.2)
    for size in sizes:
        ratio(
            f"userspace RTT p50, {size} B / HAProxy", f"rtt_{size}", "sp-userspace", "haproxy", p50, "<=", 1.5
        )
    for n in streams:
        ratio(
            f"userspace bulk, {n} stream(s) / HAProxy",
            f"bulk_{n}",
            "sp-userspace",
            "haproxy",
            gbit,
            ">=",
            1.0,
        )
    ratio(
        "steered connection rate / plain bound listener",
        "rate",
        "direct-steered",
        "direct",
        conn_s,
        ">=",
        0.95,
    )
    biggest = max((int(k) for k in results.get("install", {})), default=0)
    installs = [t["install_s"] for t in results.get("install", {}).get(str(biggest), [])]
    rows.append(
        {
            "what": f"install {biggest} prefixes x ports 1-65535 (seconds)",
            "values": installs,
            "op": "<",
            "limit": 2.0,
            "unit": " s",
            "why": None if installs else "not measured",
            "key": "install",
        }
    )
    for row in rows:
        failed = [] if row["key"] == "install" else failures(results, row["key"], row["a"])
        note = f" ({len(failed)} failed round(s), see Errors)" if failed else ""
        if row["why"] or not row["values"]:
            row["status"] = f"not available: {row['why'] or 'no successful round'}{note}"
            continue
        med = statistics.median(row["values"])
        ok = {"<=": med <= row["limit"], ">=": med >= row["limit"], "<": med < row["limit"]}[row["op"]]
        row["status"] = ("met" if ok else "**not met**") + note
        row["met"] = ok
    return rows


# --------------------------------------------------------------------------------------------------
# markdown


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def machine_section(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    s = results["settings"]
    plan = results.get("cpu_plan", {})
    load = ", ".join(f"{x:.2f}" for x in m["loadavg_start"])
    layout = results.get("cpu_layout", "shared")
    if layout == "shared":
        placement = (
            f"client, server and proxy all pinned to CPU {plan.get('client')}; the `xcpu` rows move the "
            f"proxy (for `direct`: the server) to CPU {plan.get('other')}"
        )
    elif layout == "split":
        placement = f"client and server on CPU {plan.get('client')}, proxy alone on CPU {plan.get('proxy')}"
    else:
        placement = "no pinning"
    return [
        f"- **Date**: {results['date']}; mode `{s['mode']}`; {s['rounds']} interleaved rounds each; "
        f"whole run {results.get('duration_s', 0):.0f} s",
        f"- **Load average** (1/5/15 min) at start: {load}"
        + (
            f"; at the end: {', '.join(f'{x:.2f}' for x in results['loadavg_end'])}"
            if "loadavg_end" in results
            else ""
        )
        + " (this run's own processes keep about one CPU busy)",
        f"- **Machine**: {m['cpu_model']}, {m['cpus']} CPUs, {m['mem_gib']} GiB; {m['os']}; "
        f"kernel {m['kernel']}",
        f"- **Software**: Python {m['python']}, trio {m['trio']}, {m['haproxy']}; "
        f"sockpolicy at `{m['commit']}`"
        + (
            f" plus uncommitted changes to {', '.join(f'`{f}`' for f in m['dirty'])}"
            if m.get("dirty")
            else ""
        ),
        f"- **CPU placement**: {placement}",
        f"- **Durations**: RTT {s['rtt_duration']} s, bulk {s['bulk_duration']} s, connection rate "
        f"{s['rate_duration']} s per candidate per round; idle test {s['idle_conns']} connections, "
        f"{s['idle_rounds']} round(s)",
    ]


def write_markdown(results: dict[str, Any], md: Path, img_rel: str, plots: list[str]) -> None:
    s = results["settings"]
    L: list[str] = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/run.py and bench/report.py from the results JSON; do not edit by hand. -->",
        "",
        "sockpolicy's data paths side by side with a direct loopback connection, HAProxy and a minimal "
        "trio copy loop. Regenerate with `make bench` (full) or `.venv/bin/python bench/run.py --quick`; "
        "raw results are written to `bench/out/`. Each cell is the **median over the rounds, [min-max]**; "
        "the candidates run interleaved (A B C D E, A B C D E, ...) in one network namespace over loopback, "
        "driven by the same Python load generator (`bench/loadgen.py`: blocking sockets, `recv_into`, "
        "TCP_NODELAY) against the same upstream server (`bench/server.py`).",
        "",
        "## Setup",
        "",
        *machine_section(results),
        "",
        "## Candidates",
        "",
    ]
    rows = []
    for name, desc in DESCRIPTIONS.items():
        if name == KERNEL_ONLY:
            cand = results.get("candidates", {}).get(name, {})
            desc = desc.format(high=_mib(cand.get("backlog_high")), low=_mib(cand.get("backlog_low")))
        why = unavailable(results, name)
        rows.append([f"`{name}`", desc, "measured" if why is None else f"not available: {why}"])
    L += table(["candidate", "what", "status"], rows)

    L += [
        "",
        "## Targets",
        "",
        "Ratios are computed per round between measurements taken back to back, then summarised.",
        "",
    ]
    rows = []
    for t in targets(results):
        unit = t["unit"]
        digits = 3 if unit == " s" else 2
        measured = fmt(t["values"], digits, unit) if t["values"] else "n/a"
        rows.append([t["what"], measured, f"{t['op']} {t['limit']}{unit}", t["status"]])
    L += table(["target", "measured", "target", "status"], rows)

    # RTT
    L += [
        "",
        "## Request/response round trip",
        "",
        "One connection, TCP_NODELAY, a request of the given size echoed back; microseconds.",
        "",
    ]
    header = ["candidate"]
    for size in s["rtt_sizes"]:
        header += [f"{size} B p50", f"{size} B p99"]
    rows = []
    for name in DATA_PATH:
        row = [f"`{name}`"]
        for size in s["rtt_sizes"]:
            row += [
                cell(results, f"rtt_{size}", name, p50),
                cell(results, f"rtt_{size}", name, lambda r: r["p99_us"]),
            ]
        rows.append(row)
    L += table(header, rows)
    xkey = f"rtt_{s['rtt_sizes'][0]}_xcpu"
    if results.get("data", {}).get(xkey):
        L += [
            "",
            f"**Across CPUs**: the same {s['rtt_sizes'][0]} B round trip with the proxy (for `direct`: "
            "the server) on the other CPU. Each proxied round trip then needs four cross-CPU wakeups "
            "instead of none.",
            "",
        ]
        rows = [
            [
                f"`{n}`",
                cell(results, xkey, n, p50),
                cell(results, xkey, n, lambda r: r["p99_us"]),
                cell(results, f"rtt_{s['rtt_sizes'][0]}", n, p50),
            ]
            for n in DATA_PATH
        ]
        L += table(["candidate", "p50 across CPUs", "p99 across CPUs", "p50 same CPU (above)"], rows)

    # bulk + CPU
    L += [
        "",
        "## Bulk throughput and CPU per GB",
        "",
        "Each stream sends for the whole duration, half-closes and waits for the server's byte count; "
        "Gbit/s of payload. CPU seconds per GB moved, measured during the 1-stream run: the proxy process, "
        "client + server + proxy processes, and the whole machine (`/proc/stat`, includes softirq work and "
        "anything else running).",
        "",
    ]
    header = ["candidate"] + [f"{n} stream(s), Gbit/s" for n in s["bulk_streams"]]
    header += [
        "proxy CPU s/GB",
        "client+server+proxy CPU s/GB",
        "machine CPU s/GB",
        "1 stream across CPUs, Gbit/s",
    ]
    rows = []
    for name in bulk_names(results):
        row = [f"`{name}`"] + [cell(results, f"bulk_{n}", name, gbit) for n in s["bulk_streams"]]
        row.append(
            "-"
            if name == "direct"
            else cell(results, "bulk_1", name, lambda r: r["cpu_s_per_gb"].get("proxy", 0.0), 2)
        )
        row.append(
            cell(
                results,
                "bulk_1",
                name,
                lambda r: sum(v for k, v in r["cpu_s_per_gb"].items() if k != "system"),
                2,
            )
        )
        row.append(cell(results, "bulk_1", name, lambda r: r["cpu_s_per_gb"]["system"], 2))
        xcpu = results.get("data", {}).get("bulk_1_xcpu", {})
        row.append(cell(results, "bulk_1_xcpu", name, gbit) if name in xcpu else "n/a")
        rows.append(row)
    L += table(header, rows)
    L += _kernel_only_note(results)

    # rate
    L += [
        "",
        "## Connection rate",
        "",
        "Sequential: connect, send one byte, receive one byte, wait for the server's close, close. "
        "Connections per second. `direct-steered` reaches the same listening socket as `direct` through "
        "the SK_LOOKUP dispatcher (the program runs for `direct` too, finds no binding and passes).",
        "",
    ]
    rows = [
        [f"`{n}`", cell(results, "rate", n, conn_s, 0)]
        for n in ["direct", "direct-steered", "haproxy", "trio-copy", "sp-userspace", "sp-spliced"]
    ]
    L += table(["candidate", "connections/s"], rows)

    # idle
    L += [
        "",
        "## Memory with idle connections",
        "",
        f"RSS of the proxy process with {s['idle_conns']} idle connections open through it (one byte "
        "exchanged, so both legs exist), and the growth per connection over the proxy's RSS before the "
        "first round.",
        "",
    ]
    rows = []
    for n in ["haproxy", "trio-copy", "sp-userspace", "sp-spliced"]:
        runs = [r for r in results.get("data", {}).get("idle", {}).get(n, []) if "error" not in r]
        if unavailable(results, n) is not None or not runs:
            rows.append([f"`{n}`", "not available", "", ""])
            continue
        # Later rounds start from a heap the first round grew (freed memory is kept for reuse), so the
        # growth per connection is taken against the first round's starting point.
        first = runs[0]["rss_before_kib"]
        rss = [r["rss_kib"] for r in runs]
        per_conn = (statistics.median(rss) - first) / runs[0]["connections"]
        rows.append([f"`{n}`", fmt([x / 1024 for x in rss]), f"{first / 1024:.1f}", f"{per_conn:.1f}"])
    L += table(["candidate", "RSS MiB", "RSS before the first round, MiB", "KiB per connection"], rows)

    # dispatcher
    L += [
        "",
        "## Dispatcher: installing `--ports 1-65535`",
        "",
        "A fresh process opens a dispatcher (load + attach), then installs one binding per prefix "
        "(`10.x.y.0/24`, ports 1-65535) in a single `add_bindings` call. Kernel memory is the `memlock` "
        "the kernel reports for the dispatcher's maps (`/proc/PID/fdinfo`); RSS growth is the "
        "process's VmRSS increase across the install.",
        "",
    ]
    rows = []
    for n, trials in results.get("install", {}).items():
        rows.append(
            [
                n,
                fmt([t["install_s"] * 1e3 for t in trials], 1),
                fmt([t["open_s"] * 1e3 for t in trials], 1),
                fmt([t["map_memlock_growth_kib"] for t in trials], 1),
                fmt([t["map_memlock_kib"] / 1024 for t in trials], 1),
                fmt([t.get("rss_growth_kib", 0) for t in trials], 0),
            ]
        )
    L += table(
        [
            "prefixes",
            "install ms",
            "open ms",
            "map memory growth KiB",
            "map memory total MiB",
            "RSS growth KiB",
        ],
        rows,
    )

    lookup = results.get("lookup", {})
    if lookup:
        pre, ports = s["lookup_bindings"]
        L += [
            "",
            "## Dispatcher: SK_LOOKUP run time per lookup",
            "",
            "Kernel BPF run-time statistics (`enable_run_time_stats`, `run_time_ns / run_cnt` of the "
            "program) while the connection-rate client connects to a steered port. The large table is "
            f"{pre} prefixes x {ports} single-port bindings (so {ports} port classes and {pre * ports} trie "
            "entries) plus the steered `127.0.0.1/32` binding.",
            "",
        ]
        rows = []
        for key, entry in lookup.items():
            rr = entry["rounds"]
            rows.append(
                [
                    key,
                    fmt([r["ns_per_run"] for r in rr], 1),
                    fmt([r["runs"] / r["connections"] if r["connections"] else 0 for r in rr], 2),
                    fmt([r["conn_s"] for r in rr], 0),
                    "-" if entry["install_s"] is None else f"{entry['install_s']:.2f}",
                ]
            )
        L += table(["bindings", "ns per run", "runs per connection", "connections/s", "install s"], rows)

    L += errors_section(results)
    L += profile_section(results)
    L += bounds_section(results)
    if plots:
        L += ["", "## Plots", ""]
        L += [f"![{p}]({img_rel}/{p})" for p in plots]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(L) + "\n")


def errors_section(results: dict[str, Any]) -> list[str]:
    """Every measurement that failed, e.g. the load generator's byte count check."""
    rows = []
    for key, per_cand in results.get("data", {}).items():
        for name, runs in per_cand.items():
            for i, run in enumerate(runs):
                if "error" in run:
                    rows.append([key, f"`{name}`", str(i + 1), run["error"].replace("|", "/")])
    if not rows:
        return []
    return [
        "",
        "## Errors",
        "",
        "Failed measurements (excluded from the medians above). `bytes lost or duplicated: sent X, server "
        "counted Y` is the bulk client's integrity check: the server counted a different number of bytes "
        "than were sent.",
        "",
        *table(["measurement", "candidate", "round", "error"], rows),
    ]


def profile_section(results: dict[str, Any]) -> list[str]:
    prof = results.get("profile")
    if not prof:
        return []
    L = [
        "",
        "## Profiles",
        "",
        "Measured while the load generator ran a 64 B RTT load (per request) or a 1-stream bulk load (per "
        "64 KiB moved). The proxy process: CPU (perf `task-clock`) with its user/kernel split, context "
        "switches, syscalls by name (perf tracepoints `syscalls:sys_enter_*`). The whole machine: busy CPU "
        "(`/proc/stat`: client, server, proxy, kworkers, softirqs, and anything else running), workqueue "
        "items run by kworkers (`workqueue:workqueue_execute_start`) and context switches "
        "(`sched:sched_switch`).",
        "",
    ]
    rows = []
    for name, loads in prof.items():
        for load, e in loads.items():
            per = e.get("per_unit", {})
            sysw = e.get("system_per_unit", {})
            proc = name != "direct"
            rows.append(
                [
                    f"`{name}`",
                    load,
                    e["unit"],
                    f"{per.get('cpu_us', 0):.1f}" if proc else "-",
                    f"{per.get('user_us', 0):.1f} / {per.get('sys_us', 0):.1f}" if proc else "-",
                    f"{per.get('context-switches', 0):.2f}" if proc else "-",
                    (_sysc(per) or "none") if proc else "-",
                    f"{sysw.get('machine_cpu_us', 0):.1f}",
                    f"{sysw.get('workqueue_execute_start', 0):.2f}",
                    f"{sysw.get('sched_switch', 0):.2f}",
                ]
            )
    L += table(
        ["path", "load", "per", "proxy CPU µs", "user / kernel µs", "proxy ctx switches", "proxy syscalls",
         "machine CPU µs", "kworker items", "machine ctx switches"],
        rows,
    )  # fmt: skip
    for name, loads in prof.items():
        for load, e in loads.items():
            if e.get("kernel_top"):
                threads = ", ".join(f"{c} {p:.0f}%" for c, p in e.get("by_thread", []))
                L += [
                    "",
                    f"perf record -a (cpu-clock), `{name}` under `{load}`: busy samples by thread: "
                    f"{threads}. Hottest symbols (% of busy samples):",
                    "",
                ]
                L += table(["symbol", "%"], [[f"`{sym}`", f"{pct:.1f}"] for sym, pct in e["kernel_top"][:8]])
    for name, loads in prof.items():
        for load, e in loads.items():
            pb = e.get("psock_backlog")
            if pb:
                L += [
                    "",
                    f"Kernel psock backlog worker (`sk_psock_backlog`), `{name}` under `{load}`: "
                    + _backlog(pb, e),
                ]
    for name, loads in prof.items():
        for load, e in loads.items():
            top = e.get("top_python")
            if top:
                L += ["", f"py-spy, `{name}` under `{load}` (self time, % of samples):", ""]
                L += table(["function", "%"], [[f"`{f}`", f"{pct:.1f}"] for f, pct in top[:8]])
    counters = results.get("splice_counters")
    if counters and counters.get("splice"):
        sp = counters["splice"]
        L += [
            "",
            f"Spliced candidate's counters at the end of the data-path measurements: {sp.get('spliced', 0)} "
            f"connections spliced, {sp.get('fallbacks', 0)} fell back to userspace; "
            f"{sp.get('bytes_spliced', 0) / 1e9:.2f} GB moved by the kernel and "
            f"{counters.get('bytes_from_client', 0) / 1e9:.2f} GB (client to upstream) relayed by the proxy "
            "process.",
        ]
    return L


def bounds_section(results: dict[str, Any]) -> list[str]:
    """For every target not met, what the measurements say bounds it (generated from the data)."""
    missed = [
        t
        for t in targets(results)
        if not t.get("met", True) or ("status" in t and t["status"].startswith("not available"))
    ]
    if not missed:
        return []
    L = ["", "## What bounds the misses", ""]
    prof = results.get("profile", {})
    # Unavailable targets share their reason (one candidate missing): one line per reason.
    by_reason: dict[str, list[str]] = {}
    for t in missed:
        if t["status"].startswith("not available"):
            by_reason.setdefault(t["status"], []).append(t["what"])
    for status, whats in by_reason.items():
        L.append(f"- **{'; '.join(whats)}**: {status}.")
    explained: set[tuple[str, str]] = set()
    for t in missed:
        if t["status"].startswith("not available"):
            continue
        topic = (str(t.get("a")), str(t.get("key", "")).split("_")[0])
        if topic in explained:
            med = statistics.median(t["values"])
            L.append(f"- **{t['what']}**: {med:.2f}{t['unit']} against {t['op']} {t['limit']}; as above.")
            continue
        explained.add(topic)
        med = statistics.median(t["values"])
        text = f"- **{t['what']}**: {med:.2f}{t['unit']} against {t['op']} {t['limit']}. "
        a, key = t.get("a"), t.get("key", "")
        if a == "sp-userspace" and prof.get("sp-userspace"):
            load = "rtt_64" if key.startswith("rtt") else "bulk_1"
            mine = prof["sp-userspace"].get(load, {}).get("per_unit", {})
            ha = prof.get("haproxy", {}).get(load, {}).get("per_unit", {})
            tc = prof.get("trio-copy", {}).get(load, {}).get("per_unit", {})
            unit = prof["sp-userspace"][load]["unit"]
            text += (
                f"Per {unit} the sockpolicy proxy spends {_cpu(mine)} of CPU, against {_cpu(ha)} for "
                f"HAProxy and {_cpu(tc)} for the bare trio copy loop; syscalls per {unit}: "
                f"{_nsys(mine):.1f} ({_sysc(mine)}), HAProxy {_nsys(ha):.1f}, trio-copy {_nsys(tc):.1f}. "
            )
            top = prof["sp-userspace"].get(load, {}).get("top_python")
            if top:
                text += (
                    "py-spy self time (time inside a C call, e.g. the recv/send/epoll_wait syscall, counts "
                    "for the Python function making it): "
                    + ", ".join(f"`{f}` {p:.0f}%" for f, p in top[:4])
                    + ". "
                )
            if key.startswith("rtt"):
                size = key.split("_")[1]
                d = _median(results, key, "direct", p50)
                h = _median(results, key, "haproxy", p50)
                c = _median(results, key, "trio-copy", p50)
                if d and h:
                    budget = t["limit"] * h - d
                    extra = _nsys(mine) - _nsys(tc)
                    text += (
                        f"Client, server and proxy share one CPU, so a round trip is serial and the proxy's "
                        f"CPU time per request adds to it roughly one for one (direct is {d:.1f} µs). The "
                        f"target ({t['limit']} x HAProxy's {h:.1f} µs at {size} B) leaves the proxy about "
                        f"{budget:.1f} µs per request; the bare trio copy loop alone reaches {c:.1f} µs "
                        f"({c / h:.2f}x HAProxy): trio's per-wakeup cost (an EAGAIN `recv` before each wait, "
                        "epoll re-registration, a run-loop pass with its own `epoll_wait`) already uses most "
                        f"of it. sockpolicy's relay adds {extra:.1f} syscalls per request over that loop "
                        "(the extra `epoll_wait`s are extra run-loop passes: each checkpoint in the "
                        "per-message path ends a pass) plus its per-message Python work. Message size "
                        "hardly matters: the copy is cheap next to the wakeups."
                    )
            else:
                text += (
                    f"Kernel time per 64 KiB (two copies through userspace, loopback TCP delivery) is "
                    f"{mine.get('sys_us', 0):.1f} µs for sockpolicy and {tc.get('sys_us', 0):.1f} µs for the "
                    f"trio loop; the difference is userspace: {mine.get('user_us', 0):.1f} µs against "
                    f"{tc.get('user_us', 0):.1f} µs (trio loop) and {ha.get('user_us', 0):.1f} µs (HAProxy, "
                    "whose default 16 KiB buffers cost it more syscalls and kernel time instead)."
                )
        elif a == "sp-spliced" and (prof.get("sp-spliced") or key.startswith("bulk")):
            if key.startswith("bulk"):
                text += _kernel_only_bound(results, t["limit"], prof)
            if prof.get("sp-spliced"):
                text += _spliced_bounds(results, key, prof)
        elif key == "rate":
            text += (
                "The plain listener also pays one run of the SK_LOOKUP program (no binding matched); "
                "see the run-time table. "
            )
        L.append(text)
    return L


def _kernel_share(counters: dict[str, Any]) -> float | None:
    """Share of the bytes a spliced candidate carried that the kernel moved (None: no counters)."""
    k = counters.get("splice", {}).get("bytes_spliced")
    if k is None:
        return None
    total = k + counters.get("bytes_from_client", 0)
    return k / total if total else None


def _kernel_only_note(results: dict[str, Any]) -> list[str]:
    """Under the bulk table: the kernel-only candidate's byte split and memory (or why it is missing)."""
    why = unavailable(results, KERNEL_ONLY)
    if why is not None:
        return (
            ["", f"`{KERNEL_ONLY}`: not available: {why}."]
            if KERNEL_ONLY in results.get("candidates", {})
            else []
        )
    if KERNEL_ONLY not in bulk_names(results):
        return []
    text = f"`{KERNEL_ONLY}` (bulk only, throttling disabled): "
    counters = results.get("splice_counters_kernel", {})
    share = _kernel_share(counters)
    if share is not None:
        sp = counters["splice"]
        text += (
            f"at the end of the run {sp.get('spliced', 0)} connections had been spliced, "
            f"{sp.get('fallbacks', 0)} fell back to userspace; the kernel moved "
            f"{sp.get('bytes_spliced', 0) / 1e9:.2f} GB and the proxy process relayed "
            f"{counters.get('bytes_from_client', 0) / 1e9:.2f} GB ({100 * share:.1f}% in the "
            "kernel). "
        )
    else:
        text += "no splice counters were collected (see the run log). "
    drops = [
        r["mem_available_drop_kib"] / 1024
        for k in results["settings"]["bulk_streams"]
        for r in results.get("data", {}).get(f"bulk_{k}", {}).get(KERNEL_ONLY, [])
        if "mem_available_drop_kib" in r
    ]
    if drops:
        text += (
            "With no bound on its redirect backlog, `MemAvailable` (machine-wide, sampled every 20 ms) fell "
            f"by at most {max(drops):.0f} MiB during one of its bulk runs (median "
            f"{statistics.median(drops):.0f} MiB); the load generator's sink reads at full speed, a slow "
            "reader would let it grow without limit."
        )
    secs = [
        r["seconds"]
        for k in results["settings"]["bulk_streams"]
        for r in results.get("data", {}).get(f"bulk_{k}", {}).get(KERNEL_ONLY, [])
        if "seconds" in r
    ]
    send = results["settings"].get("bulk_duration")
    if secs and send:
        text += (
            f" Its bulk runs took {min(secs):.2f} to {max(secs):.2f} s for a {send:g} s send phase: after "
            "the sender stopped, the kernel was still draining that "
            "backlog. Its Gbit/s are bytes delivered over the whole time."
        )
    return ["", text.rstrip()]


def _kernel_only_bound(results: dict[str, Any], limit: float, prof: dict[str, Any]) -> str:
    """The measured bound of spliced bulk: the kernel redirect alone (never throttled) against the Python
    relay and HAProxy, per stream count, with its CPU per GB and psock backlog worker profile."""
    streams = results["settings"]["bulk_streams"]
    if unavailable(results, KERNEL_ONLY) is not None or KERNEL_ONLY not in bulk_names(results):
        why = unavailable(results, KERNEL_ONLY) or "not measured in this run"
        return f"The kernel-only bound (`{KERNEL_ONLY}`) was not measured: {why}. "
    share = _kernel_share(results.get("splice_counters_kernel", {}))
    parts, below, slower = [], [], []
    for n in streams:
        key = f"bulk_{n}"
        k, u, sp, h = (
            _median(results, key, c, gbit) for c in (KERNEL_ONLY, "sp-userspace", "sp-spliced", "haproxy")
        )
        ratios = per_round_ratio(results, key, KERNEL_ONLY, "haproxy", gbit)
        r = statistics.median(ratios) if ratios else (k / h if h else 0.0)
        parts.append(
            f"{n} stream(s): {k:.2f} Gbit/s kernel-only ({r:.3f}x HAProxy), Python relay (`sp-userspace`) "
            f"{u:.2f}, `sp-spliced` {sp:.2f}, HAProxy {h:.2f}"
        )
        if r < limit:
            below.append(n)
        if u and k < u:
            slower.append(n)
    text = (
        f"Measured bound: with throttling disabled (`{KERNEL_ONLY}`"
        + (f", {100 * share:.0f}% of its bytes moved by the kernel" if share is not None else "")
        + "), medians over the rounds: "
        + "; ".join(parts)
        + ". "
    )
    if len(below) == len(streams):
        text += (
            f"So even with every byte kept in the kernel the {limit}x target is out of reach here: the "
            "kernel redirect path itself (SK_SKB verdict, then the psock backlog worker `sk_psock_backlog` "
            "transmitting on the target socket) bounds spliced bulk throughput, not the throttle or the "
            "Python relay. "
        )
    elif below:
        text += (
            f"The kernel redirect alone stays below {limit}x HAProxy with "
            + ", ".join(str(n) for n in below)
            + " stream(s) and reaches it otherwise. "
        )
    else:
        text += (
            f"The kernel redirect alone reaches {limit}x HAProxy: what bounds `sp-spliced` is the throttle "
            "that hands connections back to userspace, not the redirect. "
        )
    if slower:
        text += (
            "With "
            + ", ".join(str(n) for n in slower)
            + " stream(s) the kernel-only path is slower than relaying every byte through Python, so "
            "throttling back to userspace costs no throughput on this machine. "
        )
    cpu = {
        c: _median(results, "bulk_1", c, lambda r: r["cpu_s_per_gb"]["system"])
        for c in (KERNEL_ONLY, "sp-spliced", "sp-userspace", "haproxy")
    }
    text += (
        f"Machine CPU per GB (1 stream): kernel-only {cpu[KERNEL_ONLY]:.2f} s, `sp-spliced` "
        f"{cpu['sp-spliced']:.2f}, `sp-userspace` {cpu['sp-userspace']:.2f}, HAProxy {cpu['haproxy']:.2f}. "
    )
    e = prof.get(KERNEL_ONLY, {}).get("bulk_1", {})
    if e:
        sysw = e.get("system_per_unit", {})
        text += (
            f"Profile of `{KERNEL_ONLY}` under 1-stream bulk, per {e.get('unit', '64 KiB')}: "
            f"{sysw.get('machine_cpu_us', 0):.1f} µs of machine CPU, "
            f"{sysw.get('workqueue_execute_start', 0):.2f} kworker items, "
            f"{sysw.get('sched_switch', 0):.2f} context switches. "
        )
        threads = dict(e.get("by_thread", []))
        if e.get("kernel_top"):
            text += (
                "Busy samples by thread: "
                + ", ".join(f"{c} {p:.0f}%" for c, p in e.get("by_thread", [])[:4])
                + "; hottest symbols (all CPUs): "
                + ", ".join(f"`{sym}` {pct:.0f}%" for sym, pct in e["kernel_top"][:4])
                + ". "
            )
        pb = e.get("psock_backlog")
        if pb:
            text += f"Its redirect worker (`sk_psock_backlog`): {_backlog(pb, e)} "
            queued = pb.get("queued_by", {})
            timer = sum(v for k, v in queued.items() if k.startswith("timer"))
            total = sum(queued.values())
            runs = pb.get("runs_per_unit", 0.0)
            if runs:
                text += f"That is about {65536 / runs / 2**20:.2f} MiB transmitted per run. "
            drops = [
                r["mem_available_drop_kib"] / 1024
                for r in results.get("data", {}).get("bulk_1", {}).get(KERNEL_ONLY, [])
                if "mem_available_drop_kib" in r
            ]
            if drops and max(drops) >= 64:
                # The backlog grew: the sender outpaced the transmit, so the transmit side is the limit.
                text += (
                    f"`MemAvailable` fell by up to {max(drops):.0f} MiB in its 1-stream runs: the unsent "
                    "redirect backlog grew, so the sender outpaced the transmit and the limit is the "
                    "transmit, which runs in that worker; yet kworkers hold only "
                    f"{threads.get('kworker', 0):.0f}% of the busy samples: the worker waits more than it "
                    "works. The bound is how often and how long the worker runs, not a copy or a syscall "
                    f"in the proxy process ({e.get('per_unit', {}).get('cpu_us', 0):.1f} µs of its CPU per "
                    f"{e.get('unit', '64 KiB')}). {timer} of {total} runs were queued by the retry timer "
                    "(target's send buffer full: re-queued one jiffy later), the rest by the sender; how "
                    "much of the wait is for the CPU the worker shares with client and server is not "
                    "measured. "
                )
            elif "kworker" in threads:
                text += (
                    f"kworkers hold {threads['kworker']:.0f}% of the busy samples: the redirect's transmit "
                    "runs in one kworker per socket, serialised behind its wakeups. "
                )
    elif not prof:
        text += "(No profile in this run: the profile phase runs in full mode or with `--profile`.) "
    return text


def _spliced_bounds(results: dict[str, Any], key: str, prof: dict[str, Any]) -> str:
    load = "rtt_64" if key.startswith("rtt") else "bulk_1"
    mine = prof["sp-spliced"].get(load, {})
    base = prof.get("direct", {}).get(load, {})
    ha = prof.get("haproxy", {}).get(load, {})
    sysm, sysd, sysh = (x.get("system_per_unit", {}) for x in (mine, base, ha))
    per = mine.get("per_unit", {})
    unit = mine.get("unit", "request")
    wq = sysm.get("workqueue_execute_start", 0.0)
    text = (
        f"Per {unit} the machine spends {sysm.get('machine_cpu_us', 0):.1f} µs of CPU on the spliced path "
        f"(direct {sysd.get('machine_cpu_us', 0):.1f}, HAProxy {sysh.get('machine_cpu_us', 0):.1f}) with "
        f"{sysm.get('sched_switch', 0):.1f} context switches (direct {sysd.get('sched_switch', 0):.1f}) and "
        f"{wq:.2f} workqueue items. "
    )
    threads = dict(mine.get("by_thread", []))
    if wq >= 0.5:
        text += (
            "An SK_SKB verdict that redirects to the egress of another socket does not transmit in place: "
            "the kernel queues the skb on the target's psock and a kworker sends it (`sk_psock_backlog`), so "
            "each direction of a spliced round trip costs a kworker wakeup and two context switches, the "
            "same kind of hop a userspace proxy costs"
            + (
                f" (kworkers hold {threads['kworker']:.0f}% of the busy samples)"
                if "kworker" in threads
                else ""
            )
            + ". "
        )
    pb = mine.get("psock_backlog")
    if unit != "request" and pb and pb.get("share_of_time_in_gaps_ge_1ms", 0) >= 0.2:
        queued = pb.get("queued_by", {})
        timer = sum(v for k, v in queued.items() if k.startswith("timer"))
        total = sum(queued.values()) or 1
        text += f"The redirect worker mostly sat idle: {_backlog(pb, mine)} "
        if timer / total >= 0.3:
            text += (
                "Most runs were queued by a timer: when the target socket's send buffer is full, "
                "`sk_psock_backlog` re-queues itself as delayed work one jiffy later, so the stream moves "
                "about one send buffer per jiffy. "
            )
        else:
            counters = results.get("splice_counters", {})
            moved_k = counters.get("splice", {}).get("bytes_spliced", 0)
            moved_u = counters.get("bytes_from_client", 0)
            text += (
                f"Only {timer} of {total} runs were queued by the retry timer: the gaps are not the kernel "
            )
            if moved_u > moved_k:
                text += (
                    "waiting for a full send buffer but time in which the connection was relayed by "
                    "the proxy process instead (counters under Profiles: more bytes relayed in userspace "
                    "than spliced; after a throttle, i.e. a redirect backlog above the high mark, "
                    "docs/splice.md says much of the rest of a connection is relayed in userspace). "
                )
            else:
                text += "waiting for a full send buffer; nothing reached the redirect during them. "
    counters = results.get("splice_counters", {})
    if unit != "request" and counters.get("splice"):
        moved_k = counters["splice"].get("bytes_spliced", 0)
        moved_u = counters.get("bytes_from_client", 0)
        text += (
            f"Over the whole run the kernel moved {moved_k / 1e9:.2f} GB for the spliced candidate and its "
            f"proxy process relayed {moved_u / 1e9:.2f} GB (client to upstream) itself. "
        )
    top = mine.get("top_python")
    if unit != "request" and top:
        text += (
            "Spliced proxy process, py-spy self time: "
            + ", ".join(f"`{f}` {p:.0f}%" for f, p in top[:3])
            + ". "
        )
    if unit != "request" and wq < 0.05 and _nsys(per) >= 1.5:
        text += (
            f"Under bulk load the proxy process itself made {_nsys(per):.1f} syscalls ({_sysc(per)}) per "
            "64 KiB and almost no workqueue item ran: the connection was relayed in userspace, not spliced "
            "(the redirect backlog passed its high mark, which hands the connection back to userspace; see "
            "the spliced candidate's counters under Profiles)."
        )
    if unit == "request" and per.get("context-switches", 1.0) < 0.1 and _nsys(per) >= 1.0:
        text += (
            f"The proxy process did not sleep while its connection was spliced: {_nsys(per):.1f} syscalls "
            f"({_sysc(per)}) and {per.get('cpu_us', 0):.1f} µs of CPU per request with "
            f"{per.get('context-switches', 0):.2f} context switches, i.e. it polls a socket whose bytes the "
            "kernel redirects, and on a shared CPU that time is taken from the client and server."
        )
    return text


def _backlog(pb: dict[str, Any], e: dict[str, Any]) -> str:
    hz = pb.get("hz")
    jiffy = f" (one jiffy at CONFIG_HZ={hz} is {1000 / hz:.0f} ms)" if hz else ""
    queued = ", ".join(f"{k} {v}" for k, v in sorted(pb.get("queued_by", {}).items(), key=lambda kv: -kv[1]))
    return (
        f"{pb['runs_per_unit']:.2f} runs per {e['unit']}; queued by: {queued or 'nothing'}; "
        f"{pb['gaps_ge_1ms']} gaps of 1 ms or more between runs, "
        f"{100 * pb['share_of_time_in_gaps_ge_1ms']:.0f}% "
        f"of the time, median {pb['median_long_gap_ms']:.1f} ms{jiffy}."
    )


def _nsys(per: dict[str, float]) -> float:
    return sum(v for k, v in per.items() if k not in _NOT_SYSCALLS)


def _sysc(per: dict[str, float]) -> str:
    items = sorted(((k, v) for k, v in per.items() if k not in _NOT_SYSCALLS), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.1f}" for k, v in items)


def _cpu(per: dict[str, float]) -> str:
    user, kernel = per.get("user_us", 0), per.get("sys_us", 0)
    return f"{per.get('cpu_us', 0):.1f} µs ({user:.1f} user + {kernel:.1f} kernel)"


def _median(results: dict[str, Any], key: str, name: str, get: Callable[[dict[str, Any]], float]) -> float:
    vals = series(results, key, name, get)
    return statistics.median(vals) if vals else 0.0


_NOT_SYSCALLS = ("cpu_us", "user_us", "sys_us", "context-switches")


# --------------------------------------------------------------------------------------------------
# plots


def write_plots(results: dict[str, Any], img: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    s = results["settings"]
    data = results.get("data", {})
    names = [n for n in DATA_PATH if unavailable(results, n) is None]
    bulk = [n for n in bulk_names(results) if unavailable(results, n) is None]
    written: list[str] = []

    def bars(
        ax: Any, groups: list[str], values: dict[str, list[list[float]]], ylabel: str, title: str
    ) -> None:
        width = 0.8 / max(1, len(values))
        for i, (label, per_group) in enumerate(values.items()):
            meds = [statistics.median(v) if v else 0 for v in per_group]
            lo = [m - min(v) if v else 0 for m, v in zip(meds, per_group, strict=True)]
            hi = [max(v) - m if v else 0 for m, v in zip(meds, per_group, strict=True)]
            xs = [g + (i - (len(values) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=label)
        ax.set_xticks(range(len(groups)), groups, rotation=15)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    # RTT p50/p99 per size
    fig, axes = plt.subplots(1, len(s["rtt_sizes"]), figsize=(6 * len(s["rtt_sizes"]), 4), squeeze=False)
    for ax, size in zip(axes[0], s["rtt_sizes"], strict=True):
        key = f"rtt_{size}"
        vals = {
            q: [series(results, key, n, lambda r, q=q: r[f"{q}_us"]) for n in names] for q in ("p50", "p99")
        }
        bars(ax, names, vals, "µs", f"round trip, {size} B (median, min-max over rounds)")
    fig.tight_layout()
    fig.savefig(img / "bench-rtt.png", dpi=90)
    plt.close(fig)
    written.append("bench-rtt.png")

    # RTT CDF (first round of each candidate's median-p50 round)
    key = f"rtt_{s['rtt_sizes'][0]}"
    if data.get(key):
        fig, ax = plt.subplots(figsize=(7, 4))
        from loadgen import QUANTILES

        for n in names:
            runs = data[key].get(n, [])
            if not runs:
                continue
            run = sorted(runs, key=p50)[len(runs) // 2]
            ax.plot(run["quantiles_us"], QUANTILES, label=n)
        ax.set_xscale("log")
        ax.set_xlabel("round trip, µs (log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"round-trip distribution, {s['rtt_sizes'][0]} B (median round)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "bench-rtt-cdf.png", dpi=90)
        plt.close(fig)
        written.append("bench-rtt-cdf.png")

    # bulk + CPU/GB
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    vals = {
        f"{k} stream(s)": [series(results, f"bulk_{k}", n, gbit) for n in bulk] for k in s["bulk_streams"]
    }
    bars(ax1, bulk, vals, "Gbit/s", "bulk throughput")
    cpu = {
        "proxy": [series(results, "bulk_1", n, lambda r: r["cpu_s_per_gb"].get("proxy", 0.0)) for n in bulk],
        "client+server+proxy": [
            series(
                results, "bulk_1", n, lambda r: sum(v for k, v in r["cpu_s_per_gb"].items() if k != "system")
            )
            for n in bulk
        ],
    }
    bars(ax2, bulk, cpu, "CPU seconds per GB", "CPU per GB moved (1 stream)")
    fig.tight_layout()
    fig.savefig(img / "bench-bulk.png", dpi=90)
    plt.close(fig)
    written.append("bench-bulk.png")

    # connection rate + idle RSS
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    rate_names = [
        n
        for n in ["direct", "direct-steered", "haproxy", "trio-copy", "sp-userspace", "sp-spliced"]
        if unavailable(results, n) is None
    ]
    bars(
        ax1,
        rate_names,
        {"connections/s": [series(results, "rate", n, conn_s) for n in rate_names]},
        "connections/s",
        "connection rate (sequential)",
    )
    idle_names = [
        n for n in ["haproxy", "trio-copy", "sp-userspace", "sp-spliced"] if data.get("idle", {}).get(n)
    ]
    bars(
        ax2,
        idle_names,
        {"RSS MiB": [series(results, "idle", n, lambda r: r["rss_kib"] / 1024) for n in idle_names]},
        "MiB",
        f"proxy RSS with {s['idle_conns']} idle connections",
    )
    fig.tight_layout()
    fig.savefig(img / "bench-rate-idle.png", dpi=90)
    plt.close(fig)
    written.append("bench-rate-idle.png")
    return written


def write_report(results: dict[str, Any], md: Path, img: Path) -> None:
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    plots = write_plots(results, img)
    write_markdown(results, md, os.path.relpath(img, md.parent), plots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", nargs="?", type=Path, default=REPO / "bench" / "out" / "latest.json")
    parser.add_argument("--md", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--img", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()
    write_report(json.loads(args.json.read_text()), args.md, args.img)
    print(f"wrote {args.md} and plots in {args.img}")


if __name__ == "__main__":
    main()
