#!/usr/bin/env python3
"""
A short live session with a guest-less QEMU, through qmp_sync.

Starts ``qemu-system-x86_64 -machine none -nodefaults -display none -qmp
unix:PATH,server=on,wait=off``, connects, prints the version and status,
shows an error reply, stops and continues the VM to show the STOP and
RESUME events, and quits QEMU.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qmp_sync import ConnectError, ExecuteError, QMPClient

STARTUP_TIMEOUT = 15.0
EVENT_TIMEOUT = 10.0


async def connect_when_ready(client: QMPClient, path: str,
                             proc: subprocess.Popen[bytes]) -> None:
    """Connect as soon as QEMU's socket accepts, for STARTUP_TIMEOUT."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            await client.connect(path)
            return
        except ConnectError as err:
            starting = isinstance(err.exc, (FileNotFoundError,
                                            ConnectionRefusedError))
            if not starting or proc.poll() is not None:
                raise
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"QEMU did not listen on {path} within "
                    f"{STARTUP_TIMEOUT:.0f} s") from err
        # QEMU is still starting; it will create the socket shortly.
        await asyncio.sleep(0.02)


async def session(path: str, proc: subprocess.Popen[bytes]) -> None:
    client = QMPClient("demo")
    await connect_when_ready(client, path, proc)
    version = await client.execute("query-version")
    assert isinstance(version, dict)
    qemu = version["qemu"]
    print(f"Connected to QEMU {qemu['major']}.{qemu['minor']}."
          f"{qemu['micro']} ({version['package']}); out-of-band "
          f"execution {'on' if client.oob_enabled else 'off'}")
    print(f"query-status -> {await client.execute('query-status')}")

    try:
        await client.execute("no-such-command")
    except ExecuteError as err:
        print(f"no-such-command -> {err.error_class}: {err}")

    with client.listener(("STOP", "RESUME")) as events:
        await client.execute("stop")
        stop = await asyncio.wait_for(events.get(), EVENT_TIMEOUT)
        print(f"stop -> event {stop['event']} at {stop['timestamp']}")
        await client.execute("cont")
        resume = await asyncio.wait_for(events.get(), EVENT_TIMEOUT)
        print(f"cont -> event {resume['event']}")

    await client.execute("quit")
    await client.disconnect()
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
            asyncio.run(session(path, proc))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
