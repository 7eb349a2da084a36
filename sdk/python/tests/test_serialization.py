"""Results that are not plain JSON are converted, never dropped."""

from conftest import envelope


def test_special_types(start_runtime):
    rt = start_runtime("serial.everything")
    resp = rt.invoke(envelope(1))
    assert resp.status == 200, resp
    p = resp.json()["frames"][0]["payload"]
    assert p["datetime"] == "2024-05-17T12:30:45.123456+00:00"
    assert p["naive"] == "2024-05-17T12:30:00"
    assert p["date"] == "2024-05-17"
    assert p["time"] == "08:15:00"
    assert p["dataclass"] == {"x": 1, "y": 2, "when": "2020-01-02"}
    assert p["pydantic_v2"] == {"a": 1, "dumped_by": "v2"}
    assert p["pydantic_v1"] == {"name": "n", "dumped_by": "v1"}
    assert p["uuid"] == "12345678-1234-5678-1234-567812345678"
    assert p["decimal"] == "3.14159265358979323846"
    assert p["bytes"] == "AAFiaW5hcnn/"  # base64 of b"\x00\x01binary\xff"
    assert p["bytearray"] == "YWI="
    assert p["set"] == [1, 2, 3]
    assert p["frozenset"] == ["a", "b"]
    assert sorted(p["mixed_set"], key=str) == [1, "a"]
    assert p["tuple"] == [1, [2, 3]]
    assert p["enum"] == "red"
    assert p["array"] == [[1, 2], [3, 4]]
    assert p["nested"] == [{"when": "1999-12-31"}]
    assert len(p) == 18  # nothing dropped


def test_unsupported_type_is_a_clear_500(start_runtime):
    rt = start_runtime("serial.opaque")
    resp = rt.invoke(envelope(1))
    assert resp.status == 500
    d = resp.json()["details"]
    assert d["type"] == "asya_runtime.SerializationError"
    assert "serial.Opaque" in d["message"]
    assert "TypeError" in d["mro"]


def test_nan_is_refused_not_sent_as_invalid_json(start_runtime):
    rt = start_runtime("serial.nan")
    resp = rt.invoke(envelope(1))
    assert resp.status == 500
    assert resp.json()["details"]["type"] == "asya_runtime.SerializationError"
    assert "not JSON compliant" in resp.json()["details"]["message"]


def test_circular_result_is_a_clear_500(start_runtime):
    rt = start_runtime("serial.circular")
    resp = rt.invoke(envelope(1))
    assert resp.status == 500
    assert resp.json()["details"]["type"] == "asya_runtime.SerializationError"
    assert rt.invoke(envelope(1)).status == 500  # and the runtime carries on
