"""Build glue: the cffi libbpf extension and the BPF programs (metadata lives in pyproject.toml)."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent / "build_tools"))

import build_progs


class BuildExtAndPrograms(build_ext):
    """Build the cffi extension, then compile sockpolicy/progs/*.bpf.c next to it."""

    def run(self) -> None:
        try:
            build_progs.check_toolchain()
        except build_progs.ToolchainMissing as exc:
            sys.exit(f"error: {exc}")
        super().run()
        # An editable install keeps the objects next to their sources.
        out_dir = None if self.inplace else Path(self.build_lib) / "sockpolicy" / "progs"
        try:
            build_progs.compile_all(out_dir)
        except RuntimeError as exc:
            sys.exit(f"error: {exc}")


setup(
    cffi_modules=["build_tools/build_libbpf.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtAndPrograms},
)
