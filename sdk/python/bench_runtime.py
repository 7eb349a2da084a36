#!/usr/bin/env python3
"""Benchmark of the stock runtime against a raw Unix-socket echo measured in the same run.

    python3 sdk/python/bench_runtime.py [--requests 20000] [--seconds 20] [--payload-bytes 1024]

1. Starts ``asya_runtime.py`` (a separate process, as in production) with a trivial handler
   that returns its payload, and sends POST /invoke requests with a ~1 KB payload one after
   the other over ONE keep-alive connection (as one host request stream does).
2. Starts a raw echo server (a separate process too: plain ``recv``/``sendall``, no HTTP, no
   JSON) and does the same ping-pong with the same number of bytes.
3. Prints requests/s and p50/p99 latency of both, and the ratio runtime/raw.

Each phase stops after ``--requests`` requests or ``--seconds`` seconds, whichever is first.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIME = os.environ.get("BENCH_RUNTIME", os.path.join(HERE, "asya_runtime.py"))
HANDLER_SOURCE = "def echo(payload):\n    return payload\n"


def wait_for(path, proc, deadline_s=15.0):
    # type: (str, subprocess.Popen, float) -> None
    deadline = time.monotonic() + deadline_s
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise SystemExit("server exited early with code %s" % proc.returncode)
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for %s" % path)
        time.sleep(0.01)


def percentile(sorted_values, q):
    # type: (List[float], float) -> float
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def read_http_response(sock, buf):
    # type: (socket.socket, bytes) -> Tuple[int, bytes, bytes]
    """Minimal Content-Length response reader; returns (status, body, leftover)."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("runtime closed the connection")
        buf += data
    head = buf[:end]
    status = int(head[9:12])
    i = head.find(b"Content-Length: ")
    if i < 0:
        raise ValueError("response without Content-Length: %r" % head)
    j = head.find(b"\r\n", i)
    length = int(head[i + 16:j if j >= 0 else len(head)])
    need = end + 4 + length
    while len(buf) < need:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("runtime closed the connection")
        buf += data
    return status, buf[end + 4:need], buf[need:]


def bench_runtime(tmp, requests, seconds, payload_bytes, warmup):
    # type: (str, int, float, int, int) -> Tuple[int, float, List[float]]
    with open(os.path.join(tmp, "bench_handler.py"), "w") as fh:
        fh.write(HANDLER_SOURCE)
    env = dict(os.environ)
    env.update(
        {
            "ASYA_HANDLER": "bench_handler.echo",
            "ASYA_SOCKET_DIR": tmp,
            "ASYA_LOG_LEVEL": "WARNING",
            "PYTHONPATH": tmp,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    proc = subprocess.Popen([sys.executable, RUNTIME], env=env)
    try:
        wait_for(os.path.join(tmp, "runtime-ready"), proc)
        envelope = {
            "id": "bench-1",
            "route": {"prev": ["a"], "curr": "bench", "next": ["c", "d"]},
            "headers": {"trace_id": "t-bench"},
            "payload": {"text": "x" * max(0, payload_bytes - 40), "n": 1, "ok": True},
        }
        body = json.dumps(envelope).encode()
        request = (
            b"POST /invoke HTTP/1.1\r\nHost: runtime\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: 0123456789abcdef0123456789abcdef\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        ) + body
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(os.path.join(tmp, "asya-runtime.sock"))
        buf = b""
        for _ in range(warmup):
            sock.sendall(request)
            status, _, buf = read_http_response(sock, buf)
            assert status == 200, status
        latencies = []  # type: List[float]
        clock = time.perf_counter
        sendall = sock.sendall
        stop_at = clock() + seconds
        start = clock()
        n = 0
        while n < requests:
            t0 = clock()
            sendall(request)
            status, resp, buf = read_http_response(sock, buf)
            t1 = clock()
            if status != 200:
                raise SystemExit("unexpected status %d: %r" % (status, resp[:200]))
            latencies.append(t1 - t0)
            n += 1
            if t1 > stop_at:
                break
        elapsed = clock() - start
        frames = json.loads(resp)["frames"]
        assert frames[0]["payload"] == envelope["payload"], "runtime did not echo the payload"
        assert frames[0]["route"] == {"prev": ["a", "bench"], "curr": "c", "next": ["d"]}
        sock.close()
        return n, elapsed, latencies
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def echo_server(path):
    # type: (str) -> None
    """Raw echo: every byte received is sent back, nothing else."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    open(path + ".ready", "w").close()
    conn, _ = listener.accept()
    recv, sendall = conn.recv, conn.sendall
    while True:
        data = recv(65536)
        if not data:
            return
        sendall(data)


def bench_echo(tmp, requests, seconds, size, warmup):
    # type: (str, int, float, int, int) -> Tuple[int, float, List[float]]
    path = os.path.join(tmp, "echo.sock")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--echo-server", path])
    try:
        wait_for(path + ".ready", proc)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        message = b"x" * size
        recv, sendall = sock.recv, sock.sendall

        def roundtrip():
            # type: () -> None
            sendall(message)
            got = 0
            while got < size:
                data = recv(65536)
                if not data:
                    raise ConnectionError("echo server closed the connection")
                got += len(data)

        for _ in range(warmup):
            roundtrip()
        latencies = []  # type: List[float]
        clock = time.perf_counter
        stop_at = clock() + seconds
        start = clock()
        n = 0
        while n < requests:
            t0 = clock()
            roundtrip()
            t1 = clock()
            latencies.append(t1 - t0)
            n += 1
            if t1 > stop_at:
                break
        elapsed = clock() - start
        sock.close()
        return n, elapsed, latencies
    finally:
        proc.terminate()
        proc.wait(10)


def report(name, n, elapsed, latencies):
    # type: (str, int, float, List[float]) -> float
    latencies.sort()
    rate = n / elapsed
    print(
        "%-8s %7d requests in %6.2f s: %9.0f req/s   p50 %7.1f us   p99 %7.1f us"
        % (name, n, elapsed, rate, percentile(latencies, 0.5) * 1e6, percentile(latencies, 0.99) * 1e6)
    )
    return rate


def main():
    # type: () -> int
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=20.0, help="time bound per phase")
    parser.add_argument("--payload-bytes", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--echo-server", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server(args.echo_server)
        return 0
    tmp = tempfile.mkdtemp(prefix="asya-bench-")
    try:
        print(
            "python %s, %d CPU(s), payload ~%d B, one keep-alive connection"
            % (sys.version.split()[0], os.cpu_count() or 0, args.payload_bytes)
        )
        n, elapsed, lat = bench_runtime(tmp, args.requests, args.seconds, args.payload_bytes, args.warmup)
        runtime_rate = report("runtime", n, elapsed, lat)
        # the echo moves as many bytes each way as the runtime request did
        size = args.payload_bytes + 250
        n, elapsed, lat = bench_echo(tmp, args.requests, args.seconds, size, args.warmup)
        raw_rate = report("raw echo", n, elapsed, lat)
        print("ratio runtime/raw: %.2f" % (runtime_rate / raw_rate))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
