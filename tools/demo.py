#!/usr/bin/env python3
"""
A short live session with a guest-less QEMU, through QMPSyncClient.

Starts ``qemu-system-x86_64 -machine none -nodefaults -display none -qmp
unix:PATH,server=on,wait=off``, connects while QEMU is still starting,
prints the version and status, shows an error reply, runs commands from
four threads at once on the one client, stops the VM and waits for the
STOP event, continues it, and quits QEMU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qmp_sync import ExecuteError, QMPSyncClient

STARTUP_TIMEOUT = 15.0
EVENT_TIMEOUT = 10.0


def session(path: str, proc: subprocess.Popen[bytes]) -> None:
    with QMPSyncClient(path, name="demo") as vm:
        # QEMU creates its socket a moment after it starts.
        vm.connect(retry_until=STARTUP_TIMEOUT)
        version = vm.execute("query-version")
        assert isinstance(version, dict)
        qemu = version["qemu"]
        print(f"Connected to QEMU {qemu['major']}.{qemu['minor']}."
              f"{qemu['micro']} ({version['package']})")
        print(f"query-status -> {vm.execute('query-status')}")

        try:
            vm.execute("no-such-command")
        except ExecuteError as err:
            print(f"no-such-command -> {err.error_class}: {err}")

        with ThreadPoolExecutor(4) as threads:
            names = list(threads.map(
                lambda _: vm.cmd("query-name"), range(100)))
        print(f"100 query-name from 4 threads -> {len(names)} replies")

        vm.execute("stop")
        stop = vm.event_wait("STOP", timeout=EVENT_TIMEOUT)
        print(f"stop -> event {stop['event']} at {stop['timestamp']}")
        vm.execute("cont")
        resume = vm.event_wait("RESUME", timeout=EVENT_TIMEOUT)
        print(f"cont -> event {resume['event']}")

        vm.execute("quit")
    print("quit -> QEMU exited with status", proc.wait(timeout=30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split(
        "\n")[0])
    parser.add_argument("--qemu", default="qemu-system-x86_64",
                        help="the QEMU binary (default: %(default)s)")
    args = parser.parse_args()
    binary = shutil.which(args.qemu)
    if binary is None:
        print(f"{args.qemu} not found; tools/setup.sh installs it",
              file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="qmp-sync-demo-") as tmp:
        path = str(Path(tmp) / "qmp.sock")
        proc = subprocess.Popen(
            [binary, "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{path},server=on,wait=off"],
            stdin=subprocess.DEVNULL)
        try:
            session(path, proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
