#!/usr/bin/env bash
# Prepare this checkout for `make run` / `make test`. Idempotent: a second run does no apt or pip work.
#
#   1. Debian packages (clang, libbpf headers, iproute2, ...) - only those missing, via apt-get
#   2. .venv (created with $PYTHON, default python3 >= 3.11) if missing or broken
#   3. pip install -e '.[test]' - builds the cffi libbpf binding and the BPF objects; re-run only when
#      pyproject.toml, setup.py, build_tools/* or sockpolicy/progs/*.bpf.c|*.h changed since the last
#      install, or when a build output is missing
#   4. bpffs mounted at /sys/fs/bpf
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.sockpolicy-installed"
APT_PACKAGES=(clang llvm libbpf-dev libelf-dev zlib1g-dev linux-libc-dev libc6-dev pkg-config iproute2 util-linux)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root for: $*"
    fi
}

# ---- 1. system packages ---------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing missing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -q
    as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# ---- 2. virtualenv ---------------------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say ".venv is broken (its interpreter does not start): recreating it"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3.11+)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" --version 2>&1); sockpolicy needs Python >= 3.11"
    say "creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

# ---- 3. editable install (cffi extension + BPF objects) -------------------------------------------
reason=""
if [[ ! -f "$STAMP" ]]; then
    reason="first install into this .venv"
elif ! compgen -G 'sockpolicy/_libbpf_cffi*.so' >/dev/null; then
    reason="the cffi extension sockpolicy/_libbpf_cffi*.so is missing"
else
    for src in sockpolicy/progs/*.bpf.c; do
        [[ -e "$src" ]] || continue
        if [[ ! -f "${src%.c}.o" ]]; then
            reason="BPF object ${src%.c}.o is missing"
            break
        fi
    done
    if [[ -z "$reason" ]]; then
        changed="$(find pyproject.toml setup.py build_tools sockpolicy/progs \
            \( -name pyproject.toml -o -name setup.py -o -path 'build_tools/*.py' \
               -o -name '*.bpf.c' -o -name '*.h' \) -type f -newer "$STAMP" -print -quit 2>/dev/null || true)"
        [[ -z "$changed" ]] || reason="$changed changed since the last install"
    fi
fi
if [[ -n "$reason" ]]; then
    say "pip install -e '.[test]' ($reason)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e '.[test]'
    touch "$STAMP"
fi

# ---- 4. bpffs ------------------------------------------------------------------------------------
if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
    if [[ $EUID -eq 0 ]]; then
        say "mounting bpffs at /sys/fs/bpf"
        mkdir -p /sys/fs/bpf
        mount -t bpf bpf /sys/fs/bpf
    else
        say "warning: bpffs is not mounted at /sys/fs/bpf and we are not root; privileged tests will skip"
    fi
fi

say "ok"
