#!/usr/bin/env bash
# Set up (tools/setup.sh), then run a short live session against a
# guest-less QEMU (tools/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python tools/demo.py "$@"
