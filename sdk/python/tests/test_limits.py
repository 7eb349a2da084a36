"""Resource bounds under hostile local clients: connections, body memory, nesting depth.

Each test drives the real runtime over its Unix socket; memory is the runtime process's
resident set size read from /proc.
"""

import json
import os
import socket

import pytest

from conftest import DEADLINE, HttpClient, envelope, wait_until

MIB = 1024 * 1024


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


def all_threads_blocked(pid):
    """True when every thread of ``pid`` sleeps in the kernel (state S): each connection
    thread has read what its socket held and waits for more."""
    tasks = os.listdir("/proc/%d/task" % pid)
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # the thread ended
        if state != "S":
            return False
    return True


def thread_count(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def raw_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # blocking: waits while the listen backlog is full
    s.settimeout(DEADLINE)
    return s


def client_when_accepting(rt):
    """A client connection, retried while the listen backlog is full (EAGAIN), as the
    host retries an unreachable runtime."""
    out = []

    def attempt():
        try:
            out.append(HttpClient(rt.socket_path))
            return True
        except BlockingIOError:
            return False

    wait_until(attempt, "a connection to the runtime")
    return out[0]


def closed_by_peer(sock):
    """True when the runtime closed ``sock`` (EOF or reset) within the deadline."""
    sock.settimeout(DEADLINE)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


# ---------------------------------------------------------------------------- connections


@pytest.mark.parametrize("partial", [b"", b"POST /invoke HTTP/1.1\r\nContent-Le"])
def test_idle_connections_cannot_lock_the_host_out(start_runtime, partial):
    """300 local connections that send nothing (or half a request) and stay open: the
    sidecar's next connection is still served, the longest-waiting ones are closed."""
    rt = start_runtime("basic.echo")
    hogs = []
    try:
        for _ in range(300):
            s = raw_connect(rt.socket_path)
            if partial:
                s.sendall(partial)
            hogs.append(s)
        sidecar = client_when_accepting(rt)
        resp = sidecar.invoke(envelope({"v": 1}), headers={"X-Request-Id": "sidecar"})
        assert resp.status == 200, resp
        assert resp.json()["frames"][0]["payload"] == {"v": 1}
        # keep-alive still works on the new connection
        assert sidecar.invoke(envelope({"v": 2})).status == 200
        # the oldest connection was closed to make room; the newest is still open
        assert closed_by_peer(hogs[0])
        hogs[-1].settimeout(0.05)
        with pytest.raises(socket.timeout):
            hogs[-1].recv(1)
    finally:
        for s in hogs:
            s.close()
    assert "closed" in rt.stderr() and "waiting connection" in rt.stderr()


def test_connections_running_requests_are_never_closed_to_make_room(start_runtime, sockdir):
    """A request in the handler is not a waiting connection: a flood of new connections
    does not cut it."""
    rt = start_runtime("basic.block")
    release = os.path.join(sockdir, "release")
    started = os.path.join(sockdir, "started")
    busy = rt.client()
    busy.send_request(
        "POST", "/invoke", json.dumps(envelope({"release": release, "started": started})).encode()
    )
    wait_until(lambda: os.path.exists(started), "the handler to start")
    hogs = [raw_connect(rt.socket_path) for _ in range(300)]
    try:
        ready = os.path.join(sockdir, "ready-now")
        open(ready, "w").close()
        assert client_when_accepting(rt).invoke(envelope({"release": ready})).status == 200
        open(release, "w").close()
        resp = busy.read_response()
        assert resp.status == 200 and resp.json()["frames"][0]["payload"] == {"released": True}
    finally:
        for s in hogs:
            s.close()


# ---------------------------------------------------------------------------- body memory


def test_declared_body_length_allocates_nothing(start_runtime):
    """60 connections each declaring a 64 MiB body and sending 1 byte: the runtime's memory
    stays flat (it grew from 25 MB to 750 MB when the body was preallocated)."""
    rt = start_runtime("basic.echo")
    pid = rt.proc.pid
    wait_until(lambda: all_threads_blocked(pid), "the runtime to settle")
    before = rss_bytes(pid)
    socks = []
    try:
        for _ in range(60):
            s = raw_connect(rt.socket_path)
            s.sendall(b"POST /invoke HTTP/1.1\r\nContent-Length: %d\r\n\r\n{" % (64 * MIB))
            socks.append(s)
        # every connection thread has read its byte and waits for the rest
        wait_until(
            lambda: thread_count(pid) >= 61 and all_threads_blocked(pid),
            "60 connection threads blocked on their bodies",
        )
        grown = rss_bytes(pid) - before
        assert grown < 40 * MIB, "RSS grew by %.1f MiB" % (grown / MIB)
        assert rt.client().request("GET", "/healthz").status == 200
    finally:
        for s in socks:
            s.close()


def test_slow_body_is_closed_to_make_room_for_a_whole_one(start_runtime):
    """A local client that sends most of a large body and stalls holds body memory; the
    sidecar's complete request takes its room (the stalled one is closed)."""
    rt = start_runtime(
        "basic.echo",
        env={"ASYA_MAX_INFLIGHT_BODY_BYTES": str(MIB), "ASYA_MAX_BODY_BYTES": str(MIB)},
    )
    pid = rt.proc.pid
    stalled = raw_connect(rt.socket_path)
    stalled.sendall(b"POST /invoke HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b" " * 700000)
    wait_until(lambda: all_threads_blocked(pid), "the stalled body to be read")
    env = envelope("p" * 800000)
    resp = rt.client().invoke(env, headers={"X-Request-Id": "whole"})
    assert resp.status == 200, resp
    assert resp.json()["frames"][0]["payload"] == env["payload"]
    assert closed_by_peer(stalled)
    stalled.close()


def test_body_memory_in_flight_is_bounded_503(start_runtime, sockdir):
    """Bodies held by requests the handler is working on cannot be reclaimed: a request
    that would take the total over ASYA_MAX_INFLIGHT_BODY_BYTES gets 503 naming it."""
    rt = start_runtime(
        "basic.block",
        env={"ASYA_MAX_INFLIGHT_BODY_BYTES": str(MIB), "ASYA_MAX_BODY_BYTES": str(MIB)},
    )
    release = os.path.join(sockdir, "release")
    started = os.path.join(sockdir, "started")
    busy = rt.client()
    pad = "q" * 700000
    busy.send_request(
        "POST",
        "/invoke",
        json.dumps(envelope({"release": release, "started": started, "pad": pad})).encode(),
    )
    wait_until(lambda: os.path.exists(started), "the handler to start")
    second = rt.client()
    body = json.dumps(envelope({"release": release, "pad": pad})).encode()
    try:
        second.send_request("POST", "/invoke", body, {"X-Request-Id": "over"})
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered and closed before the whole body was sent
    resp = second.read_response()
    assert resp.status == 503, resp
    assert resp.json()["error"] == "unavailable"
    message = resp.json()["details"]["message"]
    assert "ASYA_MAX_INFLIGHT_BODY_BYTES=1048576" in message, message
    assert resp.headers["x-request-id"] == "over"
    open(release, "w").close()
    assert busy.read_response().status == 200
    # released: the same body fits now
    assert rt.client().invoke(body).status == 200


def test_inflight_limit_below_body_limit_is_fatal(run_fatal):
    code, err = run_fatal(
        "basic.echo",
        env={"ASYA_MAX_INFLIGHT_BODY_BYTES": "1000", "ASYA_MAX_BODY_BYTES": "2000"},
    )
    assert code == 2
    assert "ASYA_MAX_INFLIGHT_BODY_BYTES is 1000, below ASYA_MAX_BODY_BYTES=2000" in err


# ---------------------------------------------------------------------------- nesting depth


def deep_envelope_bytes(depth):
    head = b'{"id":"deep","route":{"prev":[],"curr":"a","next":[]},"payload":'
    return head + b"[" * depth + b"]" * depth + b"}"


def test_deeply_nested_body_is_400(start_runtime):
    """A 100,000-deep JSON body got no answer (the connection died); now 400, and the
    connection keeps serving."""
    rt = start_runtime("basic.echo")
    c = rt.client()
    resp = c.invoke(deep_envelope_bytes(100000), headers={"X-Request-Id": "deep"})
    assert resp.status == 400, resp
    assert resp.json()["error"] == "msg_parsing_error"
    assert "nested too deeply" in resp.json()["details"]["message"]
    assert resp.headers["x-request-id"] == "deep"
    assert c.invoke(envelope({"after": True})).status == 200


@pytest.mark.parametrize("handler", ["basic.deep_output", "basic.deep_output_stream"])
def test_too_deep_result_is_500_with_a_message(start_runtime, handler):
    rt = start_runtime(handler)
    c = rt.client()
    resp = c.invoke(envelope(1))
    if handler.endswith("stream"):
        assert resp.status == 200
        events = resp.events()
        assert events[0][0] == "downstream"
        assert events[-2][0] == "error" and events[-1][0] == "done"
        error = events[-2][1]
    else:
        assert resp.status == 500, resp
        error = resp.json()
    assert error["error"] == "processing_error"
    assert error["details"]["type"] == "asya_runtime.SerializationError"
    assert "nested too deeply to serialise" in error["details"]["message"]
    assert c.invoke(envelope(1)).status in (200, 500)  # the connection still works
