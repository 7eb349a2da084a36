"""Upstream Asya's handler ABI: generator handlers yield ("GET"|"SET"|"DEL"|"FLY", ...) tuples.

Every test runs the real runtime over its Unix socket (see conftest.py)."""

import pytest

from conftest import envelope


def _env(payload, **kw):
    kw.setdefault("prev", ["p0"])
    kw.setdefault("curr", "a")
    kw.setdefault("next", ["b", "c", "d"])
    env = envelope(payload, **kw)
    env["parent_id"] = "parent-0"
    env["status"] = {"phase": "processing", "nested": {"k": [1, 2]}}
    env["headers"] = {"trace_id": "trace-1", "model.version": "v1"}
    return env


def _frames(resp):
    assert resp.status == 200, resp
    events = resp.events()
    assert events[-1] == ("done", {}), events
    return events[:-1]


def _only_frame(resp):
    events = _frames(resp)
    assert [e for e, _ in events] == ["downstream"], events
    return events[0][1]


GET_CASES = [
    (".id", "env-1"),
    (".parent_id", "parent-0"),
    (".route", {"prev": ["p0"], "curr": "a", "next": ["b", "c", "d"]}),
    (".route.prev", ["p0"]),
    (".route.curr", "a"),
    (".route.next", ["b", "c", "d"]),
    (".route.next[0]", "b"),
    (".route.next[-1]", "d"),
    (".route.next[-3]", "b"),
    (".route.next[3]", None),       # out of range: missing
    (".route.next[-4]", None),
    (".headers", {"trace_id": "trace-1", "model.version": "v1"}),
    (".headers.trace_id", "trace-1"),
    ('.headers["trace_id"]', "trace-1"),
    ('.headers["model.version"]', "v1"),   # a key with a dot needs brackets
    (".headers['model.version']", "v1"),
    (".headers.model.version", None),      # dot notation splits it
    (".headers.missing", None),
    (".status.phase", "processing"),
    (".status.nested.k[1]", 2),
    ('.status["nested"].k[-1]', 2),
    (".status.phase.deeper", None),        # through a string: missing
    (".nope", None),
    (".payload", None),                    # the payload is the argument, not metadata
]


@pytest.mark.parametrize("handler", ["abi.get_paths", "abi.get_paths_async"])
def test_get_reads_metadata_paths(start_runtime, handler):
    rt = start_runtime(handler)
    paths = [p for p, _ in GET_CASES]
    frame = _only_frame(rt.invoke(_env({"paths": paths})))
    assert frame["payload"] == {p: v for p, v in GET_CASES}
    # GETs change nothing: the frame is the plain payload-mode frame
    assert frame["route"] == {"prev": ["p0", "a"], "curr": "b", "next": ["c", "d"]}
    assert frame["headers"] == {"trace_id": "trace-1", "model.version": "v1"}
    assert frame["status"] == {"phase": "processing", "nested": {"k": [1, 2]}}


def test_get_returns_a_copy(start_runtime):
    rt = start_runtime("abi.get_is_a_copy")
    frame = _only_frame(rt.invoke(_env(1)))
    assert frame["payload"] == {
        "headers": {"trace_id": "trace-1", "model.version": "v1"},
        "next": ["b", "c", "d"],
    }
    assert frame["route"]["next"] == ["c", "d"]


@pytest.mark.parametrize("handler", ["abi.set_then_frames", "abi.set_then_frames_async"])
def test_set_and_del_shape_later_frames_only(start_runtime, handler):
    rt = start_runtime(handler)
    events = _frames(rt.invoke(_env(1)))
    assert [e for e, _ in events] == ["downstream"] * 3
    f0, f1, f2 = [f for _, f in events]
    # before any command: the payload-mode frame (route shifted from the input)
    assert f0 == {
        "payload": {"n": 0},
        "route": {"prev": ["p0", "a"], "curr": "b", "next": ["c", "d"]},
        "headers": {"trace_id": "trace-1", "model.version": "v1"},
        "status": {"phase": "processing", "nested": {"k": [1, 2]}},
    }
    # SET .route.next replaces the rest of the route, shifted like any payload-mode frame
    assert f1["route"] == {"prev": ["p0", "a"], "curr": "x", "next": ["y"]}
    assert f1["headers"] == f0["headers"] and f1["status"] == f0["status"]
    # headers/status edits apply to the frames after them
    assert f2["route"] == f1["route"]
    assert f2["headers"] == {"model.version": {"major": 2}, "priority": "high"}
    assert f2["status"] == {"phase": "processing", "nested": {"k": [1, 2]}, "note": "seen"}


def _apply(rt, ops, **kw):
    return rt.invoke(_env({"ops": ops}, **kw))


@pytest.mark.parametrize("handler", ["abi.apply_ops", "abi.apply_ops_async"])
@pytest.mark.parametrize("ops,route_next", [
    ([["SET", ".route.next[:0]", ["first"]]], ["first", "b", "c", "d"]),      # prepend
    ([["SET", ".route.next[999:]", ["last"]]], ["b", "c", "d", "last"]),      # append
    ([["SET", ".route.next[1:3]", ["mid"]]], ["b", "mid"]),                   # replace a range
    ([["SET", ".route.next[-1:]", []]], ["b", "c"]),                          # drop the last
    ([["SET", ".route.next[0]", "B"]], ["B", "c", "d"]),                      # index
    ([["SET", ".route.next[-1]", "D"]], ["b", "c", "D"]),                     # negative index
    ([["DEL", ".route.next[0]"]], ["c", "d"]),
    ([["DEL", ".route.next[-1]"]], ["b", "c"]),
    ([["DEL", ".route.next"]], []),
    ([["SET", ".route.next", []]], []),
])
def test_route_next_edits(start_runtime, handler, ops, route_next):
    rt = start_runtime(handler)
    frame = _only_frame(_apply(rt, ops))
    if route_next:
        assert frame["route"] == {"prev": ["p0", "a"], "curr": route_next[0], "next": route_next[1:]}
    else:  # an empty rest of route: the frame ends the route
        assert frame["route"] == {"prev": ["p0", "a"], "curr": "", "next": []}


def test_headers_and_status_edits(start_runtime):
    rt = start_runtime("abi.apply_ops")
    frame = _only_frame(_apply(rt, [
        ["SET", ".headers", {"only": 1}],
        ["SET", ".headers.list", [1, 2, 3]],
        ["SET", ".headers.list[-1]", 30],
        ["SET", ".headers.list[:0]", [0]],
        ["SET", ".status.a.b.c", True],          # SET creates missing objects
        ["DEL", ".status.nested.k[0]"],
        ["DEL", ".status.absent"],               # deleting a missing key is not an error
        ["DEL", ".headers.absent.deeper"],
    ]))
    assert frame["headers"] == {"only": 1, "list": [0, 1, 2, 30]}
    assert frame["status"] == {"phase": "processing", "nested": {"k": [2]}, "a": {"b": {"c": True}}}


def test_del_whole_headers_and_status_and_set_them_again(start_runtime):
    rt = start_runtime("abi.apply_ops")
    frame = _only_frame(_apply(rt, [["DEL", ".headers"], ["DEL", ".status"]]))
    assert "headers" not in frame and "status" not in frame
    frame = _only_frame(_apply(rt, [["DEL", ".headers"], ["SET", ".headers.k", "v"]]))
    assert frame["headers"] == {"k": "v"}


def test_input_envelope_not_mutated_across_requests(start_runtime):
    # the runtime's edits are per request: a second request starts from its own envelope
    rt = start_runtime("abi.apply_ops")
    _only_frame(_apply(rt, [["SET", ".status.nested.k[0]", 99], ["SET", ".headers.x", 1]]))
    frame = _only_frame(_apply(rt, []))
    assert frame["status"] == {"phase": "processing", "nested": {"k": [1, 2]}}
    assert frame["headers"] == {"trace_id": "trace-1", "model.version": "v1"}


@pytest.mark.parametrize("handler", ["abi.apply_ops", "abi.apply_ops_async"])
@pytest.mark.parametrize("verb,path", [
    ("SET", ".id"), ("DEL", ".id"),
    ("SET", ".parent_id"), ("DEL", ".parent_id"),
    ("SET", ".route.prev"), ("DEL", ".route.prev"), ("SET", ".route.prev[0]"),
    ("SET", ".route.curr"), ("DEL", ".route.curr"),
    ("SET", ".route"), ("DEL", ".route"),
    ("SET", ".payload"), ("SET", ".anything"), ("SET", '.["headers"]x'),
])
def test_writes_outside_writable_roots_are_permission_errors(start_runtime, handler, verb, path):
    rt = start_runtime(handler)
    op = [verb, path] + (["v"] if verb == "SET" else [])
    resp = _apply(rt, [op])
    if path == '.["headers"]x':  # not even a valid path
        assert resp.status == 500 and resp.json()["details"]["type"] == "ValueError"
        return
    assert resp.status == 500, resp
    body = resp.json()
    assert body["error"] == "processing_error"
    assert body["details"]["type"] == "PermissionError"
    assert body["details"]["mro"][:2] == ["PermissionError", "OSError"]
    assert path in body["details"]["message"]
    assert ".route.next, .headers and .status" in body["details"]["message"]


def test_permission_error_is_raised_at_the_yield(start_runtime):
    rt = start_runtime("abi.catch_permission")
    frame = _only_frame(rt.invoke(_env(1)))
    assert frame["payload"]["caught"] == "PermissionError"
    assert frame["route"]["curr"] == "b"  # route.curr kept


def test_error_after_a_frame_is_an_error_event(start_runtime):
    rt = start_runtime("abi.error_after_frame")
    events = _frames(rt.invoke(_env(1)))
    assert [e for e, _ in events] == ["downstream", "error"]
    assert events[1][1]["details"]["type"] == "PermissionError"


@pytest.mark.parametrize("op,etype", [
    (["GET"], "TypeError"),                          # arity
    (["GET", ".id", "extra"], "TypeError"),
    (["SET", ".headers.x"], "TypeError"),
    (["DEL", ".headers.x", 1], "TypeError"),
    (["FLY"], "TypeError"),
    (["GET", 7], "TypeError"),                       # path not a string
    (["GET", "headers"], "ValueError"),              # no leading dot
    (["GET", ".headers..x"], "ValueError"),
    (["GET", ".headers[x]"], "ValueError"),
    (["GET", ".headers[\"x]"], "ValueError"),
    (["GET", ".route.next[0"], "ValueError"),
    (["GET", ".route.next[0:1]"], "ValueError"),     # slices are for SET only
    (["DEL", ".route.next[0:1]"], "ValueError"),
    (["SET", ".route.next", "b"], "TypeError"),      # route.next stays a list of names
    (["SET", ".route.next", [1]], "TypeError"),
    (["SET", ".route.next[0]", 5], "TypeError"),
    (["SET", ".route.next[9]", "x"], "IndexError"),
    (["SET", ".headers", []], "TypeError"),
    (["SET", ".headers.trace_id[0:1]", ["x"]], "TypeError"),  # slice of a string
    (["SET", ".headers.trace_id.sub", 1], "TypeError"),
])
def test_malformed_commands(start_runtime, op, etype):
    rt = start_runtime("abi.apply_ops")
    resp = _apply(rt, [op])
    assert resp.status == 500, resp
    assert resp.json()["details"]["type"] == etype, resp.json()["details"]


@pytest.mark.parametrize("handler", ["abi.fly_then_emit", "abi.fly_async"])
def test_fly_is_an_upstream_event(start_runtime, handler):
    rt = start_runtime(handler)
    events = _frames(rt.invoke(_env({"q": 1})))
    kinds = [e for e, _ in events]
    assert kinds[-1] == "downstream" and set(kinds[:-1]) == {"upstream"}
    ups = [d for e, d in events if e == "upstream"]
    if handler == "abi.fly_then_emit":
        assert ups == [{"payload": {"token": "hel"}}, {"payload": "lo"}]
    else:
        assert ups == [{"payload": {"token": "a"}}]
    assert events[-1][1]["payload"] == {"q": 1}
    assert events[-1][1]["route"]["curr"] == "b"


def test_fly_helpers(start_runtime):
    rt = start_runtime("abi.fly_helpers")
    events = _frames(rt.invoke(_env(1)))
    assert events == [
        ("upstream", {"payload": {"artifact_update": {
            "artifact": {"artifact_id": "stream-0", "parts": [{"text": "hi"}]},
            "append": True, "last_chunk": False}}}),
        ("upstream", {"payload": {"artifact_update": {
            "artifact": {"artifact_id": "a-1", "parts": [{"text": "!"}]},
            "append": True, "last_chunk": True}}}),
        ("upstream", {"payload": {"status_update": {"status": {
            "state": "WORKING", "message": {"role": "agent", "parts": [{"text": "Thinking..."}]}}}}}),
    ]


def test_tuples_that_are_not_commands_stay_frames(start_runtime):
    rt = start_runtime("abi.not_commands")
    events = _frames(rt.invoke(_env(1)))
    assert [d["payload"] for _, d in events] == [["get", ".id"], ["HELLO", 1], [1, "GET"], [], ["GET", ".id"]]
    assert all(d["route"]["curr"] == "b" for _, d in events)


def test_bare_yield_is_a_no_op_and_gets_none(start_runtime):
    rt = start_runtime("abi.bare_yield")
    frame = _only_frame(rt.invoke(_env(1)))
    assert frame["payload"] == {"sent_back": None}


def test_yield_from_delegates_commands(start_runtime):
    rt = start_runtime("abi.yield_from_helper")
    frame = _only_frame(rt.invoke(_env({"v": 1})))
    assert frame["route"] == {"prev": ["p0", "a"], "curr": "r1", "next": ["r2"]}
    assert frame["payload"] == {"v": 1}


def test_envelope_mode_get_and_fly(start_runtime):
    rt = start_runtime("abi.envelope_mode_get", env={"ASYA_HANDLER_MODE": "envelope"})
    events = _frames(rt.invoke(_env(1)))
    assert events[0] == ("upstream", {"payload": {"p": 1}})
    assert events[1][0] == "downstream"
    assert events[1][1]["payload"] == {"curr": "a"}
    assert events[1][1]["route"] == {"prev": ["p0", "a"], "curr": "b", "next": ["c", "d"]}


def test_envelope_mode_set_is_refused(start_runtime):
    rt = start_runtime("abi.envelope_mode_set", env={"ASYA_HANDLER_MODE": "envelope"})
    resp = rt.invoke(_env(1))
    assert resp.status == 500
    details = resp.json()["details"]
    assert details["type"] == "TypeError"
    assert details["message"] == ("envelope mode: SET .route.next is not available, the handler "
                                  "edits the envelope it yields instead")


def test_failed_set_changes_nothing(start_runtime):
    rt = start_runtime("abi.ops_catching")
    frame = _only_frame(_apply(rt, [
        ["SET", ".route.next[0]", 5],            # not a name: route.next kept as it was
        ["SET", ".route.next[1:2]", [None]],
        ["SET", ".headers.new[0]", "x"],         # no half-created headers.new
        ["SET", ".status.nested.k[7]", 1],
        ["DEL", ".status.nested.k[7].x"],        # DEL through a missing index: nothing to do
        ["DEL", ".headers.trace_id[0]"],         # DEL through a string: nothing to do
    ]))
    assert frame["payload"] == {"errors": ["TypeError", "TypeError", "TypeError", "IndexError"]}
    assert frame["route"] == {"prev": ["p0", "a"], "curr": "b", "next": ["c", "d"]}
    assert frame["headers"] == {"trace_id": "trace-1", "model.version": "v1"}
    assert frame["status"] == {"phase": "processing", "nested": {"k": [1, 2]}}
