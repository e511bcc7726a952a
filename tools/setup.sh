#!/usr/bin/env bash
# Set up everything qmp_sync's demo and tests need, idempotently:
#   - QEMU (qemu-system-x86_64, qemu-storage-daemon), the guest agent
#     (qemu-ga, run on the host for the shell's -N tests) and openssl
#     from Debian's packages, when absent (needs root or sudo);
#   - a virtualenv in .venv (override the interpreter with PYTHON=...,
#     the directory with VENV=...);
#   - the package in editable mode with the extras in EXTRAS (default
#     "test,speed": the test tools, uvloop and orjson).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-system-x86_64 >/dev/null \
        || ! PATH=$PATH:/usr/sbin command -v qemu-ga >/dev/null \
        || ! command -v openssl >/dev/null; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "setup: installing QEMU, qemu-ga and openssl with apt-get ..."
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends qemu-system-x86 qemu-guest-agent openssl
fi

venv=${VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    -e ".[${EXTRAS:-test,speed}]"
