"""Start-up, readiness, socket permissions, shutdown, fatal errors and logging."""

import json
import os
import re
import signal
import socket
import stat
import subprocess

import pytest

from conftest import PYTHON, RUNTIME, envelope, runtime_env, wait_until


def test_ready_file_after_socket(start_runtime):
    rt = start_runtime("basic.echo")
    assert stat.S_ISSOCK(os.stat(rt.socket_path).st_mode)
    with open(rt.ready_path) as fh:
        assert fh.read().strip() == str(rt.proc.pid)
    assert not os.path.exists(rt.ready_path + ".tmp")


def test_default_socket_mode_is_0666(start_runtime):
    rt = start_runtime("basic.echo")
    assert stat.S_IMODE(os.stat(rt.socket_path).st_mode) == 0o666


@pytest.mark.parametrize("value,mode", [("0o600", 0o600), ("640", 0o640), ("0O660", 0o660)])
def test_socket_chmod(start_runtime, value, mode):
    rt = start_runtime("basic.echo", env={"ASYA_SOCKET_CHMOD": value})
    assert stat.S_IMODE(os.stat(rt.socket_path).st_mode) == mode


def test_empty_socket_chmod_skips_chmod(start_runtime):
    old = os.umask(0o077)  # inherited by the runtime: without chmod the socket is 0777 & ~umask
    try:
        rt = start_runtime("basic.echo", env={"ASYA_SOCKET_CHMOD": ""})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(rt.socket_path).st_mode) == 0o700


def test_custom_socket_name(start_runtime, sockdir):
    rt = start_runtime("basic.echo", env={"ASYA_SOCKET_NAME": "other.sock"})
    assert rt.socket_path == os.path.join(sockdir, "other.sock")
    assert rt.client().request("GET", "/healthz").status == 200


def test_socket_dir_is_created(start_runtime, sockdir):
    sub = os.path.join(sockdir, "nested", "dir")
    rt = start_runtime("basic.echo", env={"ASYA_SOCKET_DIR": sub})
    assert rt.ready_path == os.path.join(sub, "runtime-ready")
    assert stat.S_ISSOCK(os.stat(os.path.join(sub, "asya-runtime.sock")).st_mode)


def test_stale_socket_and_ready_file_are_replaced(start_runtime, sockdir):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(sockdir, "asya-runtime.sock"))
    stale.close()  # the file stays behind, nobody listens
    with open(os.path.join(sockdir, "runtime-ready"), "w") as fh:
        fh.write("stale\n")
    rt = start_runtime("basic.echo")
    with open(rt.ready_path) as fh:
        assert fh.read().strip() == str(rt.proc.pid)
    assert rt.client().request("GET", "/healthz").status == 200


def test_stale_ready_file_removed_even_when_start_fails(run_fatal, sockdir):
    with open(os.path.join(sockdir, "runtime-ready"), "w") as fh:
        fh.write("stale\n")
    code, _ = run_fatal("basic.does_not_exist")  # run_fatal asserts no ready file is left
    assert code == 3


def test_path_that_is_not_a_socket_is_not_deleted(sockdir):
    path = os.path.join(sockdir, "asya-runtime.sock")
    with open(path, "w") as fh:
        fh.write("precious")
    proc = subprocess.run([PYTHON, RUNTIME], env=runtime_env(sockdir, "basic.echo"),
                          stderr=subprocess.PIPE, timeout=15)
    assert proc.returncode == 4
    assert "is not a socket; refusing to remove it" in proc.stderr.decode()
    with open(path) as fh:
        assert fh.read() == "precious"
    assert not os.path.exists(os.path.join(sockdir, "runtime-ready"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_socket_and_ready_file_and_exits_0(start_runtime, signum):
    rt = start_runtime("basic.echo")
    c = rt.client()  # an idle keep-alive connection does not hold up the exit
    assert c.request("GET", "/healthz").status == 200
    assert rt.signal(signum) == 0
    assert not os.path.exists(rt.socket_path)
    assert not os.path.exists(rt.ready_path)
    assert "runtime stopped" in rt.stderr()


def test_sigterm_lets_the_in_flight_request_finish(start_runtime, sockdir):
    rt = start_runtime("basic.block")
    release = os.path.join(sockdir, "release")
    started = os.path.join(sockdir, "started")
    c = rt.client()
    c.send_request("POST", "/invoke", json.dumps(envelope({"release": release, "started": started})).encode())
    wait_until(lambda: os.path.exists(started), "the handler to start")
    rt.proc.send_signal(signal.SIGTERM)
    # it stops accepting at once ...
    wait_until(lambda: not os.path.exists(rt.socket_path), "socket removal")
    assert not os.path.exists(rt.ready_path)
    assert rt.proc.poll() is None
    # ... and answers the request in flight before exiting 0
    open(release, "w").close()
    resp = c.read_response()
    assert resp.status == 200
    assert resp.json()["frames"][0]["payload"] == {"released": True}
    assert resp.headers["connection"] == "close"
    assert rt.proc.wait(15) == 0


def test_shutdown_grace_bounds_the_wait(start_runtime, sockdir):
    rt = start_runtime("basic.block", env={"ASYA_RUNTIME_SHUTDOWN_GRACE": "0.2"})
    started = os.path.join(sockdir, "started")
    c = rt.client()
    c.send_request("POST", "/invoke", json.dumps(
        envelope({"release": os.path.join(sockdir, "never"), "started": started})).encode())
    wait_until(lambda: os.path.exists(started), "the handler to start")
    assert rt.signal(signal.SIGTERM) == 0
    assert "still running" in rt.stderr()


# ---------------------------------------------------------------------------------- fatal


def _one_line(stderr):
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    assert "CRITICAL" in lines[0] and "fatal:" in lines[0]
    return lines[0]


@pytest.mark.parametrize("path,fragment", [
    ("", "is not set"),
    ("echo", "has no module"),
    ("../basic.echo", "file path"),
    ("basic/echo", "file path"),
    ("/abs/basic.echo", "file path"),
    (".basic.echo", "leading dot"),
    ("basic..echo", "empty component"),
    ("basic.echo.", "empty component"),
    ("basic.1echo", "not a Python identifier"),
    ("basic.ec-ho", "not a Python identifier"),
    ("basic.class.echo", "Python keyword"),
    ("basic.__class__.mro", "dunder"),
    (" basic.echo", "whitespace"),
])
def test_bad_handler_path_is_fatal(run_fatal, path, fragment):
    code, err = run_fatal(path)
    assert code == 2
    line = _one_line(err)
    assert "ASYA_HANDLER" in line and fragment in line


@pytest.mark.parametrize("path,fragments", [
    ("no_such_module_abc.fn", ["no module named 'no_such_module_abc'", "PYTHONPATH"]),
    ("basic.does_not_exist", ["module 'basic' has no attribute 'does_not_exist'"]),
    ("basic.Counter", ["names a class"]),
    ("basic.NOT_CALLABLE", ["is not callable"]),
    ("basic.Counter.nope", ["'Counter' has no attribute 'nope'"]),
    ("basic.Counter.process.extra", ["expected module.function or module.Class.method"]),
    ("basic.NeedsModelPath.process", ["parameter 'model_path' has no default"]),
    ("basic.InitFails.process", ["InitFails() raised RuntimeError: model file missing"]),
    ("broken_import.process", ["importing module 'broken_import' failed", "asya_missing_dependency_xyz"]),
    ("raises_at_import.fn", ["importing module 'raises_at_import' failed", "config file not found"]),
])
def test_handler_load_errors_are_fatal(run_fatal, path, fragments):
    code, err = run_fatal(path)
    assert code == 3
    line = _one_line(err)
    for fragment in fragments:
        assert fragment in line


def test_import_error_traceback_at_debug(run_fatal):
    code, err = run_fatal("broken_import.process", env={"ASYA_LOG_LEVEL": "DEBUG"})
    assert code == 3
    assert "Traceback (most recent call last)" in err
    assert "broken_import.py" in err


@pytest.mark.parametrize("var,value", [
    ("ASYA_HANDLER_MODE", "stream"),
    ("ASYA_SOCKET_CHMOD", "rw-rw-rw-"),
    ("ASYA_SOCKET_CHMOD", "0o999"),
    ("ASYA_SOCKET_CHMOD", "0o77777"),
    ("ASYA_ENABLE_VALIDATION", "maybe"),
    ("ASYA_LOG_LEVEL", "LOUD"),
    ("ASYA_CHUNK_SIZE", "0"),
    ("ASYA_CHUNK_SIZE", "-1"),
    ("ASYA_CHUNK_SIZE", "64k"),
    ("ASYA_MAX_BODY_BYTES", "lots"),
    ("ASYA_SOCKET_NAME", "../escape.sock"),
    ("ASYA_SOCKET_DIR", "/tmp/" + "d" * 120),
    ("ASYA_RUNTIME_SHUTDOWN_GRACE", "soon"),
])
def test_invalid_config_is_fatal_and_names_the_variable(run_fatal, var, value):
    code, err = run_fatal("basic.echo", env={var: value})
    assert code == 2
    assert var in _one_line(err)


@pytest.mark.parametrize("value,expected", [("TRUE", 400), ("0", 200), ("off", 200), ("yes", 400)])
def test_validation_flag_spellings(start_runtime, value, expected):
    rt = start_runtime("basic.echo", env={"ASYA_ENABLE_VALIDATION": value})
    assert rt.invoke({"route": {"curr": "a"}, "payload": 1}).status == expected


# -------------------------------------------------------------------------------- logging


def test_log_lines_carry_envelope_id_and_trace_id(start_runtime):
    rt = start_runtime("basic.log_and_echo")
    env = envelope("hi", id="env-42", headers={"trace_id": "trace-99"})
    assert rt.invoke(env).status == 200
    assert rt.signal(signal.SIGTERM) == 0
    lines = [l for l in rt.stderr().splitlines() if "user log line" in l]
    assert len(lines) == 1
    assert "envelope_id=env-42 trace_id=trace-99" in lines[0]
    assert re.search(r"WARNING user\.handler ", lines[0])


def test_async_handler_log_lines_carry_ids(start_runtime):
    rt = start_runtime("aio.log_and_echo")
    assert rt.invoke(envelope("hi", id="a-env", headers={"trace_id": "a-trace"})).status == 200
    assert rt.signal(signal.SIGTERM) == 0
    lines = [l for l in rt.stderr().splitlines() if "async user log line" in l]
    assert len(lines) == 1 and "envelope_id=a-env trace_id=a-trace" in lines[0]


def test_no_per_request_logs_at_info(start_runtime):
    rt = start_runtime("basic.raise_value")
    for i in range(20):
        assert rt.invoke(envelope(i)).status == 500
    assert rt.invoke(b"garbage").status == 400
    assert rt.signal(signal.SIGTERM) == 0
    lines = [l for l in rt.stderr().splitlines() if l.strip()]
    assert len(lines) == 2, lines  # "runtime ready" and "runtime stopped"
    assert "runtime ready" in lines[0] and "handler=basic.raise_value (sync)" in lines[0]


def test_debug_logs_requests_with_ids(start_runtime):
    rt = start_runtime("basic.raise_value", env={"ASYA_LOG_LEVEL": "debug"})
    assert rt.invoke(envelope(1, id="dbg-1", headers={"trace_id": "t-dbg"})).status == 500
    assert rt.signal(signal.SIGTERM) == 0
    err = rt.stderr()
    invoke_lines = [l for l in err.splitlines() if "invoke: curr=" in l]
    assert invoke_lines and "envelope_id=dbg-1 trace_id=t-dbg" in invoke_lines[0]
    assert "handler failed" in err and "ValueError: bad input 1" in err
