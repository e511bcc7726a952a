"""The orchestrator: servers, rounds of workers, the final table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import bench
from bench.common import (
    CLIENTS,
    FLOOR_WORKLOADS,
    FLOORS,
    NOT_THREAD_SAFE,
)
from bench.fake_server import fake_server
from bench.report import (
    WORKLOADS,
    table,
)
from bench.workloads import worker


def counts(args: argparse.Namespace) -> dict[str, int]:
    quick = 10 if args.quick else 1
    return {"seq-qemu": args.calls, "seq-fake": args.calls,
            "threads8": args.calls, "schema": max(5, args.calls // 100),
            "burst-get": 200_000 // quick, "burst-pull": 20_000 // quick,
            "clients500": 500, "latency": 2_000 // quick}


def run_worker(client: str, workload: str, path: str, count: int,
               timeout: float, verbose: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench", "--worker", client,
               "--workload", workload, "--path", path, "--count", str(count)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL,
                              env=worker_environment())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    if verbose and proc.stderr:
        print(f"--- {client} {workload}:\n{proc.stderr}", file=sys.stderr)
    lines = proc.stdout.strip().splitlines()
    try:
        result = dict(json.loads(lines[-1]))
    except (IndexError, ValueError):
        errors = proc.stderr.strip().splitlines() or [
            f"exit status {proc.returncode}"]
        return {"error": errors[-1]}
    if proc.returncode and "error" not in result:
        result["error"] = f"exit status {proc.returncode}"
    return result


def worker_environment() -> dict[str, str]:
    """The environment of a worker: ours, with this package importable."""
    tools = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ,
            "PYTHONPATH": tools if not path else f"{tools}:{path}"}


def start_qemu(path: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        sys.exit("qemu-system-x86_64 not found; tools/setup.sh installs it")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    try:
        return subprocess.Popen(
            [binary, "-machine", "none", "-nodefaults", "-display", "none",
             "-chardev", f"socket,id=qmp,fd={listener.fileno()},server=on,"
             "wait=off", "-mon", "chardev=qmp,mode=control"],
            pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL)
    finally:
        listener.close()


def start_fake_server(path: str,
                      bursts: list[int]) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "bench", "--fake-server", path,
         "--count", ",".join(map(str, bursts))],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        env=worker_environment())
    assert server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        server.kill()
        sys.exit("the fake server did not start")
    return server


def versions() -> list[str]:
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed (tools/bench.sh installs it)"
    qemu = shutil.which("qemu-system-x86_64")
    qemu_version = "not found"
    if qemu:
        qemu_version = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True,
            check=False).stdout.splitlines()[0]
    git = subprocess.run(
        ["git", "-C", os.path.dirname(os.path.abspath(__file__)), "describe",
         "--always", "--dirty"], capture_output=True, text=True,
        check=False).stdout.strip()
    return [
        f"Python {platform.python_version()}, {qemu_version}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        f"qemu.qmp {version('qemu.qmp')} (qemu.qmp, qemu.qmp.legacy); "
        f"qmp {version('qmp')}; qmp_sync {version('qmp_sync')}"
        + (f" (git {git})" if git else "")
        + " (qmp_sync, qmp_sync.legacy, qmp_sync-async)",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=bench.__doc__.strip().split("\n")[0],
        epilog="Workloads: " + ", ".join(WORKLOADS) + ". Clients: "
        + ", ".join(CLIENTS) + ".")
    parser.add_argument("--calls", type=int, default=2000,
                        help="query-status calls per client per round in "
                        "seq-qemu, seq-fake, threads8; schema makes 1/100 "
                        "as many (%(default)s)")
    parser.add_argument("--rounds", type=int,
                        help="rounds for every workload (default: 5, but 3 "
                        "for schema, burst-pull, latency, 2 for burst-get "
                        "and 1 for clients500)")
    parser.add_argument("--only", metavar="WORKLOAD[,..]",
                        help="run only these workloads")
    parser.add_argument("--clients", metavar="NAME[,..]",
                        help="run only these clients (raw always runs)")
    parser.add_argument("--quick", action="store_true",
                        help="one round, a tenth of the events")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds before a worker is killed "
                        "(%(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the workers' stderr")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--count", help=argparse.SUPPRESS)
    parser.add_argument("--fake-server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.workload, args.path, int(args.count))
    if args.fake_server:
        return fake_server(args.fake_server,
                           [int(n) for n in args.count.split(",") if n])

    workloads = list(WORKLOADS)
    if args.only:
        workloads = args.only.split(",")
    clients = list(CLIENTS)
    if args.clients:
        clients = ["raw", *(c for c in args.clients.split(",") if c != "raw")]
    for chosen, known in ((workloads, WORKLOADS), (clients, CLIENTS)):
        unknown = [n for n in chosen if n not in known]
        if unknown:
            parser.error(f"unknown: {', '.join(unknown)}; known: "
                         f"{', '.join(known)}")
    size = counts(args)

    header = versions()
    print("\n".join(header), flush=True)
    output: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qmp-bench-") as tmp:
        paths = {"qemu": os.path.join(tmp, "qemu.sock"),
                 "fake": os.path.join(tmp, "fake.sock")}
        servers: list[subprocess.Popen[Any]] = []
        try:
            if any(WORKLOADS[w].server == "qemu" for w in workloads):
                servers.append(start_qemu(paths["qemu"]))
            if any(WORKLOADS[w].server == "fake" for w in workloads):
                servers.append(start_fake_server(paths["fake"], [
                    size[w] for w in ("burst-get", "burst-pull")
                    if w in workloads]))
            for name in workloads:
                workload = WORKLOADS[name]
                rounds = args.rounds or (1 if args.quick else workload.rounds)
                samples: dict[str, list[dict[str, Any]]] = {
                    c: [] for c in clients}
                errors: dict[str, str] = {}
                if name == "threads8":
                    errors.update((c, "n/a (not thread-safe)")
                                  for c in clients if c in NOT_THREAD_SAFE)
                if name not in FLOOR_WORKLOADS:
                    errors.update((c, "n/a (a floor elsewhere)")
                                  for c in clients if c in FLOORS)
                begun = time.monotonic()
                for _ in range(rounds):
                    for client in clients:
                        if client in errors:
                            continue
                        result = run_worker(
                            client, name, paths[workload.server],
                            size[name], args.timeout, args.verbose)
                        if "error" in result:
                            errors[client] = f"error: {result['error']}"
                        else:
                            samples[client].append(result)
                print(f"{name}: {time.monotonic() - begun:.0f} s",
                      file=sys.stderr, flush=True)
                output += table(workload, size[name], rounds, samples,
                                errors, clients)
        finally:
            for server in servers:
                server.kill()
                server.wait()
    print()
    print("\n".join(output))
    print(f"\n(x raw: ratio of medians to raw; target: ours only; "
          f"{time.monotonic() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
