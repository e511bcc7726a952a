#!/usr/bin/env bash
# Set up (tools/setup.sh) and run every check: mypy --strict (the
# package and tools/), ruff, the Sphinx manual in docs/ (warnings are
# errors; its examples and README's run as tests), QEMU's own tests of
# the protocol core (tools/qemu_protocol_tests.py downloads them), and
# the whole test
# suite against real QEMU, twice: with the speed extra (uvloop, orjson)
# in .venv, and without it in .venv-plain (the standard loop and json),
# under Python 3.9 when one is on PATH (the oldest version setup.cfg
# promises). Then the packaging check (tools/check_dist.sh): the sdist
# and the wheel are built and twine-checked, and the test suite runs
# from the unpacked sdist. Extra arguments go to pytest.
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
echo "== pytest without the speed extra ($("$plain_python" --version))"
PYTHON=$plain_python VENV=.venv-plain EXTRAS=test bash tools/setup.sh
if .venv-plain/bin/python -c 'import orjson' 2>/dev/null \
        || .venv-plain/bin/python -c 'import uvloop' 2>/dev/null; then
    echo "error: .venv-plain has the speed extra installed" >&2
    exit 1
fi
.venv-plain/bin/pytest -q -p no:cacheprovider "$@"
echo "== the sdist and the wheel: build, twine check, the sdist's own tests"
bash tools/check_dist.sh "$@"
