"""POST /invoke in payload mode: frames, route shift, fan-out, abort, errors, bad envelopes."""

import json

import pytest

from conftest import envelope


def test_echo_shifts_route_and_keeps_headers_and_status(start_runtime):
    rt = start_runtime("basic.echo")
    env = envelope({"k": [1, 2]}, prev=["p0"], curr="a", next=["b", "c"],
                   status={"phase": "processing", "attempt": 1, "deadline_at": "2030-01-01T00:00:00Z"},
                   parent_id="parent-7", unknown_field={"kept": "by host"})
    resp = rt.invoke(env)
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert int(resp.headers["content-length"]) == len(resp.body)
    frames = resp.json()["frames"]
    assert frames == [{
        "payload": {"k": [1, 2]},
        "route": {"prev": ["p0", "a"], "curr": "b", "next": ["c"]},
        "headers": {"trace_id": "trace-1"},
        "status": {"phase": "processing", "attempt": 1, "deadline_at": "2030-01-01T00:00:00Z"},
    }]


def test_last_actor_shifts_to_empty_curr(start_runtime):
    rt = start_runtime("basic.echo")
    frames = rt.invoke(envelope(1, prev=["x"], curr="a", next=[])).json()["frames"]
    assert frames[0]["route"] == {"prev": ["x", "a"], "curr": "", "next": []}


def test_route_without_prev_and_next_keys(start_runtime):
    rt = start_runtime("basic.echo")
    env = envelope(1)
    env["route"] = {"curr": "a"}
    frames = rt.invoke(env).json()["frames"]
    assert frames[0]["route"] == {"prev": ["a"], "curr": "", "next": []}


def test_envelope_without_headers_gives_frame_without_headers(start_runtime):
    rt = start_runtime("basic.echo")
    env = envelope(1)
    del env["headers"]
    frame = rt.invoke(env).json()["frames"][0]
    assert "headers" not in frame and "status" not in frame


def test_handler_gets_payload_and_result_is_used(start_runtime):
    rt = start_runtime("basic.double")
    assert rt.invoke(envelope({"value": 21})).json()["frames"][0]["payload"] == {"result": 42}


def test_fan_out_of_three(start_runtime):
    rt = start_runtime("basic.fanout3")
    frames = rt.invoke(envelope("in", curr="a", next=["b", "c"])).json()["frames"]
    assert [f["payload"] for f in frames] == [{"chunk": i, "of": "in"} for i in range(3)]
    for f in frames:
        assert f["route"] == {"prev": ["a"], "curr": "b", "next": ["c"]}
        assert f["headers"] == {"trace_id": "trace-1"}


@pytest.mark.parametrize("handler", ["basic.return_none", "basic.return_empty", "aio.nothing"])
def test_abort_is_204_without_body(start_runtime, handler):
    rt = start_runtime(handler)
    c = rt.client()
    resp = c.invoke(envelope(1), headers={"X-Request-Id": "ab"})
    assert resp.status == 204
    assert resp.body == b""
    assert "content-length" not in resp.headers
    assert resp.headers["x-request-id"] == "ab"
    assert c.request("GET", "/healthz").status == 200  # the connection is still usable


def test_tuple_result_is_one_frame_with_a_list(start_runtime):
    rt = start_runtime("basic.return_tuple")
    frames = rt.invoke(envelope(1)).json()["frames"]
    assert len(frames) == 1 and frames[0]["payload"] == [1, "two", [3]]


def test_unicode_payload_round_trips(start_runtime):
    rt = start_runtime("serial.unicode_back")
    payload = {"text": u"h\u00e9llo w\u00f6rld \u2713 \u65e5\u672c\u8a9e \U0001F389", u"cl\u00e9": u"\u0000nul\n\"q\""}
    resp = rt.invoke(envelope(payload))
    assert resp.status == 200
    assert resp.json()["frames"][0]["payload"] == {"got": payload, "extra": u"\u00e9\u6f22\U0001F600"}


def test_handler_exception_is_500_with_details(start_runtime):
    rt = start_runtime("basic.raise_value")
    resp = rt.invoke(envelope(7))
    assert resp.status == 500
    body = resp.json()
    assert body["error"] == "processing_error"
    d = body["details"]
    assert d["message"] == "bad input 7"
    assert d["type"] == "ValueError"
    assert d["mro"] == ["ValueError", "Exception", "BaseException", "object"]
    assert d["traceback"].startswith("Traceback (most recent call last):")
    assert "basic.py" in d["traceback"] and "raise_value" in d["traceback"]
    assert d["traceback"].rstrip().endswith("ValueError: bad input 7")


def test_custom_exception_type_is_qualified(start_runtime):
    rt = start_runtime("basic.raise_custom")
    d = rt.invoke(envelope({"quota": 5})).json()["details"]
    assert d["type"] == "basic.QuotaExceeded"
    assert d["mro"] == ["basic.QuotaExceeded", "basic.BaseHandlerError", "Exception", "BaseException", "object"]
    assert d["message"] == "quota of 5 exceeded"


def test_handler_key_error_inside_handler_is_500(start_runtime):
    rt = start_runtime("basic.double")
    d = rt.invoke(envelope({"nope": 1})).json()["details"]
    assert d["type"] == "KeyError" and d["message"] == "'value'"


def test_sys_exit_in_handler_is_a_500_not_a_dead_runtime(start_runtime):
    rt = start_runtime("basic.call_exit")
    resp = rt.invoke(envelope(1))
    assert resp.status == 500
    assert resp.json()["details"]["type"] == "SystemExit"
    assert rt.invoke(envelope(1)).status == 500
    assert rt.proc.poll() is None


def test_class_handler_keeps_state_across_calls(start_runtime):
    rt = start_runtime("basic.Counter.process")
    counts = [rt.invoke(envelope(i)).json()["frames"][0]["payload"]["count"] for i in range(3)]
    assert counts == [1, 2, 3]
    c2 = rt.client()  # another connection sees the same instance
    assert c2.invoke(envelope(0)).json()["frames"][0]["payload"]["count"] == 4


def test_handler_in_a_package(start_runtime):
    rt = start_runtime("pkg.sub.handle")
    assert rt.invoke(envelope(3)).json()["frames"][0]["payload"] == {"from": "pkg.sub", "payload": 3}


def test_class_handler_in_a_package(start_runtime):
    rt = start_runtime("pkg.sub.Greeter.greet")
    assert rt.invoke(envelope("bob")).json()["frames"][0]["payload"] == "hello bob"


BAD_REQUESTS = [
    (b"", "empty body"),
    (b"not json", "not valid JSON"),
    (b"{\"id\": \"x\", ", "not valid JSON"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\"a string\"", "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"{\"id\": \"x\", \"payload\": 1}", "route must be an object"),
    (b"{\"id\": \"x\", \"route\": [\"a\"], \"payload\": 1}", "route must be an object"),
    (b"{\"id\": \"x\", \"route\": {\"prev\": [], \"next\": []}}", "route.curr must be a string"),
    (b"{\"id\": \"x\", \"route\": {\"prev\": [], \"curr\": 5, \"next\": []}}", "route.curr must be a string"),
    (b"{\"id\": \"x\", \"route\": {\"prev\": \"a\", \"curr\": \"a\", \"next\": []}}", "route.prev must be a list of strings"),
    (b"{\"id\": \"x\", \"route\": {\"prev\": [1], \"curr\": \"a\", \"next\": []}}", "route.prev must be a list of strings"),
    (b"{\"id\": \"x\", \"route\": {\"prev\": [], \"curr\": \"a\", \"next\": {}}}", "route.next must be a list of strings"),
    (b"{\"id\": \"x\", \"route\": {\"prev\": [], \"curr\": \"a\", \"next\": [null]}}", "route.next must be a list of strings"),
    (b"{\"route\": {\"prev\": [], \"curr\": \"a\", \"next\": []}}", "id must be a non-empty string"),
    (b"{\"id\": \"\", \"route\": {\"prev\": [], \"curr\": \"a\", \"next\": []}}", "id must be a non-empty string"),
    (b"{\"id\": 5, \"route\": {\"prev\": [], \"curr\": \"a\", \"next\": []}}", "id must be a non-empty string"),
    (b"{\"id\": \"x\", \"headers\": [], \"route\": {\"prev\": [], \"curr\": \"a\", \"next\": []}}", "headers must be an object"),
    (b"{\"id\": \"x\", \"status\": \"ok\", \"route\": {\"prev\": [], \"curr\": \"a\", \"next\": []}}", "status must be an object"),
]


@pytest.mark.parametrize("body,message", BAD_REQUESTS)
def test_malformed_envelopes_are_400(start_runtime, body, message):
    rt = start_runtime("basic.echo")
    c = rt.client()
    resp = c.invoke(body, headers={"X-Request-Id": "bad"})
    assert resp.status == 400
    err = resp.json()
    assert err["error"] == "msg_parsing_error"
    assert message in err["details"]["message"]
    assert resp.headers["x-request-id"] == "bad"
    assert c.request("GET", "/healthz").status == 200  # the connection stays usable


def test_whitespace_around_json_is_fine(start_runtime):
    rt = start_runtime("basic.echo")
    body = b"  \n" + json.dumps(envelope({"w": 1})).encode() + b"\n\t "
    assert rt.invoke(body).json()["frames"][0]["payload"] == {"w": 1}


def test_trailing_garbage_is_400(start_runtime):
    rt = start_runtime("basic.echo")
    resp = rt.invoke(json.dumps(envelope(1)).encode() + b" {}")
    assert resp.status == 400
    assert "Extra data" in resp.json()["details"]["message"]


def test_validation_off_accepts_envelope_without_id(start_runtime):
    rt = start_runtime("basic.echo", env={"ASYA_ENABLE_VALIDATION": "false"})
    env = {"route": {"prev": [], "curr": "a", "next": ["b"]}, "payload": 5}
    frames = rt.invoke(env).json()["frames"]
    assert frames == [{"payload": 5, "route": {"prev": ["a"], "curr": "b", "next": []}}]
    # the route is still required: it is what the runtime shifts
    assert rt.invoke({"payload": 5}).status == 400


def test_missing_payload_is_null(start_runtime):
    rt = start_runtime("serial.unicode_back")
    env = envelope()
    del env["payload"]
    assert rt.invoke(env).json()["frames"][0]["payload"]["got"] is None


def test_pause_marker_becomes_a_frame_with_the_pause_header(start_runtime):
    rt = start_runtime("basic.ask_human")
    frames = rt.invoke(envelope({"k": 1}, curr="a", next=["b"])).json()["frames"]
    assert frames == [{
        "payload": {"k": 1, "asked": True},
        "route": {"prev": ["a"], "curr": "b", "next": []},
        "headers": {"trace_id": "trace-1",
                    "x-asya-pause": {"prompt": "approve?", "fields": ["approved"], "timeout": 60}},
    }]


def test_pause_marker_in_a_list_pauses_only_its_frame(start_runtime):
    rt = start_runtime("basic.ask_then_more")
    frames = rt.invoke(envelope(0, curr="a", next=["b"])).json()["frames"]
    assert [f["payload"] for f in frames] == [1, 2]
    assert frames[0]["headers"]["x-asya-pause"] == {"prompt": "p"}
    assert "x-asya-pause" not in frames[1]["headers"]


def test_pause_helper_builds_the_marker():
    import importlib.util, pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "asya_runtime.py"
    spec = importlib.util.spec_from_file_location("asya_runtime_for_pause", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.pause({"a": 1}, prompt="ok?", fields=["x"], timeout="10m") == {
        "__asya_pause__": {"prompt": "ok?", "fields": ["x"], "timeout": "10m"},
        "payload": {"a": 1},
    }
