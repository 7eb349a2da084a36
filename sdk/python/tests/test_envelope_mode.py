"""ASYA_HANDLER_MODE=envelope: the handler edits the envelope; prev/curr are protected."""

import pytest

from conftest import envelope

MODE = {"ASYA_HANDLER_MODE": "envelope"}


def test_handler_may_append_to_next_and_edit_headers(start_runtime):
    rt = start_runtime("envelope_handlers.add_next", env=MODE)
    frames = rt.invoke(envelope(1, prev=["p"], curr="a", next=["b"])).json()["frames"]
    assert len(frames) == 1
    f = frames[0]
    assert f["route"] == {"prev": ["p", "a"], "curr": "b", "next": ["extra"]}
    assert f["payload"] == {"seen": True}
    assert f["headers"] == {"trace_id": "trace-1", "x-note": "added"}
    assert f["id"] == "env-1"


def test_handler_may_replace_next(start_runtime):
    rt = start_runtime("envelope_handlers.replace_next", env=MODE)
    f = rt.invoke(envelope(1, curr="a", next=["b", "c"])).json()["frames"][0]
    assert f["route"] == {"prev": ["a"], "curr": "x", "next": ["y"]}


def test_handler_may_end_the_route(start_runtime):
    rt = start_runtime("envelope_handlers.clear_next", env=MODE)
    f = rt.invoke(envelope(1, curr="a", next=["b", "c"])).json()["frames"][0]
    assert f["route"] == {"prev": ["a"], "curr": "", "next": []}


@pytest.mark.parametrize("handler,fragment", [
    ("envelope_handlers.change_prev", "route.prev is history and must not change"),
    ("envelope_handlers.erase_prev", "route.prev is history and must not change"),
    ("envelope_handlers.change_curr", "route.curr must not change"),
    ("envelope_handlers.break_route", "no route object"),
])
def test_route_violations_are_500(start_runtime, handler, fragment):
    rt = start_runtime(handler, env=MODE)
    resp = rt.invoke(envelope(1, prev=["p0", "p1"], curr="a", next=["b"]))
    assert resp.status == 500
    err = resp.json()
    assert err["error"] == "processing_error"
    assert fragment in err["details"]["message"]
    assert err["details"]["type"] == "asya_runtime.RouteViolation"
    assert err["details"]["mro"][:2] == ["asya_runtime.RouteViolation", "ValueError"]


def test_validation_off_allows_prev_rewrite(start_runtime):
    rt = start_runtime("envelope_handlers.change_prev",
                       env=dict(MODE, ASYA_ENABLE_VALIDATION="false"))
    f = rt.invoke(envelope(1, prev=["p0"], curr="a", next=["b"])).json()["frames"][0]
    assert f["route"] == {"prev": ["rewritten", "a"], "curr": "b", "next": []}


def test_envelope_fan_out(start_runtime):
    rt = start_runtime("envelope_handlers.fanout", env=MODE)
    frames = rt.invoke(envelope(1, curr="a", next=["b"])).json()["frames"]
    assert [(f["payload"], f["route"]) for f in frames] == [
        ({"branch": 0}, {"prev": ["a"], "curr": "branch-0", "next": []}),
        ({"branch": 1}, {"prev": ["a"], "curr": "branch-1", "next": []}),
    ]


def test_non_envelope_result_is_500(start_runtime):
    rt = start_runtime("envelope_handlers.not_an_envelope", env=MODE)
    resp = rt.invoke(envelope(1))
    assert resp.status == 500
    assert resp.json()["details"]["type"] == "TypeError"
    assert "must return an envelope" in resp.json()["details"]["message"]


def test_envelope_abort(start_runtime):
    rt = start_runtime("envelope_handlers.abort", env=MODE)
    assert rt.invoke(envelope(1)).status == 204


def test_envelope_stream_validates_every_frame(start_runtime):
    rt = start_runtime("envelope_handlers.stream", env=MODE)
    events = rt.invoke(envelope(1, prev=["p"], curr="a", next=["b"])).events()
    assert [e for e, _ in events] == ["downstream", "downstream", "error", "done"]
    assert events[0][1]["route"] == {"prev": ["p", "a"], "curr": "s-0", "next": []}
    assert events[1][1]["route"] == {"prev": ["p", "a"], "curr": "s-1", "next": []}
    assert events[2][1]["details"]["type"] == "asya_runtime.RouteViolation"
