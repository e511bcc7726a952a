#!/usr/bin/env bash
# Set up the benchmark's own virtualenv (.venv-bench: this package plus
# the clients it is compared with, which are never dependencies of ours)
# and run tools/bench. Arguments go to tools/bench (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-bench bash tools/setup.sh
.venv-bench/bin/python -m pip install -q --disable-pip-version-check \
    'qemu.qmp==0.0.6' 'qmp==1.1.0'
exec .venv-bench/bin/python tools/bench "$@"
