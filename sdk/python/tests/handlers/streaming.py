"""Generator handlers (sync and async)."""

import asyncio
import os
import time

from asya_runtime_helpers import upstream


def two_then_raise(payload):
    yield {"i": 0}
    yield {"i": 1}
    raise RuntimeError("stream broke after 2 frames")


def progress(payload):
    yield upstream({"progress": 0.5})
    yield {"part": 1}
    yield {"__asya_upstream__": {"progress": 1.0}}
    yield None  # skipped
    yield {"part": 2}


def raise_first(payload):
    raise KeyError("nothing yielded yet")
    yield  # pragma: no cover


def empty(payload):
    return
    yield  # pragma: no cover


def yield_list(payload):
    yield [1, 2, 3]


def cut_short(payload):
    """Yields one frame, waits for payload["release"], yields more; records its cleanup."""
    try:
        yield {"i": 0}
        deadline = time.monotonic() + 15
        while not os.path.exists(payload["release"]) and time.monotonic() < deadline:
            time.sleep(0.005)
        for i in range(1, 100):
            yield {"i": i, "pad": "x" * 10000}
    finally:
        open(payload["closed"], "w").close()


async def async_frames(payload):
    for i in range(3):
        await asyncio.sleep(0)
        yield {"i": i, "n": payload["n"]}
    yield upstream("almost")


async def async_two_then_raise(payload):
    yield {"i": 0}
    await asyncio.sleep(0)
    yield {"i": 1}
    raise ValueError("async stream broke")
