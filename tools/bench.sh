#!/usr/bin/env bash
# Set up the benchmark's own virtualenv (.venv-bench: this package with
# its speed extra, plus the clients it is compared with, which are never
# dependencies of ours) and run the benchmark (the package tools/bench).
# Arguments go to it (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-bench bash tools/setup.sh
.venv-bench/bin/python -m pip install -q --disable-pip-version-check \
    'qemu.qmp==0.0.6' 'qmp==1.1.0'
PYTHONPATH=tools${PYTHONPATH:+:$PYTHONPATH} \
    exec .venv-bench/bin/python -m bench "$@"
