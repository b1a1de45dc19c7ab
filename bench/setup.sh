#!/usr/bin/env bash
# Install what `make bench` needs, idempotently: HAProxy (Debian package, the baseline proxy) and the
# `bench` extra of pyproject.toml (matplotlib, for the plots) in the dev venv.  Each step is skipped
# when its result is already present, so a second run does no network I/O at all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if ! command -v haproxy >/dev/null 2>&1; then
    echo "bench/setup.sh: installing haproxy (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy >/dev/null; }
    # The Debian package starts a system-wide haproxy.service; the benchmark runs its own instances.
    systemctl disable --now haproxy >/dev/null 2>&1 || true
fi

if ! "$PY" -c 'import matplotlib' >/dev/null 2>&1; then
    # Only the extra's requirements: `pip install -e '.[bench]'` would also rebuild the cffi binding and
    # the BPF objects in place, under the feet of anyone running tests in this checkout.
    reqs=$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))')
    echo "bench/setup.sh: installing the bench extra: $(echo $reqs)"
    mapfile -t req_array <<<"$reqs"
    "$PY" -m pip install --quiet "${req_array[@]}"
fi
