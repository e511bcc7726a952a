#!/usr/bin/env bash
# Build the sdist and the wheel into dist/, check them with twine, then
# install the package from the unpacked sdist (not editable, with the
# test extra only: no uvloop, no orjson) into a fresh virtualenv made
# with $PYTHON (default python3), and run the sdist's own test suite
# there, from the unpacked directory: the sdist tests itself, and the
# package works without the speed extra. Extra arguments go to pytest.
# Needs .venv with the dist extra (tools/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf dist build/dist-check
.venv/bin/python -m build -q --outdir dist . >/dev/null
.venv/bin/twine check --strict dist/*
for file in LICENSE qmp_sync/py.typed; do
    unzip -l dist/qmp_sync-*.whl | grep -q "$file" \
        || { echo "error: the wheel lacks $file" >&2; exit 1; }
done

work=build/dist-check
mkdir -p "$work"
tar -xzf dist/qmp_sync-*.tar.gz -C "$work"
unpacked=$(echo "$work"/qmp_sync-*/)
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check \
    "${unpacked}[test]"
for module in orjson uvloop; do
    if "$work/venv/bin/python" -c "import $module" 2>/dev/null; then
        echo "error: $module is installed in $work/venv" >&2
        exit 1
    fi
done
echo "== pytest in the unpacked sdist ($unpacked), installed from it"
cd "$unpacked"
../venv/bin/pytest -q -p no:cacheprovider "$@"
