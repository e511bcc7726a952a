"""What each workload measures, its targets, and the table printed."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench.common import (
    HOP_OF,
    IDLE_SECONDS,
    OURS,
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    scale: float            # seconds -> shown unit, or 1
    target: float | None = None
    absolute: bool = False  # target on the value, not on the ratio
    ratio: bool = True      # show the ratio to raw
    against: str = "raw"    # the client the target's ratio is to
    hop: float | None = None  # target as a ratio to the hop on our loop


@dataclass(frozen=True)
class Workload:
    name: str
    server: str             # "qemu" or "fake"
    rounds: int
    title: str
    metrics: tuple[Metric, ...]


WALL_US = "wall us"
CPU_US = "cpu us"
WORKLOADS = {w.name: w for w in (
    Workload("seq-qemu", "qemu", 5, "sequential query-status on QEMU, "
             "{count} calls; per call",
             (Metric("wall", WALL_US, 1e6, 1.1, against="raw-id",
                     hop=1.15),
              Metric("cpu", CPU_US, 1e6, 3.0))),
    Workload("seq-fake", "fake", 5, "sequential query-status on the fake "
             "server, {count} calls; per call",
             (Metric("wall", WALL_US, 1e6, 2.0, hop=1.15),
              Metric("cpu", CPU_US, 1e6, 3.0))),
    Workload("threads8", "fake", 5, "8 threads share one client on the "
             "fake server, {count} query-status in all; per call; raw "
             "takes a lock, asyncio clients run 8 tasks",
             (Metric("wall", WALL_US, 1e6, 1.2), Metric("cpu", CPU_US, 1e6))),
    Workload("schema", "qemu", 3, "query-qmp-schema on QEMU, {count} "
             "calls; per call",
             (Metric("wall", "wall ms", 1e3),
              Metric("cpu", "cpu ms", 1e3, 1.3))),
    Workload("burst-get", "fake", 2, "burst of {count} events read with "
             "get_events; per event",
             (Metric("wall", WALL_US, 1e6, 1.3), Metric("cpu", CPU_US, 1e6))),
    Workload("burst-pull", "fake", 3, "burst of {count} events read with "
             "pull_event; per event",
             (Metric("wall", WALL_US, 1e6, 1.5), Metric("cpu", CPU_US, 1e6))),
    Workload("latency", "fake", 3, "{count} events 1 ms apart, delay "
             "from the server's send to the client holding it",
             (Metric("median", "med us", 1e6, 1.5, hop=1.15),
              Metric("p99", "p99 us", 1e6, 2.0, hop=1.15))),
    Workload("clients500", "fake", 1, "{count} idle clients in one "
             "process: threads added, RSS KiB per client, CPU in "
             f"{IDLE_SECONDS:g} s idle",
             (Metric("tasks", "threads", 1, 2, absolute=True, ratio=False),
              Metric("kib", "KiB", 1, 12, absolute=True),
              Metric("idle_cpu", "idle ms", 1e3, 1e-3, absolute=True,
                     ratio=False),
              Metric("connect", "conn us", 1e6))),
)}


def fmt(value: float) -> str:
    if value >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table(workload: Workload, count: int, rounds: int,
          samples: dict[str, list[dict[str, Any]]],
          errors: dict[str, str], clients: list[str]) -> list[str]:
    """One section of the final table: a row per client."""
    name_width, cell = 16, 23
    title = workload.title.format(count=f"{count:,}")
    lines = [f"{workload.name}: {title} ({rounds} rounds, medians)"]
    head = f"  {'':<{name_width}}"
    for metric in workload.metrics:
        head += f"{metric.label:>9}{'x raw':>6} {'target':<7}"
    lines.append(head.rstrip())

    def median(client: str, key: str) -> float | None:
        values = [s[key] for s in samples.get(client, []) if key in s]
        return statistics.median(values) if values else None

    for client in clients:
        label = "raw+lock" if (workload.name == "threads8"
                               and client == "raw") else client
        row = f"  {label:<{name_width}}"
        if client in errors:
            lines.append(row + errors[client])
            continue
        for metric in workload.metrics:
            value, floor = median(client, metric.key), median(
                "raw", metric.key)
            if value is None:
                row += f"{'-':>9}{'':<{cell - 9}}"
                continue
            ratio = value / floor if (metric.ratio and floor) else None
            text = f"{fmt(value * metric.scale):>9}"
            text += f"{ratio:>6.2f}" if ratio is not None else f"{'':>6}"
            target = ""
            if client in OURS and metric.target is not None:
                if metric.absolute:
                    shown = fmt(metric.target * metric.scale)
                    ok = value <= metric.target
                else:
                    shown = f"{metric.target:g}x"
                    base = median(metric.against, metric.key)
                    ok = base is not None and value / base <= metric.target
                    if metric.against != "raw":
                        shown += f" {metric.against}"
                target = f"<={shown}" + (" ok" if ok else " NO")
            row += text + f" {target:<{cell - 16}}"
        lines.append(row.rstrip())
    for client in clients:
        hop = HOP_OF.get(client)
        if hop is None or client in errors or hop in errors:
            continue
        checks = []
        for metric in workload.metrics:
            value, floor = median(client, metric.key), median(hop, metric.key)
            if metric.hop is None or value is None or not floor:
                continue
            ok = value / floor <= metric.hop
            checks.append(f"{metric.key} {value / floor:.2f}x (<="
                          f"{metric.hop:g}x {'ok' if ok else 'NO'})")
        if checks:
            lines.append(f"  {client} / {hop}: " + ", ".join(checks))
    return lines


