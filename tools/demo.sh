#!/usr/bin/env bash
# Run a short live session against a guest-less QEMU (tools/demo.py),
# after setting up only what it needs, idempotently:
#   - QEMU (Debian's qemu-system-x86) when qemu-system-x86_64 is absent,
#     and python3-venv when the interpreter cannot make a virtualenv
#     (Debian ships python3 without ensurepip); installed with apt-get,
#     which needs root or sudo;
#   - a virtualenv in .venv-demo (override the interpreter with
#     PYTHON=...) holding the package in editable mode, without extras.
# Arguments go to tools/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.venv-demo

packages=()
command -v qemu-system-x86_64 >/dev/null || packages+=(qemu-system-x86)
if [ ! -x "$venv/bin/python" ] \
        && ! "$python" -c 'import ensurepip' 2>/dev/null; then
    packages+=(python3-venv)
fi
bash tools/apt_install.sh ${packages[@]+"${packages[@]}"}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e .
exec "$venv/bin/python" tools/demo.py "$@"
