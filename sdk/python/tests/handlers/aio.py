"""async def handlers."""

import asyncio
import logging

LOG = logging.getLogger("user.aio")


async def double(payload):
    await asyncio.sleep(0)
    return {"result": payload["value"] * 2}


async def fanout(payload):
    await asyncio.sleep(0)
    return [1, 2]


async def nothing(payload):
    return None


async def fail(payload):
    await asyncio.sleep(0)
    raise LookupError("async lookup failed")


async def log_and_echo(payload):
    await asyncio.sleep(0)
    LOG.warning("async user log line")
    return payload


class AsyncModel(object):
    def __init__(self):
        self.calls = 0

    async def predict(self, payload):
        self.calls += 1
        await asyncio.sleep(0)
        return {"calls": self.calls}
