"""Fixtures for the stock runtime's tests.

Every test starts ``asya_runtime.py`` as a real subprocess with a temporary socket directory
and talks to it only over its Unix socket, with the small raw HTTP client below.  Waits are
polls with deadlines, never bare sleeps.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIME = os.path.join(os.path.dirname(HERE), "asya_runtime.py")
HANDLERS = os.path.join(HERE, "handlers")
PYTHON = os.environ.get("ASYA_TEST_PYTHON", sys.executable)
DEADLINE = 15.0  # seconds: upper bound of every wait in this suite


def wait_until(predicate, what, timeout=DEADLINE, proc=None):
    """Poll ``predicate`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError("runtime exited (code %s) while waiting for %s" % (proc.returncode, what))
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(0.005)


def envelope(payload=None, prev=(), curr="a", next=("b",), **extra):
    env = {
        "id": "env-1",
        "route": {"prev": list(prev), "curr": curr, "next": list(next)},
        "headers": {"trace_id": "trace-1"},
        "payload": payload,
    }
    env.update(extra)
    return env


class Response(object):
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lower-case name -> value (str)
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def events(self):
        """The SSE events of the body as (event, parsed data) pairs."""
        out = []
        for block in self.body.decode("utf-8").split("\n\n"):
            if not block:
                continue
            event, data = None, []
            for line in block.split("\n"):
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
            out.append((event, json.loads("\n".join(data))))
        return out

    def __repr__(self):
        return "Response(%d, %r, %r)" % (self.status, self.headers, self.body[:300])


class HttpClient(object):
    """A minimal HTTP/1.x client over a Unix socket: Content-Length, chunked and EOF bodies."""

    def __init__(self, path, timeout=DEADLINE):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def send_request(self, method, path, body=None, headers=None, version="HTTP/1.1"):
        lines = ["%s %s %s" % (method, path, version), "Host: runtime"]
        hdrs = dict(headers or {})
        if body is not None and not any(k.lower() == "content-length" for k in hdrs):
            hdrs["Content-Length"] = str(len(body))
        for name, value in hdrs.items():
            lines.append("%s: %s" % (name, value))
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.send(data + (body or b""))

    def request(self, method, path, body=None, headers=None, version="HTTP/1.1"):
        self.send_request(method, path, body, headers, version)
        return self.read_response(head_request=method == "HEAD")

    def invoke(self, env, headers=None, version="HTTP/1.1"):
        body = env if isinstance(env, bytes) else json.dumps(env).encode("utf-8")
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        return self.request("POST", "/invoke", body, hdrs, version)

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed by the runtime")
        self.buf += data

    def _read_until(self, marker):
        while marker not in self.buf:
            self._fill()
        i = self.buf.index(marker)
        out, self.buf = self.buf[:i], self.buf[i + len(marker):]
        return out

    def _read_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self, head_request=False):
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        version, status = lines[0].split(" ")[:2]
        assert version in ("HTTP/1.1", "HTTP/1.0"), lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, "duplicate header %s" % name
            headers[name.lower()] = value.strip()
        status = int(status)
        if status in (204, 304) or head_request:
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int(self._read_until(b"\r\n"), 16)
                if size == 0:
                    assert self._read_until(b"\r\n") == b""
                    break
                parts.append(self._read_exact(size))
                assert self._read_exact(2) == b"\r\n"
            body = b"".join(parts)
        elif "content-length" in headers:
            body = self._read_exact(int(headers["content-length"]))
        else:  # delimited by EOF
            while True:
                try:
                    self._fill()
                except EOFError:
                    break
            body, self.buf = self.buf, b""
        return Response(status, headers, body)

    def is_closed(self, timeout=DEADLINE):
        """True when the runtime closed the connection (EOF) within ``timeout``."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except socket.timeout:
            return False
        except OSError:
            return True

    def has_data(self, timeout):
        """Whether a response byte arrives within ``timeout`` (peek, nothing consumed)."""
        self.sock.settimeout(timeout)
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(DEADLINE)


class Runtime(object):
    def __init__(self, proc, sockdir, stderr_path, env):
        self.proc = proc
        self.dir = env.get("ASYA_SOCKET_DIR", sockdir)
        self.socket_path = os.path.join(self.dir, env.get("ASYA_SOCKET_NAME", "asya-runtime.sock"))
        self.ready_path = os.path.join(self.dir, "runtime-ready")
        self.stderr_path = stderr_path
        self._client = None

    def client(self):
        return HttpClient(self.socket_path)

    def invoke(self, env, headers=None):
        """POST /invoke on the runtime's shared keep-alive connection."""
        if self._client is None:
            self._client = self.client()
        return self._client.invoke(env, headers)

    def ready_pid(self):
        """The pid written in the ready file, or None."""
        try:
            with open(self.ready_path) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def stderr(self):
        with open(self.stderr_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    def signal(self, signum=signal.SIGTERM):
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError("runtime did not exit within %ss of signal %d" % (DEADLINE, signum))

    def stop(self):
        if self._client is not None:
            self._client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def runtime_env(sockdir, handler, extra=None):
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("ASYA_") and key != "ASYA_TEST_PYTHON":
            del env[key]
    env.update(
        {
            "ASYA_SOCKET_DIR": sockdir,
            "PYTHONPATH": HANDLERS,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if handler is not None:
        env["ASYA_HANDLER"] = handler
    env.update(extra or {})
    return env


@pytest.fixture
def sockdir():
    # Short paths: a Unix socket path must stay under 108 bytes.
    path = tempfile.mkdtemp(prefix="asya-t-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_runtime(sockdir):
    """start_runtime(handler, env={...}, python=...) -> Runtime, ready to serve."""
    started = []

    def start(handler, env=None, python=None, wait=True):
        full_env = runtime_env(sockdir, handler, env)
        stderr_path = os.path.join(sockdir, "stderr-%d.log" % len(started))
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen([python or PYTHON, RUNTIME], env=full_env, stderr=err)
        rt = Runtime(proc, sockdir, stderr_path, full_env)
        started.append(rt)
        if wait:
            try:
                wait_until(lambda: rt.ready_pid() == proc.pid, "the ready file", proc=proc)
            except AssertionError as exc:
                raise AssertionError("%s\nstderr:\n%s" % (exc, rt.stderr()))
        return rt

    yield start
    for rt in started:
        rt.stop()


@pytest.fixture
def run_fatal(sockdir):
    """run_fatal(handler, env={...}) -> (exit code, stderr) of a runtime that must not start."""

    def run(handler, env=None):
        full_env = runtime_env(sockdir, handler, env)
        proc = subprocess.run(
            [PYTHON, RUNTIME], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            timeout=DEADLINE,
        )
        assert not os.path.exists(os.path.join(sockdir, "runtime-ready")), "ready file written"
        assert not os.path.exists(os.path.join(sockdir, "asya-runtime.sock")), "socket bound"
        return proc.returncode, proc.stderr.decode("utf-8", "replace")

    return run
