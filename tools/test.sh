#!/usr/bin/env bash
# Set up (tools/setup.sh) and run every check: mypy --strict (the
# package and tools/), ruff, the Sphinx manual in docs/ (warnings are
# errors; its examples and README's run as tests), the whole test suite
# against real QEMU with the speed extra (uvloop, orjson) in .venv, the
# suite's part that needs no QEMU with none configured, QEMU's own
# tests of the protocol core (tools/qemu_protocol_tests.py downloads
# them), and tools/check_dist.sh: build the sdist and the wheel,
# twine-check them, install the package from the unpacked sdist into a
# fresh virtualenv without the speed extra, under Python 3.9 when one
# is on PATH (the oldest version setup.cfg promises), and run the whole
# suite again from there. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

echo "== mypy --strict qmp_sync tools"
.venv/bin/mypy --strict qmp_sync
.venv/bin/mypy --strict tools/bench tools/qemu_protocol_tests.py
echo "== ruff check"
.venv/bin/ruff check qmp_sync tests tools docs
echo "== the reference manual (Sphinx, warnings as errors, nitpicky)"
.venv/bin/sphinx-build -q -E -W --keep-going -n -b html docs docs/_build/html
echo "== pytest (uvloop and orjson)"
.venv/bin/python -c 'import orjson, uvloop'
.venv/bin/pytest "$@"
echo "== pytest -m 'not qemu', as on a machine without QEMU"
QMP_SYNC_QEMU=/nonexistent/qemu-system-x86_64 .venv/bin/pytest -q \
    -p no:cacheprovider -m "not qemu" "$@"
echo "== QEMU's own protocol-core tests (from the qemu.qmp sdist) on ours"
.venv/bin/python tools/qemu_protocol_tests.py -q

plain_python=python3
for candidate in python3.9 \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9*/bin/python3.9; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 9)' \
            2>/dev/null; then
        plain_python=$candidate
        break
    fi
done
echo "== the sdist and the wheel, and the suite from the unpacked sdist" \
    "without the speed extra ($("$plain_python" --version))"
PYTHON=$plain_python bash tools/check_dist.sh "$@"
