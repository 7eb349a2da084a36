"""Generator handlers answered as server-sent events over chunked HTTP/1.1."""

import json
import os

from conftest import envelope, wait_until


def test_generator_error_after_two_frames(start_runtime):
    rt = start_runtime("streaming.two_then_raise")
    c = rt.client()
    resp = c.invoke(envelope({"x": 1}, prev=["p"], curr="a", next=["b", "c"]),
                    headers={"X-Request-Id": "s-1"})
    assert resp.status == 200
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.headers["x-request-id"] == "s-1"
    assert "content-length" not in resp.headers
    events = resp.events()
    assert [e for e, _ in events] == ["downstream", "downstream", "error", "done"]
    for i in range(2):
        frame = events[i][1]
        assert frame["payload"] == {"i": i}
        assert frame["route"] == {"prev": ["p", "a"], "curr": "b", "next": ["c"]}
        assert frame["headers"] == {"trace_id": "trace-1"}
    err = events[2][1]
    assert err["error"] == "processing_error"
    assert err["details"]["message"] == "stream broke after 2 frames"
    assert err["details"]["type"] == "RuntimeError"
    assert "two_then_raise" in err["details"]["traceback"]
    assert events[3][1] == {}
    # chunked framing kept the connection reusable
    assert c.invoke(envelope(1)).status == 200


def test_upstream_events_and_none_is_skipped(start_runtime):
    rt = start_runtime("streaming.progress")
    events = rt.invoke(envelope(1)).events()
    assert events == [
        ("upstream", {"payload": {"progress": 0.5}}),
        ("downstream", {"payload": {"part": 1}, "route": {"prev": ["a"], "curr": "b", "next": []},
                        "headers": {"trace_id": "trace-1"}}),
        ("upstream", {"payload": {"progress": 1.0}}),
        ("downstream", {"payload": {"part": 2}, "route": {"prev": ["a"], "curr": "b", "next": []},
                        "headers": {"trace_id": "trace-1"}}),
        ("done", {}),
    ]


def test_each_event_is_a_single_data_line(start_runtime):
    rt = start_runtime("streaming.progress")
    body = rt.invoke(envelope("multi\nline\r\npayload")).body.decode()
    for block in body.split("\n\n"):
        if block:
            lines = block.split("\n")
            assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: ")


def test_generator_raising_before_first_frame_is_plain_500(start_runtime):
    rt = start_runtime("streaming.raise_first")
    resp = rt.invoke(envelope(1), headers={"X-Request-Id": "s-2"})
    assert resp.status == 500
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["details"]["type"] == "KeyError"
    assert resp.headers["x-request-id"] == "s-2"


def test_empty_generator_sends_only_done(start_runtime):
    rt = start_runtime("streaming.empty")
    resp = rt.invoke(envelope(1))
    assert resp.status == 200
    assert resp.events() == [("done", {})]


def test_yielded_list_is_one_frame(start_runtime):
    rt = start_runtime("streaming.yield_list")
    events = rt.invoke(envelope(1)).events()
    assert [e for e, _ in events] == ["downstream", "done"]
    assert events[0][1]["payload"] == [1, 2, 3]


def test_async_generator(start_runtime):
    rt = start_runtime("streaming.async_frames")
    c = rt.client()
    for n in range(2):  # twice on one connection
        events = c.invoke(envelope({"n": n})).events()
        assert events == [("downstream", {"payload": {"i": i, "n": n},
                                          "route": {"prev": ["a"], "curr": "b", "next": []},
                                          "headers": {"trace_id": "trace-1"}}) for i in range(3)] + [
            ("upstream", {"payload": "almost"}),
            ("done", {}),
        ]


def test_async_generator_error_after_two_frames(start_runtime):
    rt = start_runtime("streaming.async_two_then_raise")
    events = rt.invoke(envelope(1)).events()
    assert [e for e, _ in events] == ["downstream", "downstream", "error", "done"]
    assert events[2][1]["details"]["type"] == "ValueError"
    assert events[2][1]["details"]["message"] == "async stream broke"


def test_streaming_over_http10_is_close_delimited(start_runtime):
    rt = start_runtime("streaming.two_then_raise")
    c = rt.client()
    resp = c.invoke(envelope(1), version="HTTP/1.0")
    assert resp.status == 200
    assert "transfer-encoding" not in resp.headers
    assert resp.headers["connection"] == "close"
    assert [e for e, _ in resp.events()] == ["downstream", "downstream", "error", "done"]
    assert c.is_closed()


def test_client_going_away_mid_stream_closes_the_generator(start_runtime, sockdir):
    rt = start_runtime("streaming.cut_short")
    release, closed = os.path.join(sockdir, "release"), os.path.join(sockdir, "closed")
    c = rt.client()
    c.send_request("POST", "/invoke", json.dumps(envelope({"release": release, "closed": closed})).encode())
    c._read_until(b"event: downstream")  # the first frame arrived; now hang up
    c.close()
    open(release, "w").close()
    wait_until(lambda: os.path.exists(closed), "the generator's finally block")
    assert rt.client().request("GET", "/healthz").status == 200


def test_streaming_with_connection_close(start_runtime):
    rt = start_runtime("streaming.progress")
    c = rt.client()
    resp = c.invoke(envelope(1), headers={"Connection": "close"})
    assert resp.headers["connection"] == "close"
    assert resp.events()[-1] == ("done", {})
    assert c.is_closed()
