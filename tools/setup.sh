#!/usr/bin/env bash
# Set up everything qmp_sync's demo and tests need, idempotently:
#   - QEMU (qemu-system-x86_64, qemu-storage-daemon), the guest agent
#     (qemu-ga, run on the host for the shell's -N tests) and openssl
#     from Debian's packages, when absent, and python3-venv when the
#     interpreter cannot make a virtualenv (needs root or sudo);
#   - a virtualenv in .venv (override the interpreter with PYTHON=...,
#     the directory with VENV=...);
#   - the package in editable mode with the extras in EXTRAS (default
#     "test,speed,docs,dist": the test tools, uvloop and orjson, Sphinx,
#     build and twine).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v qemu-system-x86_64 >/dev/null || packages+=(qemu-system-x86)
PATH=$PATH:/usr/sbin command -v qemu-ga >/dev/null \
    || packages+=(qemu-guest-agent)
command -v openssl >/dev/null || packages+=(openssl)
# Debian's python3 makes no virtualenv without python3-venv.
"${PYTHON:-python3}" -c 'import ensurepip' 2>/dev/null \
    || packages+=(python3-venv)
bash tools/apt_install.sh ${packages[@]+"${packages[@]}"}

venv=${VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    -e ".[${EXTRAS:-test,speed,docs,dist}]"
