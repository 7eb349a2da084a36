"""Results that are not plain JSON."""

import dataclasses
import datetime
import decimal
import enum
import uuid


@dataclasses.dataclass
class Point:
    x: int
    y: int
    when: datetime.date


class FakePydanticV2(object):
    """Duck-types a pydantic v2 model (pydantic is not a dependency)."""

    def __init__(self, **data):
        self._data = data

    def model_dump(self, mode="python"):
        assert mode == "json"
        return dict(self._data, dumped_by="v2")


class FakePydanticV1(object):
    __fields__ = {"name": None}

    def __init__(self, name):
        self.name = name

    def dict(self):
        return {"name": self.name, "dumped_by": "v1"}


class Color(enum.Enum):
    RED = "red"


class FakeArray(object):
    def tolist(self):
        return [[1, 2], [3, 4]]


class Opaque(object):
    pass


def everything(payload):
    return {
        "datetime": datetime.datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=datetime.timezone.utc),
        "naive": datetime.datetime(2024, 5, 17, 12, 30),
        "date": datetime.date(2024, 5, 17),
        "time": datetime.time(8, 15, 0),
        "dataclass": Point(1, 2, datetime.date(2020, 1, 2)),
        "pydantic_v2": FakePydanticV2(a=1),
        "pydantic_v1": FakePydanticV1("n"),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "decimal": decimal.Decimal("3.14159265358979323846"),
        "bytes": b"\x00\x01binary\xff",
        "bytearray": bytearray(b"ab"),
        "set": {3, 1, 2},
        "frozenset": frozenset(["b", "a"]),
        "mixed_set": {1, "a"},
        "tuple": (1, (2, 3)),
        "enum": Color.RED,
        "array": FakeArray(),
        "nested": [{"when": datetime.date(1999, 12, 31)}],
    }


def opaque(payload):
    return {"fine": 1, "bad": Opaque()}


def nan(payload):
    return {"value": float("nan")}


def circular(payload):
    a = []
    a.append(a)
    return a


def unicode_back(payload):
    return {"got": payload, "extra": u"\u00e9\u6f22\U0001F600"}
