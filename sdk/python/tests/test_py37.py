"""The runtime runs on Python 3.7 (the oldest supported): smoke-test it there when available.

vermin checks the source statically in check.sh; this runs it for real.
"""

import os

import pytest

from conftest import envelope

# A pyenv shim named python3.7 exists even when 3.7 is not selected: prefer real binaries.
CANDIDATES = [
    os.path.expanduser("~/.pyenv/versions/3.7.16/bin/python3.7"),
    "/usr/bin/python3.7",
    "/usr/local/bin/python3.7",
]
PY37 = next((p for p in CANDIDATES if p and os.path.exists(p)), None)

pytestmark = pytest.mark.skipif(PY37 is None, reason="no Python 3.7 interpreter on this machine")


def test_payload_mode_on_37(start_runtime):
    rt = start_runtime("basic.fanout3", python=PY37)
    frames = rt.invoke(envelope(u"\u00e9")).json()["frames"]
    assert len(frames) == 3 and frames[0]["route"] == {"prev": ["a"], "curr": "b", "next": []}
    assert "python=3.7" in rt.stderr()


def test_async_and_streaming_on_37(start_runtime):
    rt = start_runtime("streaming.async_frames", python=PY37)
    events = rt.invoke(envelope({"n": 1})).events()
    assert [e for e, _ in events] == ["downstream"] * 3 + ["upstream", "done"]
    rt2 = start_runtime("aio.double", python=PY37, env={"ASYA_SOCKET_DIR": os.path.join(rt.dir, "b")})
    assert rt2.invoke(envelope({"value": 4})).json()["frames"][0]["payload"] == {"result": 8}


def test_serialisation_and_errors_on_37(start_runtime):
    rt = start_runtime("serial.everything", python=PY37)
    payload = rt.invoke(envelope(1)).json()["frames"][0]["payload"]
    assert payload["datetime"] == "2024-05-17T12:30:45.123456+00:00" and payload["set"] == [1, 2, 3]
    rt2 = start_runtime("serial.circular", python=PY37, env={"ASYA_SOCKET_DIR": os.path.join(rt.dir, "c")})
    assert rt2.invoke(envelope(1)).json()["details"]["type"] == "asya_runtime.SerializationError"


def test_handler_abi_on_37(start_runtime):
    rt = start_runtime("abi.set_then_frames_async", python=PY37)
    events = rt.invoke(envelope(1, next=["b"])).events()
    assert [e for e, _ in events] == ["downstream"] * 3 + ["done"]
    assert events[1][1]["route"] == {"prev": ["a"], "curr": "x", "next": ["y"]}
    rt2 = start_runtime("abi.catch_permission", python=PY37,
                        env={"ASYA_SOCKET_DIR": os.path.join(rt.dir, "d")})
    assert rt2.invoke(envelope(1)).events()[0][1]["payload"]["caught"] == "PermissionError"
