"""Smoke test of the benchmark harness (bench/): every measurement and the report, at tiny sizes.

It runs ``bench/run.py --smoke`` as a subprocess (the harness enters its own network namespace with
setns, which must not happen to the pytest process) and writes the JSON, markdown and plots into a
temporary directory, so docs/benchmarks.md is never touched.  Numbers are not checked, only that
every part ran and produced its fields; the benchmark code cannot rot unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.privileged, pytest.mark.timeout(60)]


def test_bench_smoke(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra is not installed (bench/setup.sh)")
    out = tmp_path / "results.json"
    md = tmp_path / "benchmarks.md"
    img = tmp_path / "img"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--json", str(out), "--md", str(md),
         "--img", str(img)],
        capture_output=True, text=True, timeout=50, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    data = results["data"]
    for key in ("rtt_64", "rtt_16384", "bulk_1", "bulk_4", "rate", "rtt_64_xcpu", "bulk_1_xcpu", "idle"):
        assert data[key], key
    assert data["rtt_64"]["direct"][0]["p50_us"] > 0
    assert data["rate"]["direct-steered"][0]["connections"] > 0
    assert data["idle"]["haproxy"][0]["connections"] == results["settings"]["idle_conns"]
    assert all(trials for trials in results["install"].values())
    assert results["lookup"] and all(e["rounds"][0]["runs"] > 0 for e in results["lookup"].values())
    # the spliced path is either measured or explains why not
    spliced = results["candidates"]["sp-spliced"]
    assert spliced["available"] or spliced["reason"]
    # the kernel-only spliced candidate: bulk only, measured or explained, with its byte split and memory
    kernel = results["candidates"]["sp-spliced-kernel"]
    assert kernel["available"] or kernel["reason"]
    assert all("sp-spliced-kernel" not in data[k] for k in ("rtt_64", "rate", "idle", "bulk_1_xcpu"))
    if kernel["available"]:
        assert "mem_available_drop_kib" in data["bulk_1"]["sp-spliced-kernel"][0]
        assert results["splice_counters_kernel"]["splice"]["spliced"] > 0
    text = md.read_text()
    if kernel["available"]:
        assert "| `sp-spliced-kernel` |" in text  # its bulk row
        if "- **spliced bulk, 1 stream(s) / HAProxy**" in text:  # a missed target states the measured bound
            assert "Measured bound: with throttling disabled (`sp-spliced-kernel`" in text
    assert "## Targets" in text and ("not available" in text or "sp-spliced" in data["rtt_64"])
    assert sorted(p.name for p in img.glob("bench-*.png")) == [
        "bench-bulk.png", "bench-rate-idle.png", "bench-rtt-cdf.png", "bench-rtt.png",
    ]  # fmt: skip
    # nothing left behind: the run's namespace and bpffs root are gone
    netns = results.get("netns")
    if netns:
        assert not Path("/run/netns", netns).exists()
        assert not Path("/sys/fs/bpf", netns).exists()
