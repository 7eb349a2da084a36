"""async def handlers run on the runtime's event loop."""

from conftest import envelope


def test_async_handler(start_runtime):
    rt = start_runtime("aio.double")
    for v in range(3):
        assert rt.invoke(envelope({"value": v})).json()["frames"][0]["payload"] == {"result": 2 * v}


def test_async_fan_out(start_runtime):
    rt = start_runtime("aio.fanout")
    assert [f["payload"] for f in rt.invoke(envelope(1)).json()["frames"]] == [1, 2]


def test_async_handler_error(start_runtime):
    rt = start_runtime("aio.fail")
    resp = rt.invoke(envelope(1))
    assert resp.status == 500
    d = resp.json()["details"]
    assert d["type"] == "LookupError"
    assert d["message"] == "async lookup failed"
    assert "aio.py" in d["traceback"]


def test_async_method_of_class_keeps_state(start_runtime):
    rt = start_runtime("aio.AsyncModel.predict")
    c1, c2 = rt.client(), rt.client()
    assert c1.invoke(envelope(1)).json()["frames"][0]["payload"] == {"calls": 1}
    assert c2.invoke(envelope(1)).json()["frames"][0]["payload"] == {"calls": 2}
    assert c1.invoke(envelope(1)).json()["frames"][0]["payload"] == {"calls": 3}
