"""Generator handlers speaking upstream Asya's ABI (plain Python, no imports from the runtime)."""


def get_paths(payload):
    """GET every path in payload["paths"]; emits {path: value} as one frame."""
    out = {}
    for path in payload["paths"]:
        out[path] = yield "GET", path
    yield out


async def get_paths_async(payload):
    out = {}
    for path in payload["paths"]:
        out[path] = yield "GET", path
    yield out


def get_is_a_copy(payload):
    headers = yield "GET", ".headers"
    headers["trace_id"] = "mutated"
    nxt = yield "GET", ".route.next"
    nxt.append("mutated")
    yield {"headers": (yield "GET", ".headers"), "next": (yield "GET", ".route.next")}


def set_then_frames(payload):
    """A frame before any command, one after SET .route.next, one after more edits."""
    yield {"n": 0}
    yield "SET", ".route.next", ["x", "y"]
    yield {"n": 1}
    yield "SET", ".headers.priority", "high"
    yield "SET", '.headers["model.version"]', {"major": 2}
    yield "SET", ".status.note", "seen"
    yield "DEL", ".headers.trace_id"
    yield {"n": 2}


async def set_then_frames_async(payload):
    yield {"n": 0}
    yield "SET", ".route.next", ["x", "y"]
    yield {"n": 1}
    yield "SET", ".headers.priority", "high"
    yield "SET", '.headers["model.version"]', {"major": 2}
    yield "SET", ".status.note", "seen"
    yield "DEL", ".headers.trace_id"
    yield {"n": 2}


def apply_ops(payload):
    """Apply payload["ops"] (lists: [verb, path] or [verb, path, value]) then emit one frame."""
    for op in payload["ops"]:
        yield tuple(op)
    yield {"done": True}


async def apply_ops_async(payload):
    for op in payload["ops"]:
        yield tuple(op)
    yield {"done": True}


def catch_permission(payload):
    try:
        yield "SET", ".route.curr", "elsewhere"
    except PermissionError as exc:
        yield {"caught": type(exc).__name__, "message": str(exc)}


def fly_then_emit(payload):
    yield "FLY", {"token": "hel"}
    yield "FLY", "lo"
    yield payload


async def fly_async(payload):
    yield "FLY", {"token": "a"}
    yield payload


def fly_helpers(payload):
    import asya_runtime  # importable: the runtime script's directory is sys.path[0]

    yield "FLY", asya_runtime.fly_text("hi")
    yield "FLY", asya_runtime.fly_text("!", artifact_id="a-1", last=True)
    yield "FLY", asya_runtime.fly_status("Thinking...")


def not_commands(payload):
    yield ("get", ".id")        # lower-case: not a verb
    yield ("HELLO", 1)          # unknown word
    yield (1, "GET")            # verb not first
    yield ()                    # empty tuple
    yield ["GET", ".id"]        # a list is never a command


def bare_yield(payload):
    value = yield
    yield {"sent_back": value}


def yield_from_helper(payload):
    yield from _route_to("r1", "r2")
    yield payload


def _route_to(*actors):
    yield "SET", ".route.next", list(actors)


def error_after_frame(payload):
    yield {"first": True}
    yield "SET", ".id", "new-id"
    yield {"never": True}


def payload_not_visible(payload):
    yield {"payload": (yield "GET", ".payload")}


def envelope_mode_get(env):
    env["payload"] = {"curr": (yield "GET", ".route.curr")}
    yield "FLY", {"p": 1}
    yield env


def envelope_mode_set(env):
    yield "SET", ".route.next", ["z"]
    yield env


def ops_catching(payload):
    """Apply payload["ops"], catching each failure; emit the error types and the result."""
    errors = []
    for op in payload["ops"]:
        try:
            yield tuple(op)
        except Exception as exc:
            errors.append(type(exc).__name__)
    yield {"errors": errors}
