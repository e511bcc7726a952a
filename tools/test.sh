#!/usr/bin/env bash
# Set up (tools/setup.sh) and run every check: mypy --strict, ruff, and
# the whole test suite against real QEMU. Extra arguments go to pytest.
# When a Python 3.9 interpreter is on PATH the suite also runs under it
# (the oldest version setup.cfg promises).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

echo "== mypy --strict qmp_sync"
.venv/bin/mypy --strict qmp_sync
echo "== ruff check"
.venv/bin/ruff check qmp_sync tests tools tools/bench
echo "== pytest"
.venv/bin/pytest "$@"

py39=
for candidate in python3.9 \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9*/bin/python3.9; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 9)' \
            2>/dev/null; then
        py39=$candidate
        break
    fi
done
if [ -n "$py39" ]; then
    echo "== pytest under Python 3.9 ($py39)"
    PYTHON=$py39 VENV=.venv39 bash tools/setup.sh
    .venv39/bin/pytest -q -p no:cacheprovider "$@"
else
    echo "== no Python 3.9 on this machine: skipped the 3.9 run"
fi
