#!/usr/bin/env python3
"""
Run QEMU's own unit tests of the async protocol core against ours.

The ``qemu.qmp`` sdist on the package index carries
``tests/test_protocol.py``, QEMU's tests of the ``AsyncProtocol`` core
that ``qmp_sync.protocol`` implements from the same design. This script
downloads that sdist (pip, no dependencies, no wheel), takes the test
file out into a temporary directory, rewrites ``qemu.qmp`` to
``qmp_sync`` (its imports and the logger names it checks), and runs it
with pytest against the installed (checked-out) qmp_sync. Nothing of
QEMU's is kept or committed.

Usage: python tools/qemu_protocol_tests.py [--version 0.0.6] [PYTEST ARGS]
Exit status: pytest's (0 when every test passed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: The member of the sdist holding the tests, below its top directory.
TEST_FILE = "tests/test_protocol.py"


def fetch_tests(version: str, into: Path) -> Path:
    """Download the qemu.qmp sdist of `version` into `into`; return the
    path of its protocol tests, rewritten for qmp_sync."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet",
         "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:",
         "--dest", str(into), f"qemu.qmp=={version}"], check=True)
    (sdist,) = into.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        member = next(m for m in archive.getmembers()
                      if m.name.endswith("/" + TEST_FILE))
        extracted = archive.extractfile(member)
        assert extracted is not None
        text = extracted.read().decode("utf-8")
    target = into / "test_protocol.py"
    target.write_text(text.replace("qemu.qmp", "qmp_sync"))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split(
        "\n")[0])
    parser.add_argument("--version", default="0.0.6",
                        help="the qemu.qmp release (%(default)s)")
    args, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="qemu-protocol-tests-") as tmp:
        tests = fetch_tests(args.version, Path(tmp))
        # Its own directory as rootdir: none of this project's pytest
        # settings apply to QEMU's file.
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
             "--rootdir", tmp, "-o", "addopts=", "-W", "error",
             "--timeout", "60", *pytest_args, str(tests)],
            cwd=tmp, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
