"""
Benchmark qmp_sync against other QMP clients and a raw socket client.

Two servers run for the whole benchmark: a real guest-less QEMU and a
fake QMP server (this script with --fake-server: a process of its own
that serialises everything it can in advance, so it is not the
bottleneck). Every measurement runs one client in a process of its own
(this script with --worker), the clients alternate round by round, and
the medians over the rounds are printed with their ratio to ``raw``: a
blocking socket client (sendall, readline, json.loads; it serialises an
argument-less command once), the practical floor. CPU is the client
process's (getrusage RUSAGE_SELF: every thread of it).

Clients: ``raw``; ``qemu.qmp.legacy`` and ``qemu.qmp`` (its asyncio
QMPClient) from PyPI's qemu.qmp; ``qmp``, PyPI's qmp 1.1.0 (the old
pre-asyncio qmp.py); ``qmp_sync`` (QMPSyncClient), ``qmp_sync.legacy``
(its QEMUMonitorProtocol) and ``qmp_sync-async`` (its asyncio
QMPClient). tools/bench.sh installs the other packages into the
benchmark's own virtualenv; they are never dependencies of ours. A
client that fails shows "error: ..." in its cells; the others go on.

Workloads:

``seq-qemu``, ``seq-fake``
    Sequential query-status on QEMU, on the fake server: wall and CPU
    per call.
``threads8``
    8 threads share one client on QEMU, each doing its share of the
    calls: time per call (all threads' wall / all calls). ``raw`` takes
    a threading.Lock around each call and is the reference; the asyncio
    clients run 8 tasks instead; clients that are not thread-safe are
    n/a.
``schema``
    query-qmp-schema on QEMU (about 200 KB): wall and CPU per call.
``burst-get``, ``burst-pull``
    The fake server answers x-burst, then writes a burst of events
    (prebuilt bytes): 200,000 read with get_events, 20,000 one by one
    with pull_event. Count and order are checked. Wall and CPU per
    event, from sending the command to holding the last event.
``latency``
    The fake server sends 2,000 events 1 ms apart, each stamped with its
    CLOCK_MONOTONIC (system-wide) when sent; the client takes each as
    soon as it can: median and p99 of the delay.
``clients500``
    500 clients connected to the fake server in one process: threads
    added (/proc/self/task, so threads Python does not know count too),
    resident memory (RSS from /proc/self/statm) per idle client, CPU of
    the process during 2 s of idleness.
"""
