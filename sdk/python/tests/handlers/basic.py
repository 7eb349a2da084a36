"""Payload-mode handlers used by the tests."""

import logging
import os
import sys
import time

LOG = logging.getLogger("user.handler")


def echo(payload):
    return payload


def double(payload):
    return {"result": payload["value"] * 2}


def fanout3(payload):
    return [{"chunk": i, "of": payload} for i in range(3)]


def return_none(payload):
    return None


def return_empty(payload):
    return []


def return_tuple(payload):
    return (1, "two", [3])


def raise_value(payload):
    raise ValueError("bad input %s" % payload)


class BaseHandlerError(Exception):
    pass


class QuotaExceeded(BaseHandlerError):
    pass


def raise_custom(payload):
    raise QuotaExceeded("quota of %d exceeded" % payload["quota"])


def call_exit(payload):
    sys.exit(3)


def log_and_echo(payload):
    LOG.warning("user log line for %s", payload)
    return payload


def block(payload):
    """Creates payload["started"] (if given), then waits (bounded) until the file named by
    payload["release"] exists."""
    if "started" in payload:
        open(payload["started"], "w").close()
    deadline = time.monotonic() + 15
    while not os.path.exists(payload["release"]):
        if time.monotonic() > deadline:
            raise TimeoutError("release file never appeared")
        time.sleep(0.005)
    return {"released": True}


class Counter(object):
    """Stateful class handler: instantiated once, counts calls."""

    def __init__(self, start=0, step=1):
        self.count = start
        self.step = step
        self.pid = os.getpid()

    def process(self, payload):
        self.count += self.step
        return {"count": self.count, "pid": self.pid}


class NeedsModelPath(object):
    def __init__(self, model_path, device="cpu"):
        self.model_path = model_path

    def process(self, payload):
        return payload


class InitFails(object):
    def __init__(self):
        raise RuntimeError("model file missing")

    def process(self, payload):
        return payload


NOT_CALLABLE = 42


def deep_output(payload):
    """A result nested 100,000 levels deep: too deep to serialise."""
    out = []  # type: list
    for _ in range(100000):
        out = [out]
    return out


def deep_output_stream(payload):
    """A generator whose second item is too deep to serialise."""
    yield {"first": True}
    yield deep_output(payload)


def ask_human(payload):
    """Pauses the task: the marker ``asya_runtime.pause`` builds, written out."""
    return {
        "__asya_pause__": {"prompt": "approve?", "fields": ["approved"], "timeout": 60},
        "payload": dict(payload, asked=True),
    }


def ask_then_more(payload):
    """A list: the first frame pauses, the second goes on."""
    return [{"__asya_pause__": {"prompt": "p"}, "payload": 1}, 2]
