#!/usr/bin/env python3
"""Channels: parallelkit's Channel side by side with the standard library's Pipe.

Two workloads, every contender interleaved in one process (the order rotates each round;
medians over rounds; ratios are paired round by round, see ``harness.paired_ratios``):

* ``latency``: request/response round trips of a small message (an int) to an echo
  server process: ``Channel.request`` against a duplex ``Pipe`` with ``send``/``recv``
  (and ``send_bytes``/``recv_bytes`` as the floor);
* ``throughput``: 1 MB ``bytes`` payloads one way to a sink process that acknowledges
  the batch: ``Channel.send`` against ``Pipe.send`` (pickled), ``Pipe.send_bytes`` +
  ``recv_bytes_into`` a reused buffer, and a raw ``socketpair`` (``sendall`` /
  ``recv_into``, no framing) as the ceiling; and ``Channel.send`` of a 1 MB numpy
  array (out-of-band, received into its final buffer) when numpy is importable.

Both run twice: with this process and every server pinned to one CPU
(``os.sched_setaffinity``), and unpinned.

Usage::

    python benchmarks/bench_channel.py                 # fork, 7 rounds
    python benchmarks/bench_channel.py --quick         # 3 rounds, fewer messages
    python benchmarks/bench_channel.py --start-method spawn --rounds 9
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Run as a file, this folder heads sys.path; the package imports from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness as h

if TYPE_CHECKING:
    from parallelkit import StartMethod

MB = 1 << 20


# ------------------------------------------------------------------ servers (child processes)


def pipe_echo(conn: Any) -> None:
    while True:
        message = conn.recv()
        if message is None:
            return
        conn.send(message)


def pipe_bytes_echo(conn: Any) -> None:
    while True:
        message = conn.recv_bytes()
        if message == b"stop":
            return
        conn.send_bytes(message)


def channel_echo(channel: Any) -> None:
    for message in channel:
        channel.send(message)


def pipe_sink(conn: Any) -> None:
    received = 0
    while True:
        message = conn.recv()
        if message is None:
            conn.send(received)
            continue
        if message == "stop":
            return
        received += len(message)


def pipe_bytes_sink(conn: Any) -> None:
    buffer = bytearray(2 * MB)
    received = 0
    while True:
        n = conn.recv_bytes_into(buffer)
        if n == 4 and buffer[:4] == b"stop":
            return
        if n == 3 and buffer[:3] == b"ack":
            conn.send_bytes(str(received).encode())
            continue
        received += n


def socket_sink(sock: socket.socket, size: int) -> None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while True:
        got = 0
        while got < size:
            n = sock.recv_into(view[got:])
            if n == 0:
                return
            got += n
        received += got
        if buffer[0] == 0:  # the last message of a batch
            sock.sendall(received.to_bytes(8, "little"))


def channel_sink(channel: Any) -> None:
    received = 0
    for message in channel:
        if message is None:
            channel.send(received)
            continue
        received += len(message)


# ------------------------------------------------------------------ contenders


@dataclass
class Contender:
    name: str
    kind: str  # "stdlib", "raw" or "parallelkit"
    run: Callable[[], None]  # one sample's work
    stop: Callable[[], None]
    samples: list[float] = field(default_factory=list)


def latency_contenders(ctx: Any, sm: StartMethod, n: int) -> list[Contender]:
    import parallelkit as pk

    out: list[Contender] = []
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=pipe_echo, args=(child,), daemon=True)
    proc.start()
    child.close()

    def pipe_run(conn: Any = parent) -> None:
        send, recv = conn.send, conn.recv
        for i in range(n):
            send(i)
            recv()

    def pipe_stop(conn: Any = parent, proc: Any = proc) -> None:
        conn.send(None)
        proc.join(10)
        conn.close()

    out.append(Contender("Pipe send/recv", "stdlib", pipe_run, pipe_stop))

    parent_b, child_b = ctx.Pipe(duplex=True)
    proc_b = ctx.Process(target=pipe_bytes_echo, args=(child_b,), daemon=True)
    proc_b.start()
    child_b.close()

    def bytes_run(conn: Any = parent_b) -> None:
        send, recv = conn.send_bytes, conn.recv_bytes
        for i in range(n):
            send(i.to_bytes(8, "little"))
            recv()

    def bytes_stop(conn: Any = parent_b, proc: Any = proc_b) -> None:
        conn.send_bytes(b"stop")
        proc.join(10)
        conn.close()

    out.append(Contender("Pipe send_bytes/recv_bytes", "raw", bytes_run, bytes_stop))

    channel = pk.start_process(channel_echo, start_method=sm)

    def channel_run(channel: Any = channel) -> None:
        request = channel.request
        for i in range(n):
            request(i)

    out.append(Contender("parallelkit Channel.request", "parallelkit", channel_run, channel.close))
    return out


def throughput_contenders(ctx: Any, sm: StartMethod, n: int) -> list[Contender]:
    import parallelkit as pk

    payload = os.urandom(MB)
    last = b"\0" + payload[1:]  # socket_sink acknowledges a message starting with 0
    payload = b"\1" + payload[1:]
    out: list[Contender] = []

    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=pipe_sink, args=(child,), daemon=True)
    proc.start()
    child.close()

    def pipe_run(conn: Any = parent) -> None:
        for _ in range(n):
            conn.send(payload)
        conn.send(None)
        conn.recv()

    def pipe_stop(conn: Any = parent, proc: Any = proc) -> None:
        conn.send("stop")
        proc.join(10)
        conn.close()

    out.append(Contender("Pipe send/recv", "stdlib", pipe_run, pipe_stop))

    parent_b, child_b = ctx.Pipe(duplex=True)
    proc_b = ctx.Process(target=pipe_bytes_sink, args=(child_b,), daemon=True)
    proc_b.start()
    child_b.close()

    def bytes_run(conn: Any = parent_b) -> None:
        for _ in range(n):
            conn.send_bytes(payload)
        conn.send_bytes(b"ack")
        conn.recv_bytes()

    def bytes_stop(conn: Any = parent_b, proc: Any = proc_b) -> None:
        conn.send_bytes(b"stop")
        proc.join(10)
        conn.close()

    out.append(Contender("Pipe send_bytes/recv_bytes_into", "stdlib", bytes_run, bytes_stop))

    mine, theirs = socket.socketpair()
    proc_s = ctx.Process(target=socket_sink, args=(theirs, MB), daemon=True)
    proc_s.start()
    theirs.close()

    def socket_run(sock: socket.socket = mine) -> None:
        for _ in range(n - 1):
            sock.sendall(payload)
        sock.sendall(last)
        sock.recv(8)

    def socket_stop(sock: socket.socket = mine, proc: Any = proc_s) -> None:
        sock.close()
        proc.join(10)

    out.append(Contender("socketpair sendall/recv_into", "raw", socket_run, socket_stop))

    channel = pk.start_process(channel_sink, start_method=sm)

    def channel_run(channel: Any = channel) -> None:
        for _ in range(n):
            channel.send(payload)
        channel.send(None)
        channel.recv()

    out.append(Contender("parallelkit Channel.send", "parallelkit", channel_run, channel.close))

    try:
        import numpy as np
    except ImportError:  # numpy is optional here
        return out
    array = np.frombuffer(payload, dtype=np.uint8).copy()
    channel_np = pk.start_process(channel_sink, start_method=sm)

    def numpy_run(channel: Any = channel_np) -> None:
        for _ in range(n):
            channel.send(array)
        channel.send(None)
        channel.recv()

    out.append(
        Contender("parallelkit Channel.send (numpy)", "parallelkit", numpy_run, channel_np.close)
    )
    return out


# ------------------------------------------------------------------ the run


def run(
    workload: str, ctx: Any, sm: StartMethod, n: int, rounds: int, meter: h.NoiseMeter
) -> list[Contender]:
    make = latency_contenders if workload == "latency" else throughput_contenders
    contenders = make(ctx, sm, n)
    try:
        for c in contenders:  # warm-up
            c.run()
        for r in range(rounds):
            order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for c in order:
                meter.gate()
                t0 = time.perf_counter()
                c.run()
                c.samples.append(time.perf_counter() - t0)
    finally:
        for c in contenders:
            with contextlib.suppress(Exception):
                c.stop()
    return contenders


def report(workload: str, contenders: list[Contender], n: int) -> str:
    reference = next(c for c in contenders if c.name == "Pipe send/recv")
    lines = []
    if workload == "latency":
        lines.append("| contender | median µs per round trip | min-max µs | x Pipe send/recv |")
    else:
        lines.append("| contender | median GB/s | min-max GB/s | x Pipe send/recv (time) |")
    lines.append("|---|---|---|---|")
    for c in contenders:
        ratio = statistics.median(h.paired_ratios(c.samples, reference.samples))
        name = f"**{c.name}**" if c.kind == "parallelkit" else c.name
        if workload == "latency":
            per = [s / n * 1e6 for s in c.samples]
            cells = [f"{statistics.median(per):.1f}", f"{min(per):.1f}-{max(per):.1f}"]
        else:
            rate = [n * MB / s / 1e9 for s in c.samples]
            cells = [f"{statistics.median(rate):.2f}", f"{min(rate):.2f}-{max(rate):.2f}"]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-method", default="fork", choices=("fork", "forkserver", "spawn"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=300, help="1 MB messages per sample")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workloads", default="latency,throughput")
    parser.add_argument("--affinity", default="pinned,unpinned")
    parser.add_argument("--gate-seconds", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.round_trips, args.messages = 3, 2000, 100
    ctx = multiprocessing.get_context(args.start_method)
    meter = h.NoiseMeter(gate_seconds=args.gate_seconds)
    everything = os.sched_getaffinity(0)
    print(
        f"# bench_channel: Python {platform.python_version()}, {args.start_method}, "
        f"{len(everything)} usable CPUs, {args.rounds} rounds, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC\n"
    )
    for affinity in args.affinity.split(","):
        cpus = {min(everything)} if affinity == "pinned" else everything
        os.sched_setaffinity(0, cpus)  # the servers started below inherit it
        try:
            for workload in args.workloads.split(","):
                n = args.round_trips if workload == "latency" else args.messages
                h.log(f"{workload}, {affinity} ...")
                contenders = run(workload, ctx, args.start_method, n, args.rounds, meter)
                what = (
                    f"{n} round trips of an int"
                    if workload == "latency"
                    else f"{n} x 1 MB bytes, one way"
                )
                print(f"## {workload}, {affinity} ({what})\n")
                print(report(workload, contenders, n) + "\n", flush=True)
        finally:
            os.sched_setaffinity(0, everything)


if __name__ == "__main__":
    main()
