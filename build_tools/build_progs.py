"""Compile every ``sockpolicy/progs/*.bpf.c`` into a BPF ELF object with clang.

Used by ``setup.py`` (at install time) and runnable by hand for development::

    python build_tools/build_progs.py            # in place, next to the sources
    python build_tools/build_progs.py OUTDIR      # into OUTDIR

A missing toolchain is one clear error naming the Debian packages to install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DEBIAN_PACKAGES = "clang llvm libbpf-dev libelf-dev linux-libc-dev"
SOURCE_DIR = Path(__file__).resolve().parent.parent / "sockpolicy" / "progs"


class ToolchainMissing(RuntimeError):
    pass


def _multiarch_include() -> list[str]:
    # BPF C includes <linux/types.h>, which needs <asm/types.h> from the multiarch include directory.
    try:
        triple = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        triple = None
    dirs = []
    if triple is not None:
        candidate = Path("/usr/include") / triple.stdout.strip()
        if candidate.is_dir():
            dirs.append(f"-I{candidate}")
    return dirs


def check_toolchain() -> str:
    clang = shutil.which("clang")
    if clang is None:
        raise ToolchainMissing(
            f"clang not found: install the Debian packages: apt-get install {DEBIAN_PACKAGES}"
        )
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        raise ToolchainMissing(
            f"libbpf headers not found (/usr/include/bpf/bpf_helpers.h): apt-get install {DEBIAN_PACKAGES}"
        )
    return clang


def compile_all(out_dir: Path | None = None) -> list[Path]:
    clang = check_toolchain()
    outputs = []
    for source in sorted(SOURCE_DIR.glob("*.bpf.c")):
        target_dir = out_dir if out_dir is not None else SOURCE_DIR
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / (source.name[: -len(".c")] + ".o")
        cmd = [
            clang, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
            "-D__TARGET_ARCH_x86", *_multiarch_include(), f"-I{SOURCE_DIR}",
            "-c", str(source), "-o", str(target),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed:\n{result.stderr}")
        outputs.append(target)
    return outputs


if __name__ == "__main__":
    try:
        built = compile_all(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    except (ToolchainMissing, RuntimeError) as exc:
        print(f"build_progs: {exc}", file=sys.stderr)
        sys.exit(2)
    for path in built:
        print(path)
