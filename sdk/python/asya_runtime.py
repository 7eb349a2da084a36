#!/usr/bin/env python3
"""Asya stock Python runtime: serves a user handler to the Asya host over a Unix socket.

Single file, standard library only, Python 3.7+.  Started as ``python3 asya_runtime.py``;
configured entirely through ``ASYA_*`` environment variables (see ``sdk/python/README.md``).

Protocol (HTTP/1.1 over ``$ASYA_SOCKET_DIR/$ASYA_SOCKET_NAME``):

* ``GET /healthz``  -> ``200 {"status": "ready"}``
* ``POST /invoke`` with the envelope as JSON ->
  ``200 {"frames": [...]}`` | ``200 text/event-stream`` (generator handlers) | ``204`` (abort) |
  ``400 msg_parsing_error`` | ``500 processing_error``.

The request loop is written on raw sockets (one thread per host connection, keep-alive, no
pipelining needed): ``http.server`` costs a full parse and a new connection per request.
"""

import asyncio
import base64
import contextvars
import dataclasses
import datetime
import decimal
import enum
import importlib
import inspect
import json
import json.encoder
import json.scanner
import keyword
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
import traceback
import types
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

__version__ = "0.1.0"

LOG = logging.getLogger("asya.runtime")

#: A generator handler that yields ``{UPSTREAM_KEY: value}`` (exactly that one key) emits an
#: ``upstream`` event (progress / partial output) instead of a downstream frame.
UPSTREAM_KEY = "__asya_upstream__"
#: A payload-mode result (or yielded item) ``{PAUSE_KEY: metadata, "payload": p}`` (exactly
#: those two keys) is a frame with payload ``p`` and header ``x-asya-pause: metadata``: the
#: sidecar parks it and the task pauses until the gateway resumes it (see ``pause``).
PAUSE_KEY = "__asya_pause__"
PAUSE_HEADER = "x-asya-pause"

READY_FILE_NAME = "runtime-ready"
MAX_HEADER_BYTES = 64 * 1024
#: Open connections at most.  When all are taken, the connection that has waited longest
#: for its client (idle between requests, or stalled mid-request) is closed to admit the new
#: one; only when every connection is running a request is a new one refused (503).
MAX_CONNECTIONS = 256

EXIT_CONFIG = 2
EXIT_HANDLER = 3
EXIT_SOCKET = 4


def upstream(payload):
    # type: (Any) -> Dict[str, Any]
    """Wrap ``payload`` so that a generator handler's ``yield`` emits an ``upstream`` event."""
    return {UPSTREAM_KEY: payload}


def pause(payload, prompt=None, fields=None, timeout=None, **extra):
    # type: (Any, Optional[str], Any, Any, Any) -> Dict[str, Any]
    """Return (or yield) this to pause the task (human in the loop): the frame carrying
    ``payload`` is parked with ``x-asya-pause`` metadata ``{prompt, fields, timeout, ...}``
    (``timeout``: seconds or a duration such as ``"10m"``; past it the task fails with
    Timeout), and ``POST /tasks/{id}/resume {"input": {...}}`` merges the input into
    ``payload`` and sends it on to the next actor."""
    meta = dict(extra)  # type: Dict[str, Any]
    if prompt is not None:
        meta["prompt"] = prompt
    if fields is not None:
        meta["fields"] = fields
    if timeout is not None:
        meta["timeout"] = timeout
    return {PAUSE_KEY: meta, "payload": payload}


def _pause_marker(item):
    # type: (Any) -> bool
    return type(item) is dict and len(item) == 2 and PAUSE_KEY in item and "payload" in item


def _payload_frame(base, item):
    # type: (Dict[str, Any], Any) -> Dict[str, Any]
    """A payload-mode frame: ``base`` with ``item`` as payload (a pause marker sets the pause
    header)."""
    frame = dict(base)
    if _pause_marker(item):
        headers = dict(frame.get("headers") or {})
        headers[PAUSE_HEADER] = item[PAUSE_KEY]
        frame["headers"] = headers
        item = item["payload"]
    frame["payload"] = item
    return frame


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A configuration variable has an invalid value (fatal at start-up)."""

    def __init__(self, variable, message):
        # type: (str, str) -> None
        Exception.__init__(self, "%s %s" % (variable, message))
        self.variable = variable


class HandlerLoadError(Exception):
    """The handler named by ASYA_HANDLER cannot be loaded (fatal at start-up)."""


class RouteViolation(ValueError):
    """An envelope-mode handler changed ``route.prev``/``route.curr`` or broke the route."""


class SerializationError(TypeError):
    """A handler result cannot be serialised to JSON."""


# Errors raised by the runtime itself are reported under a stable, importable-looking name
# whether the file runs as ``__main__`` or is imported as ``asya_runtime``.
for _cls in (ConfigError, HandlerLoadError, RouteViolation, SerializationError):
    _cls.__module__ = "asya_runtime"


class _Shutdown(BaseException):
    """Raised in the main thread by the SIGTERM/SIGINT handler to stop accepting."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}


class Config(object):
    """Every setting of the runtime, read once from the environment."""

    def __init__(self, environ):
        # type: (Mapping[str, str]) -> None
        self.handler = _handler_path(environ.get("ASYA_HANDLER", ""))
        mode = environ.get("ASYA_HANDLER_MODE", "payload").strip().lower() or "payload"
        if mode not in ("payload", "envelope"):
            raise ConfigError(
                "ASYA_HANDLER_MODE", "=%r is invalid: expected 'payload' or 'envelope'" % mode
            )
        self.mode = mode
        self.socket_dir = environ.get("ASYA_SOCKET_DIR", "/var/run/asya") or "/var/run/asya"
        name = environ.get("ASYA_SOCKET_NAME", "asya-runtime.sock") or "asya-runtime.sock"
        if "/" in name or name in (".", ".."):
            raise ConfigError("ASYA_SOCKET_NAME", "=%r must be a plain file name" % name)
        self.socket_name = name
        self.socket_path = os.path.join(self.socket_dir, name)
        self.ready_path = os.path.join(self.socket_dir, READY_FILE_NAME)
        if len(os.fsencode(self.socket_path)) > 107:
            raise ConfigError(
                "ASYA_SOCKET_DIR",
                "=%r is too long: the socket path %r exceeds the 107-byte limit of Unix sockets"
                % (self.socket_dir, self.socket_path),
            )
        self.socket_chmod = _octal_mode(environ.get("ASYA_SOCKET_CHMOD", "0o666"))
        self.validate = _bool("ASYA_ENABLE_VALIDATION", environ.get("ASYA_ENABLE_VALIDATION", "true"))
        level = environ.get("ASYA_LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in _LEVELS:
            raise ConfigError(
                "ASYA_LOG_LEVEL",
                "=%r is invalid: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL" % level,
            )
        self.log_level = _LEVELS[level]
        self.chunk_size = _positive_int("ASYA_CHUNK_SIZE", environ.get("ASYA_CHUNK_SIZE", "65536"))
        self.max_body = _positive_int(
            "ASYA_MAX_BODY_BYTES", environ.get("ASYA_MAX_BODY_BYTES", str(64 * 1024 * 1024))
        )
        self.max_inflight_body = _positive_int(
            "ASYA_MAX_INFLIGHT_BODY_BYTES",
            environ.get("ASYA_MAX_INFLIGHT_BODY_BYTES", str(256 * 1024 * 1024)),
        )
        if self.max_inflight_body < self.max_body:
            raise ConfigError(
                "ASYA_MAX_INFLIGHT_BODY_BYTES",
                "is %d, below ASYA_MAX_BODY_BYTES=%d: raise it to at least the largest body"
                % (self.max_inflight_body, self.max_body),
            )
        self.shutdown_grace = _seconds(
            "ASYA_RUNTIME_SHUTDOWN_GRACE", environ.get("ASYA_RUNTIME_SHUTDOWN_GRACE", "30")
        )


def _handler_path(value):
    # type: (str) -> List[str]
    """Validate ASYA_HANDLER before anything is imported; return its dotted parts."""
    var = "ASYA_HANDLER"
    if not value:
        raise ConfigError(var, "is not set: expected module.function or module.Class.method")
    if value != value.strip():
        raise ConfigError(var, "=%r has leading or trailing whitespace" % value)
    if "/" in value or "\\" in value:
        raise ConfigError(var, "=%r looks like a file path: expected a dotted Python path" % value)
    if value.startswith("."):
        raise ConfigError(var, "=%r is a relative path: a leading dot is not allowed" % value)
    parts = value.split(".")
    if len(parts) < 2:
        raise ConfigError(
            var, "=%r has no module: expected module.function or module.Class.method" % value
        )
    for part in parts:
        if not part:
            raise ConfigError(var, "=%r has an empty component (consecutive or trailing dots)" % value)
        if not part.isidentifier():
            raise ConfigError(var, "=%r: component %r is not a Python identifier" % (value, part))
        if keyword.iskeyword(part):
            raise ConfigError(var, "=%r: component %r is a Python keyword" % (value, part))
        if part.startswith("__") and part.endswith("__"):
            raise ConfigError(var, "=%r: dunder component %r is not allowed" % (value, part))
    return parts


def _octal_mode(value):
    # type: (str) -> Optional[int]
    text = value.strip()
    if not text:
        return None
    digits = text[2:] if text[:2].lower() == "0o" else text
    if not digits or any(c not in "01234567" for c in digits):
        raise ConfigError("ASYA_SOCKET_CHMOD", "=%r is not an octal mode like 0o666 or 660" % value)
    mode = int(digits, 8)
    if mode > 0o7777:
        raise ConfigError("ASYA_SOCKET_CHMOD", "=%r is out of range (max 0o7777)" % value)
    return mode


def _bool(variable, value):
    # type: (str, str) -> bool
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(variable, "=%r is not a boolean (true/false, 1/0, yes/no, on/off)" % value)


def _positive_int(variable, value):
    # type: (str, str) -> int
    text = value.strip()
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError(variable, "=%r is not a positive integer" % value)
    return int(text)


def _seconds(variable, value):
    # type: (str, str) -> float
    text = value.strip().lower()
    if text.endswith("s"):
        text = text[:-1]
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise ConfigError(variable, "=%r is not a number of seconds" % value)
    return seconds


# --------------------------------------------------------------------------------------------
# Logging: every line names the envelope id and trace id of the request being served
# --------------------------------------------------------------------------------------------

#: The envelope being processed in this thread / task (None outside a request).  The filter
#: reads id and trace id only when a record is emitted: one ``set`` per request, no formatting.
_CURRENT = contextvars.ContextVar("asya_envelope", default=None)  # type: contextvars.ContextVar


class EnvelopeContextFilter(logging.Filter):
    """Adds ``envelope_id`` and ``trace_id`` to every record (``-`` outside a request)."""

    def filter(self, record):
        # type: (logging.LogRecord) -> bool
        env = _CURRENT.get()
        envelope_id = trace_id = "-"
        if type(env) is dict:
            value = env.get("id")
            if value is not None:
                envelope_id = value
            headers = env.get("headers")
            if type(headers) is dict:
                value = headers.get("trace_id")
                if value is not None:
                    trace_id = value
        record.envelope_id = envelope_id
        record.trace_id = trace_id
        return True


LOG_FORMAT = (
    "%(asctime)s %(levelname)s %(name)s envelope_id=%(envelope_id)s trace_id=%(trace_id)s "
    "%(message)s"
)


def setup_logging(level):
    # type: (int) -> None
    """Log to stderr through the root logger so handler logs get the same fields."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_asya", False):
            root.removeHandler(old)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(LOG_FORMAT))
    stream.addFilter(EnvelopeContextFilter())
    stream._asya = True  # type: ignore[attr-defined]
    root.addHandler(stream)
    root.setLevel(level)


def _fatal(code, message, exc=None):
    # type: (int, str, Optional[BaseException]) -> None
    """One line naming the problem at CRITICAL (traceback at DEBUG), then exit ``code``."""
    LOG.critical("fatal: %s", message)
    if exc is not None and LOG.isEnabledFor(logging.DEBUG):
        LOG.debug(
            "traceback:\n%s",
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        )
    logging.shutdown()
    sys.exit(code)


# --------------------------------------------------------------------------------------------
# JSON: results that are not plain JSON are converted, never dropped
# --------------------------------------------------------------------------------------------


def _json_default(obj):
    # type: (Any) -> Any
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (uuid.UUID, decimal.Decimal)):
        return str(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    dump = getattr(obj, "model_dump", None)  # pydantic v2
    if callable(dump) and not isinstance(obj, type):
        try:
            return dump(mode="json")
        except TypeError:
            return dump()
    legacy = getattr(obj, "dict", None)  # pydantic v1
    if callable(legacy) and hasattr(obj, "__fields__") and not isinstance(obj, type):
        return legacy()
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist) and not isinstance(obj, type):
        return tolist()
    cls = type(obj)
    raise SerializationError(
        "object of type %s is not JSON serialisable (supported beyond JSON: datetime, date, "
        "time, dataclass, pydantic model, UUID, Decimal, bytes, set, Enum, objects with "
        "tolist())" % _qualname(cls)
    )


_ENCODER = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=_json_default
)
_C_ENCODER = None
if getattr(json.encoder, "c_make_encoder", None) is not None:
    # What JSONEncoder.encode builds on every call, built once.  No circular-reference
    # markers: a cycle ends in RecursionError, reported as SerializationError.
    _C_ENCODER = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _json_default, json.encoder.encode_basestring_ascii, None, ":", ",",
        False, False, False,
    )


def dumps(obj):
    # type: (Any) -> bytes
    """Compact ASCII JSON (one line, safe for SSE ``data:``); clear error when impossible."""
    try:
        if _C_ENCODER is not None:
            return "".join(_C_ENCODER(obj, 0)).encode("ascii")
        return _ENCODER.encode(obj).encode("ascii")
    except SerializationError:
        raise
    except RecursionError as exc:
        raise SerializationError(
            "handler result is nested too deeply to serialise (more than about %d levels of "
            "lists/objects, or a circular structure)" % sys.getrecursionlimit()
        ) from exc
    except (TypeError, ValueError) as exc:
        raise SerializationError("handler result is not JSON serialisable: %s" % exc) from exc


# --------------------------------------------------------------------------------------------
# Handler loading
# --------------------------------------------------------------------------------------------


def _qualname(cls):
    # type: (type) -> str
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", cls.__name__)
    if module in (None, "builtins"):
        return name
    return "%s.%s" % (module, name)


def _import_longest(parts, path):
    # type: (List[str], str) -> Tuple[types.ModuleType, List[str]]
    """Import the longest importable module prefix of ``parts``; return it and the rest."""
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        try:
            return importlib.import_module(name), parts[i:]
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing == name or name.startswith(missing + "."):
                continue  # this prefix is not a module: try a shorter one
            raise HandlerLoadError(
                "ASYA_HANDLER=%r: importing module %r failed: %s: %s"
                % (path, name, type(exc).__name__, exc)
            ) from exc
        except Exception as exc:  # any error raised while executing the module
            raise HandlerLoadError(
                "ASYA_HANDLER=%r: importing module %r failed: %s: %s"
                % (path, name, _qualname(type(exc)), exc)
            ) from exc
    raise HandlerLoadError(
        "ASYA_HANDLER=%r: no module named %r (is it on PYTHONPATH?)" % (path, parts[0])
    )


def _instantiate(cls, path):
    # type: (type, str) -> Any
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        for param in sig.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if param.default is param.empty:
                raise HandlerLoadError(
                    "ASYA_HANDLER=%r: %s.__init__ parameter %r has no default value; the "
                    "runtime instantiates the class without arguments, so every __init__ "
                    "parameter needs a default" % (path, cls.__name__, param.name)
                )
    try:
        return cls()
    except Exception as exc:
        raise HandlerLoadError(
            "ASYA_HANDLER=%r: %s() raised %s: %s" % (path, cls.__name__, _qualname(type(exc)), exc)
        ) from exc


def load_handler(parts):
    # type: (List[str]) -> Callable[[Any], Any]
    """Resolve ``module.function`` or ``module.Class.method`` (class instantiated once)."""
    path = ".".join(parts)
    # `python3 /path/asya_runtime.py` puts the runtime's directory on sys.path, not the
    # working directory: add it last (never shadowing an installed module), as `python3 -m`
    # and `python3 -c` would, so a handler next to where the runtime is started imports.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    module, attrs = _import_longest(parts, path)
    if len(attrs) > 2:
        raise HandlerLoadError(
            "ASYA_HANDLER=%r: expected module.function or module.Class.method, but after "
            "module %r there are %d names (%s)"
            % (path, module.__name__, len(attrs), ".".join(attrs))
        )
    try:
        owner = getattr(module, attrs[0])
    except AttributeError:
        raise HandlerLoadError(
            "ASYA_HANDLER=%r: module %r has no attribute %r" % (path, module.__name__, attrs[0])
        ) from None
    if len(attrs) == 1:
        target = owner
        if isinstance(target, type):
            raise HandlerLoadError(
                "ASYA_HANDLER=%r names a class: use module.Class.method" % path
            )
    else:
        instance = _instantiate(owner, path) if isinstance(owner, type) else owner
        try:
            target = getattr(instance, attrs[1])
        except AttributeError:
            raise HandlerLoadError(
                "ASYA_HANDLER=%r: %r has no attribute %r" % (path, attrs[0], attrs[1])
            ) from None
    if not callable(target):
        raise HandlerLoadError("ASYA_HANDLER=%r is not callable" % path)
    return target


def handler_kind(func):
    # type: (Callable[..., Any]) -> str
    if inspect.isasyncgenfunction(func):
        return "async generator"
    if inspect.iscoroutinefunction(func):
        return "async"
    if inspect.isgeneratorfunction(func):
        return "generator"
    return "sync"


# --------------------------------------------------------------------------------------------
# Envelopes
# --------------------------------------------------------------------------------------------


def _str_list(value):
    # type: (Any) -> bool
    if type(value) is not list:
        return False
    for item in value:
        if type(item) is not str:
            return False
    return True


def _make_decoder():
    # type: () -> Callable[[Any], Any]
    """A JSON decoder for UTF-8 bytes; one per connection thread (the C scanner's memo is
    per instance).  Same results and errors as ``json.loads``, minus two regex passes."""
    scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[attr-defined]

    def decode(body):
        # type: (Any) -> Any
        text = body.decode("utf-8")
        try:
            value, end = scan(text, 0)
        except StopIteration:  # leading whitespace, or not JSON: let json say why
            return json.loads(text)
        if end != len(text):  # trailing whitespace or extra data
            return json.loads(text)
        return value

    return decode


_decode = _make_decoder()  # for callers outside a connection thread (tests, tools)


def parse_envelope(body, validate, decode=None):
    # type: (Any, bool, Optional[Callable[[Any], Any]]) -> Dict[str, Any]
    """Decode and check a request body; raise ``ValueError`` with a clear message."""
    if not body:
        raise ValueError("empty body: expected an envelope JSON object")
    try:
        env = (decode or _decode)(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError("body is not valid JSON: %s" % exc) from None
    except RecursionError:
        # The C scanner recurses once per level and stops at the interpreter's recursion
        # limit; before this was caught the connection died without an answer.
        raise ValueError(
            "body is nested too deeply: JSON arrays and objects may nest at most about %d "
            "levels (Python's recursion limit)" % sys.getrecursionlimit()
        ) from None
    if type(env) is not dict:
        raise ValueError("envelope must be a JSON object, got %s" % _json_type(env))
    route = env.get("route")
    if type(route) is not dict:
        raise ValueError(
            "envelope.route must be an object {prev, curr, next}, got %s" % _json_type(route)
        )
    if type(route.get("curr")) is not str:
        raise ValueError("envelope.route.curr must be a string")
    if not _str_list(route.get("prev", [])):
        raise ValueError("envelope.route.prev must be a list of strings")
    if not _str_list(route.get("next", [])):
        raise ValueError("envelope.route.next must be a list of strings")
    if validate:
        ident = env.get("id")
        if type(ident) is not str or not ident:
            raise ValueError("envelope.id must be a non-empty string")
        headers = env.get("headers")
        if headers is not None and type(headers) is not dict:
            raise ValueError("envelope.headers must be an object")
        status = env.get("status")
        if status is not None and type(status) is not dict:
            raise ValueError("envelope.status must be an object")
    return env


def _json_type(value):
    # type: (Any) -> str
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def shift_route(route):
    # type: (Dict[str, Any]) -> Dict[str, Any]
    """``prev + [curr]``, ``next[0]`` (``""`` when empty), ``next[1:]``."""
    nxt = route.get("next") or []
    prev = list(route.get("prev") or [])
    prev.append(route["curr"])
    if nxt:
        return {"prev": prev, "curr": nxt[0], "next": nxt[1:]}
    return {"prev": prev, "curr": "", "next": []}


# --------------------------------------------------------------------------------------------
# Handler ABI: commands yielded by generator handlers (upstream Asya's protocol)
# --------------------------------------------------------------------------------------------

#: A yielded tuple whose first element is one of these is a command, not a frame.
ABI_VERBS = frozenset(["GET", "SET", "DEL", "FLY"])
#: Paths a handler may SET or DEL (and everything under them).
_WRITABLE_ROOTS = (("route", "next"), ("headers",), ("status",))
_PATH_MAX = 1024


class _Slice(object):
    """A ``[a:b]`` path segment (SET only)."""

    __slots__ = ("start", "stop")

    def __init__(self, start, stop):
        # type: (Optional[int], Optional[int]) -> None
        self.start = start
        self.stop = stop


def fly_text(text, artifact_id="stream-0", last=False):
    # type: (str, str, bool) -> Dict[str, Any]
    """``yield "FLY", fly_text("token")``: an A2A artifact update (appending text)."""
    return {
        "artifact_update": {
            "artifact": {"artifact_id": artifact_id, "parts": [{"text": text}]},
            "append": True,
            "last_chunk": bool(last),
        }
    }


def fly_status(message):
    # type: (str) -> Dict[str, Any]
    """``yield "FLY", fly_status("Thinking...")``: an A2A ``WORKING`` status update."""
    return {
        "status_update": {
            "status": {
                "state": "WORKING",
                "message": {"role": "agent", "parts": [{"text": message}]},
            }
        }
    }


def parse_abi_path(path):
    # type: (Any) -> List[Any]
    """``.route.next[0]`` -> ``["route", "next", 0]``.  Segments: ``.key``, ``["key"]`` (or
    single quotes), ``[int]`` (negative allowed), ``[a:b]`` (either bound optional).  The
    leading ``.`` is required; ``.`` alone is the root."""
    if type(path) is not str:
        raise TypeError("ABI path must be a string like '.route.next', got %s" % _qualname(type(path)))
    if not path.startswith(".") or len(path) > _PATH_MAX:
        raise ValueError("ABI path %r must start with '.' (like '.headers.trace_id')" % path[:80])
    segments = []  # type: List[Any]
    i, n = 0, len(path)
    if path == ".":
        return segments
    while i < n:
        ch = path[i]
        if ch == ".":
            j = i + 1
            while j < n and path[j] not in ".[":
                j += 1
            key = path[i + 1:j]
            if not key:
                raise ValueError("ABI path %r: empty key at offset %d" % (path, i))
            segments.append(key)
            i = j
        elif ch == "[":
            end = path.find("]", i)
            if path[i + 1:i + 2] in ("'", '"'):
                quote = path[i + 1]
                close = path.find(quote, i + 2)
                if close < 0 or path[close + 1:close + 2] != "]":
                    raise ValueError("ABI path %r: unterminated [%s...%s] at offset %d"
                                     % (path, quote, quote, i))
                segments.append(path[i + 2:close])
                i = close + 2
                continue
            if end < 0:
                raise ValueError("ABI path %r: missing ']' after offset %d" % (path, i))
            inner = path[i + 1:end].strip()
            try:
                if ":" in inner:
                    a, _, b = inner.partition(":")
                    segments.append(_Slice(int(a) if a.strip() else None,
                                           int(b) if b.strip() else None))
                else:
                    segments.append(int(inner))
            except ValueError:
                raise ValueError("ABI path %r: [%s] is neither an index, a slice nor a quoted key"
                                 % (path, inner))
            i = end + 1
        else:
            raise ValueError("ABI path %r: expected '.' or '[' at offset %d" % (path, i))
    return segments


def _path_text(segments):
    # type: (List[Any]) -> str
    out = []
    for seg in segments:
        if isinstance(seg, _Slice):
            out.append("[%s:%s]" % ("" if seg.start is None else seg.start,
                                    "" if seg.stop is None else seg.stop))
        elif type(seg) is int:
            out.append("[%d]" % seg)
        else:
            out.append("." + seg)
    return "".join(out) or "."


class AbiState(object):
    """The metadata a payload-mode generator handler sees and edits: ``id``, ``parent_id``,
    ``route`` and the other top-level fields except ``payload``.  Frames yielded after a SET
    or DEL are built from the edited ``route.next``, ``headers`` and ``status``."""

    __slots__ = ("meta", "owned")

    def __init__(self, env):
        # type: (Dict[str, Any]) -> None
        meta = {}  # type: Dict[str, Any]
        for key, value in env.items():
            if key != "payload":
                meta[key] = value
        route = env["route"]
        meta["route"] = {
            "prev": list(route.get("prev") or []),
            "curr": route["curr"],
            "next": list(route.get("next") or []),
        }
        self.meta = meta
        self.owned = set()  # type: Set[str]  # headers/status copied on first write (_own)

    def base_frame(self):
        # type: () -> Dict[str, Any]
        meta = self.meta
        frame = {"route": shift_route(meta["route"])}  # type: Dict[str, Any]
        if "headers" in meta:
            frame["headers"] = meta["headers"]
        if "status" in meta:
            frame["status"] = meta["status"]
        return frame

    def get(self, path):
        # type: (Any) -> Any
        """The value at ``path`` (a deep copy), ``None`` when any part of it is missing."""
        segments = parse_abi_path(path)
        node = self.meta  # type: Any
        for seg in segments:
            if isinstance(seg, _Slice):
                raise ValueError("ABI path %r: slices are for SET only" % path)
            if type(seg) is int:
                if type(node) is not list or not -len(node) <= seg < len(node):
                    return None
            elif type(node) is not dict or seg not in node:
                return None
            node = node[seg]
        return _deepcopy_json(node)

    def _check_writable(self, verb, segments, path):
        # type: (str, List[Any], str) -> None
        for root in _WRITABLE_ROOTS:
            if tuple(segments[:len(root)]) == root:
                if verb == "DEL" and len(segments) > len(root) and isinstance(segments[-1], _Slice):
                    raise ValueError("ABI path %r: slices are for SET only" % path)
                return
        raise PermissionError(
            "%s %s: read-only; handlers may SET/DEL only under .route.next, .headers and "
            ".status" % (verb, path)
        )

    def _own(self, segments):
        # type: (List[Any]) -> None
        """Copy the subtree about to be edited so the input envelope is never mutated."""
        key = segments[0]
        if key in ("headers", "status") and key not in self.owned:
            current = self.meta.get(key)
            self.meta[key] = _deepcopy_json(current) if type(current) is dict else {}
            self.owned.add(key)

    def set(self, path, value):
        # type: (Any, Any) -> None
        segments = parse_abi_path(path)
        self._check_writable("SET", segments, path)
        value = _deepcopy_json(value)
        route = self.meta["route"]
        if segments == ["route", "next"]:
            route["next"] = _route_next(value, path)
            return
        if segments[0] == "route":  # an edit inside route.next: all or nothing
            saved = route["next"]
            route["next"] = list(saved)
            try:
                self._set_in(segments, path, value)
                route["next"] = _route_next(route["next"], path)
            except Exception:
                route["next"] = saved
                raise
            return
        key = segments[0]
        had, saved = key in self.meta, _deepcopy_json(self.meta.get(key))
        owned = key in self.owned
        try:
            self._set_in(segments, path, value)
        except Exception:  # all or nothing: no half-created objects after a failed SET
            if had:
                self.meta[key] = saved
            else:
                self.meta.pop(key, None)
            if owned or had:
                self.owned.add(key)  # `saved` is a private copy
            raise

    def _set_in(self, segments, path, value):
        # type: (List[Any], str, Any) -> None
        if len(segments) == 1:  # .headers / .status as a whole
            if type(value) is not dict:
                raise TypeError("SET %s: the value must be an object, got %s"
                                % (path, _qualname(type(value))))
            self.meta[segments[0]] = value
            self.owned.add(segments[0])
            return
        self._own(segments)
        parent = self._walk(segments, path, create=True)
        last = segments[-1]
        if isinstance(last, _Slice):
            if type(parent) is not list:
                raise TypeError("SET %s: a slice needs a list, found %s"
                                % (path, _json_type(parent)))
            if not isinstance(value, list):
                raise TypeError("SET %s: a slice takes a list, got %s"
                                % (path, _qualname(type(value))))
            parent[last.start:last.stop] = value
        elif type(last) is int:
            if type(parent) is not list:
                raise TypeError("SET %s: an index needs a list, found %s"
                                % (path, _json_type(parent)))
            if not -len(parent) <= last < len(parent):
                raise IndexError("SET %s: index %d out of range (length %d)" % (path, last, len(parent)))
            parent[last] = value
        else:
            if type(parent) is not dict:
                raise TypeError("SET %s: a key needs an object, found %s"
                                % (path, _json_type(parent)))
            parent[last] = value

    def delete(self, path):
        # type: (Any) -> None
        """Remove ``path``; a missing key is not an error.  ``DEL .route.next`` empties the
        rest of the route (frames then end it); ``DEL .headers`` drops all headers."""
        segments = parse_abi_path(path)
        self._check_writable("DEL", segments, path)
        if segments == ["route", "next"]:
            self.meta["route"]["next"] = []
            return
        if len(segments) == 1:
            self.meta.pop(segments[0], None)
            return
        self._own(segments)
        parent = self._walk(segments, path, create=False)
        last = segments[-1]
        if type(last) is int:
            if type(parent) is list and -len(parent) <= last < len(parent):
                del parent[last]
        elif type(parent) is dict:
            parent.pop(last, None)

    def _walk(self, segments, path, create):
        # type: (List[Any], str, bool) -> Any
        """The container holding ``segments[-1]``; SET creates missing objects on the way."""
        node = self.meta  # type: Any
        for seg in segments[:-1]:
            if isinstance(seg, _Slice):
                raise ValueError("ABI path %r: a slice must be the last segment" % path)
            if type(seg) is int:
                if type(node) is not list or not -len(node) <= seg < len(node):
                    if not create:
                        return None
                    if type(node) is not list:
                        raise TypeError("%s: an index needs a list, found %s"
                                        % (path, _json_type(node)))
                    raise IndexError("%s: index %d out of range (length %d)" % (path, seg, len(node)))
                node = node[seg]
                continue
            if type(node) is not dict:
                if not create:
                    return None
                raise TypeError("%s: key %r needs an object, found %s" % (path, seg, _json_type(node)))
            if seg not in node or node[seg] is None:
                if not create:
                    return None
                node[seg] = {}
            node = node[seg]
        return node


def _route_next(value, path):
    # type: (Any, str) -> List[str]
    if not _str_list(value):
        raise TypeError("SET %s: route.next must be a list of actor names (strings), got %r"
                        % (path, value))
    return list(value)


def _deepcopy_json(value):
    # type: (Any) -> Any
    """Deep copy of JSON-like data (dicts, lists); other objects are shared."""
    t = type(value)
    if t is dict:
        return {k: _deepcopy_json(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [_deepcopy_json(v) for v in value]
    return value


def abi_command(item):
    # type: (Any) -> Optional[str]
    """The verb when ``item`` is an ABI command (a tuple starting with a verb), else None."""
    if type(item) is tuple and item and type(item[0]) is str and item[0] in ABI_VERBS:
        return item[0]
    return None


_ABI_ARITY = {"GET": 2, "SET": 3, "DEL": 2, "FLY": 2}
_ABI_USAGE = {
    "GET": 'value = yield "GET", ".path"',
    "SET": 'yield "SET", ".path", value',
    "DEL": 'yield "DEL", ".path"',
    "FLY": 'yield "FLY", data',
}


class Invoker(object):
    """Turns one envelope into frames, according to the handler mode."""

    def __init__(self, func, envelope_mode, validate):
        # type: (Callable[[Any], Any], bool, bool) -> None
        self.func = func
        self.envelope_mode = envelope_mode
        self.validate = validate
        self._loop = None  # type: Optional[asyncio.AbstractEventLoop]
        self._loop_lock = threading.Lock()

    # -- async support: one shared event loop in a daemon thread ------------------------------

    def loop(self):
        # type: () -> asyncio.AbstractEventLoop
        loop = self._loop
        if loop is None:
            with self._loop_lock:
                loop = self._loop
                if loop is None:
                    loop = asyncio.new_event_loop()
                    thread = threading.Thread(
                        target=_run_loop, args=(loop,), name="asya-asyncio", daemon=True
                    )
                    thread.start()
                    self._loop = loop
        return loop

    def run_async(self, awaitable, env):
        # type: (Any, Dict[str, Any]) -> Any
        return asyncio.run_coroutine_threadsafe(_in_context(awaitable, env), self.loop()).result()

    # -- frames ------------------------------------------------------------------------------

    def call(self, env):
        # type: (Dict[str, Any]) -> Tuple[Any, Any]
        """Call the handler; returns ``(result, snapshot)`` where snapshot is the input route's
        (prev, curr) for envelope-mode validation."""
        if self.envelope_mode:
            route = env["route"]
            snapshot = (list(route.get("prev") or []), route["curr"])
            result = self.func(env)
        else:
            snapshot = None
            result = self.func(env.get("payload"))
        if type(result) not in _PLAIN_TYPES and (
            isinstance(result, _AWAITABLE_TYPES) or inspect.isawaitable(result)
        ):
            result = self.run_async(result, env)
        return result, snapshot

    def frames(self, env, result, snapshot):
        # type: (Dict[str, Any], Any, Any) -> List[Dict[str, Any]]
        if self.envelope_mode:
            items = result if type(result) is list else [result]
            return [self.envelope_frame(item, snapshot) for item in items]
        base = self.base_frame(env)
        if type(result) is not list:
            return [_payload_frame(base, result)]
        return [_payload_frame(base, item) for item in result]

    def base_frame(self, env):
        # type: (Dict[str, Any]) -> Dict[str, Any]
        frame = {"route": shift_route(env["route"])}  # type: Dict[str, Any]
        if "headers" in env:
            frame["headers"] = env["headers"]
        if "status" in env:
            frame["status"] = env["status"]
        return frame

    def envelope_frame(self, item, snapshot):
        # type: (Any, Tuple[List[str], str]) -> Dict[str, Any]
        if type(item) is not dict:
            raise TypeError(
                "envelope mode: the handler must return an envelope object, a list of them or "
                "None; got %s" % _qualname(type(item))
            )
        route = item.get("route")
        if type(route) is not dict:
            raise RouteViolation("envelope mode: the returned envelope has no route object")
        prev, curr, nxt = route.get("prev", []), route.get("curr"), route.get("next", [])
        if not _str_list(prev) or type(curr) is not str or not _str_list(nxt):
            raise RouteViolation(
                "envelope mode: the returned route must be {prev: [string], curr: string, "
                "next: [string]}, got %r" % (route,)
            )
        if self.validate:
            if prev != snapshot[0]:
                raise RouteViolation(
                    "envelope mode: route.prev is history and must not change: was %r, "
                    "handler returned %r" % (snapshot[0], prev)
                )
            if curr != snapshot[1]:
                raise RouteViolation(
                    "envelope mode: route.curr must not change (edit route.next instead): "
                    "was %r, handler returned %r" % (snapshot[1], curr)
                )
        frame = dict(item)
        frame["route"] = shift_route(route)
        return frame

    def command(self, state, verb, item):
        # type: (AbiState, str, Tuple[Any, ...]) -> Tuple[Any, Optional[bytes]]
        """Run one ABI command; returns (value sent back into the generator, SSE bytes)."""
        if len(item) != _ABI_ARITY[verb]:
            raise TypeError("ABI %s takes %d element(s) after the verb, got %d: use %s"
                            % (verb, _ABI_ARITY[verb] - 1, len(item) - 1, _ABI_USAGE[verb]))
        if verb == "GET":
            return state.get(item[1]), None
        if verb == "FLY":
            return None, b"event: upstream\ndata: " + dumps({"payload": item[1]}) + b"\n\n"
        if self.envelope_mode:
            raise TypeError("envelope mode: %s %s is not available, the handler edits the "
                            "envelope it yields instead" % (verb, item[1]))
        if verb == "SET":
            state.set(item[1], item[2])
        else:
            state.delete(item[1])
        return None, None

    def stream_event(self, env, item, snapshot, base):
        # type: (Dict[str, Any], Any, Any, Optional[Dict[str, Any]]) -> Optional[bytes]
        """SSE bytes for one yielded item (None for a yielded None, which is skipped)."""
        if type(item) is dict and len(item) == 1 and UPSTREAM_KEY in item:
            return b"event: upstream\ndata: " + dumps({"payload": item[UPSTREAM_KEY]}) + b"\n\n"
        if item is None:
            return None
        if self.envelope_mode:
            frame = self.envelope_frame(item, snapshot)
        else:
            frame = _payload_frame(base, item)  # type: ignore[arg-type]
        return b"event: downstream\ndata: " + dumps(frame) + b"\n\n"


def _run_loop(loop):
    # type: (asyncio.AbstractEventLoop) -> None
    asyncio.set_event_loop(loop)
    loop.run_forever()


async def _in_context(awaitable, env):
    # type: (Any, Dict[str, Any]) -> Any
    _CURRENT.set(env)  # the task runs in its own copy of the context
    return await awaitable


_END = object()


async def _asend(agen, value, exc, env):
    # type: (Any, Any, Optional[BaseException], Dict[str, Any]) -> Any
    _CURRENT.set(env)
    try:
        if exc is not None:
            return await agen.athrow(exc)
        return await agen.asend(value)
    except StopAsyncIteration:
        return _END


_AWAITABLE_TYPES = (types.CoroutineType, asyncio.Future)
_PLAIN_TYPES = frozenset([dict, list, str, int, float, bool, type(None), tuple])
_STREAM_TYPES = (types.GeneratorType, types.AsyncGeneratorType)


def error_details(exc):
    # type: (BaseException) -> Dict[str, Any]
    cls = type(exc)
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails still gets reported
        message = "<unprintable %s>" % cls.__name__
    return {
        "message": message,
        "type": _qualname(cls),
        "mro": [_qualname(c) for c in cls.__mro__],
        "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
    }


def processing_error_body(exc):
    # type: (BaseException) -> bytes
    body = {"error": "processing_error", "details": error_details(exc)}
    try:
        return dumps(body)
    except SerializationError:  # a message that is not str-able JSON: keep the rest
        body["details"]["message"] = repr(exc)
        return dumps(body)


def parsing_error_body(message):
    # type: (str) -> bytes
    return dumps({"error": "msg_parsing_error", "details": {"message": message}})


# --------------------------------------------------------------------------------------------
# HTTP over the Unix socket
# --------------------------------------------------------------------------------------------

_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    404: b"Not Found",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
_STATUS_LINES = dict((code, b"HTTP/1.1 %d %s\r\n" % (code, reason)) for code, reason in _REASONS.items())
_JSON_HEAD = b"Content-Type: application/json\r\nContent-Length: "
_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
_OK_TEMPLATE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"X-Request-Id: %s\r\n\r\n%s"
)
_HEALTH_BODY = b'{"status":"ready"}'
_DONE_EVENT = b"event: done\ndata: {}\n\n"


def _response(status, body, request_id, close, keep_alive_10=False):
    # type: (int, Optional[bytes], Optional[bytes], bool, bool) -> bytes
    """A whole response (status line, headers, body) as one buffer for one ``sendall``."""
    parts = [_STATUS_LINES[status]]
    if body is not None:
        parts.append(_JSON_HEAD)
        parts.append(b"%d\r\n" % len(body))
    if request_id is not None:
        parts.append(b"X-Request-Id: ")
        parts.append(request_id)
        parts.append(b"\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    elif keep_alive_10:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if body is not None:
        parts.append(body)
    return b"".join(parts)


class _Connection(object):
    """Per-connection state shared with the accept loop and the shutdown drain.

    ``busy``: serving /invoke (the drain waits for it).  ``waiting_since``: monotonic time
    since which the connection waits for its client (idle between requests, or reading a
    request), 0.0 while the runtime works on a request; the longest-waiting connection is
    closed first when connections or body memory run short.  ``reserved``: body bytes of the
    current request counted against ASYA_MAX_INFLIGHT_BODY_BYTES.
    """

    __slots__ = ("busy", "sock", "waiting_since", "reserved")

    def __init__(self, sock):
        # type: (socket.socket) -> None
        self.busy = False
        self.sock = sock
        self.waiting_since = time.monotonic()
        self.reserved = 0


class Server(object):
    """Accepts host connections and serves each one in its own thread."""

    def __init__(self, config, invoker):
        # type: (Config, Invoker) -> None
        self.config = config
        self.invoker = invoker
        self.listener = None  # type: Optional[socket.socket]
        self.socket_ino = None  # type: Optional[int]
        self.draining = False
        self.connections = set()  # type: Set[_Connection]
        self.lock = threading.Lock()
        self.debug = LOG.isEnabledFor(logging.DEBUG)
        #: Body bytes received and not yet released, over every connection (under ``lock``).
        self.body_bytes = 0
        self.evicted = 0  # connections closed to make room, since the last warning
        self.evict_warned = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def bind(self):
        # type: () -> None
        cfg = self.config
        os.makedirs(cfg.socket_dir, exist_ok=True)
        try:
            st = os.lstat(cfg.socket_path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(
                    "%s exists and is not a socket; refusing to remove it" % cfg.socket_path
                )
            os.unlink(cfg.socket_path)  # stale socket of a previous run
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(cfg.socket_path)
        self.socket_ino = os.stat(cfg.socket_path).st_ino
        if cfg.socket_chmod is not None:
            os.chmod(cfg.socket_path, cfg.socket_chmod)
        listener.listen(128)
        self.listener = listener

    def write_ready(self):
        # type: () -> None
        tmp = self.config.ready_path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("%d\n" % os.getpid())
        os.replace(tmp, self.config.ready_path)

    def remove_files(self):
        # type: () -> None
        cfg = self.config
        _unlink_quietly(cfg.ready_path)
        try:
            if os.stat(cfg.socket_path).st_ino == self.socket_ino:  # still ours
                os.unlink(cfg.socket_path)
        except OSError:
            pass

    def serve_forever(self):
        # type: () -> None
        listener = self.listener
        assert listener is not None
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:  # e.g. EMFILE: keep serving the connections we have
                LOG.error("accept failed: %s", exc)
                time.sleep(0.1)
                continue
            state = _Connection(conn)
            with self.lock:
                if len(self.connections) >= MAX_CONNECTIONS:
                    waiting = [c for c in self.connections if c.waiting_since]
                    if waiting:
                        self._evict(min(waiting, key=_waiting_since))
                too_many = len(self.connections) >= MAX_CONNECTIONS
                if not too_many:
                    self.connections.add(state)
            if too_many:
                LOG.warning(
                    "refusing a connection: all %d connections are running requests",
                    MAX_CONNECTIONS,
                )
                message = "too many connections: all %d are running requests" % MAX_CONNECTIONS
                body = dumps({"error": "unavailable", "details": {"message": message}})
                _send_quietly(conn, _response(503, body, None, True))
                conn.close()
                continue
            thread = threading.Thread(
                target=self.serve_connection, args=(conn, state), name="asya-conn", daemon=True
            )
            thread.start()

    def _evict(self, victim):
        # type: (_Connection) -> None
        """Close a connection that waits for its client, to make room (``lock`` held).  Its
        body bytes are released at once; its thread sees EOF and ends."""
        self.connections.discard(victim)
        victim.waiting_since = 0.0
        self.body_bytes -= victim.reserved
        victim.reserved = 0
        try:
            victim.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.evicted += 1
        now = time.monotonic()
        if now - self.evict_warned >= 10.0:  # under a flood: one line per 10 s, not per eviction
            LOG.warning(
                "closed %d waiting connection(s) to make room (at most %d connections, "
                "ASYA_MAX_INFLIGHT_BODY_BYTES=%d); a local client is opening many connections "
                "or sending bodies slowly",
                self.evicted,
                MAX_CONNECTIONS,
                self.config.max_inflight_body,
            )
            self.evicted = 0
            self.evict_warned = now

    def reserve(self, state, n):
        # type: (_Connection, int) -> bool
        """Count ``n`` more body bytes of ``state``'s request against
        ASYA_MAX_INFLIGHT_BODY_BYTES; to make room, close connections whose body has been
        arriving for longer (oldest first).  False when there is no room."""
        limit = self.config.max_inflight_body
        with self.lock:
            if self.body_bytes + n > limit:
                since = state.waiting_since
                older = sorted(
                    (
                        c for c in self.connections
                        if c.reserved and c.waiting_since and c.waiting_since < since
                    ),
                    key=_waiting_since,
                )
                for victim in older:
                    if self.body_bytes + n <= limit:
                        break
                    self._evict(victim)
                if self.body_bytes + n > limit:
                    return False
            self.body_bytes += n
            state.reserved += n
            return True

    def release(self, state):
        # type: (_Connection) -> None
        if state.reserved:
            with self.lock:
                self.body_bytes -= state.reserved
                state.reserved = 0

    def drain(self, grace, force):
        # type: (float, threading.Event) -> int
        """Wait (bounded) for in-flight requests; returns how many were still running."""
        self.draining = True
        deadline = time.monotonic() + grace
        while True:
            with self.lock:
                busy = sum(1 for c in self.connections if c.busy)
            if not busy or time.monotonic() >= deadline or force.is_set():
                return busy
            time.sleep(0.02)

    # -- one connection ----------------------------------------------------------------------

    def serve_connection(self, conn, state):
        # type: (socket.socket, _Connection) -> None
        try:
            self._serve(conn, state)
        except (ConnectionError, OSError) as exc:
            if self.debug:
                LOG.debug("connection closed: %s", exc)
        except Exception:  # a bug in the runtime: never kill the process for one connection
            LOG.exception("connection failed")
        finally:
            with self.lock:
                self.connections.discard(state)
                self.body_bytes -= state.reserved
                state.reserved = 0
            conn.close()

    def _serve(self, conn, state):
        # type: (socket.socket, _Connection) -> None
        """The request loop of one connection: lean on purpose, this is the hot path."""
        recv = conn.recv
        sendall = conn.sendall
        chunk = self.config.chunk_size
        max_body = self.config.max_body
        decode = _make_decoder()
        monotonic = time.monotonic
        buf = b""
        while True:
            state.waiting_since = monotonic()
            # ---- request line and headers
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    sendall(_response(431, parsing_error_body("request headers too large"), None, True))
                    return
                data = recv(chunk)
                if not data:
                    return  # the host closed the connection (normal between requests)
                start = len(buf) - 3 if len(buf) > 3 else 0
                buf += data
                end = buf.find(b"\r\n\r\n", start)
            # Header names are matched in a lower-cased copy; values are sliced from ``buf`` at
            # the same offsets (X-Request-Id is echoed byte for byte).  Every line of ``low``,
            # including the last, ends with CRLF.
            low = buf[: end + 2].lower()
            line_end = low.find(b"\r\n")
            request_line = buf[:line_end].split(b" ")
            if len(request_line) != 3:
                sendall(_response(400, parsing_error_body("malformed request line"), None, True))
                return
            method, target, version = request_line
            request_id = None  # type: Optional[bytes]
            i = low.find(b"\r\nx-request-id:", line_end)
            if i >= 0:
                request_id = buf[i + 15 : low.find(b"\r\n", i + 2)].strip()
            if version == b"HTTP/1.1":
                http11 = True
            elif version == b"HTTP/1.0":
                http11 = False
            else:
                sendall(_response(400, parsing_error_body("unsupported HTTP version"), request_id, True))
                return
            length = -1
            i = low.find(b"\r\ncontent-length:", line_end)
            if i >= 0:
                value = buf[i + 17 : low.find(b"\r\n", i + 2)].strip()
                length = int(value) if value.isdigit() else -2
                if low.find(b"\r\ncontent-length:", i + 2) >= 0:
                    length = -2  # several Content-Length headers: ambiguous framing
            if length == -2 or b"\r\ntransfer-encoding:" in low:
                message = (
                    "invalid Content-Length" if length == -2
                    else "Transfer-Encoding is not supported: send a Content-Length"
                )
                sendall(_response(400, parsing_error_body(message), request_id, True))
                return
            keep_alive_10 = False
            i = low.find(b"\r\nconnection:", line_end)
            if i >= 0:
                connection = low[i + 13 : low.find(b"\r\n", i + 2)]
                if http11:
                    close = b"close" in connection
                else:
                    close = b"keep-alive" not in connection
                    keep_alive_10 = not close
            else:
                close = not http11

            # ---- body
            if length < 0:
                if method == b"POST":
                    sendall(_response(400, parsing_error_body("missing Content-Length"), request_id, True))
                    return
                length = 0
            if length > max_body:
                message = "body of %d bytes exceeds ASYA_MAX_BODY_BYTES=%d" % (length, max_body)
                sendall(_response(413, parsing_error_body(message), request_id, True))
                return
            start = end + 4
            stop = start + length
            if len(buf) >= stop:
                body = buf[start:stop]  # type: Any
                buf = buf[stop:]
            else:
                # Memory is committed as bytes arrive (a declared length allocates nothing)
                # and counted against ASYA_MAX_INFLIGHT_BODY_BYTES until the request is done.
                state.waiting_since = monotonic()
                body = bytearray(buf[start:])
                buf = b""
                got = len(body)
                while got < length:
                    data = recv(min(chunk, length - got))
                    if not data:
                        return  # the client went away (or was closed to make room)
                    if not self.reserve(state, len(data)):
                        message = (
                            "request bodies in flight exceed ASYA_MAX_INFLIGHT_BODY_BYTES=%d; "
                            "retry later" % self.config.max_inflight_body
                        )
                        body = dumps({"error": "unavailable", "details": {"message": message}})
                        sendall(_response(503, body, request_id, True))
                        return
                    body += data
                    got += len(data)
            state.waiting_since = 0.0

            # ---- dispatch
            q = target.find(b"?")
            path = target if q < 0 else target[:q]
            if path == b"/invoke" and method == b"POST":
                state.busy = True
                try:
                    close = self.invoke(
                        conn, state, decode, body, request_id, http11, close, keep_alive_10
                    )
                finally:
                    state.busy = False
            elif path == b"/healthz" and method == b"GET":
                if state.reserved:
                    self.release(state)
                sendall(_response(200, _HEALTH_BODY, request_id, close, keep_alive_10))
            else:
                if state.reserved:
                    self.release(state)
                message = "no endpoint %s %s (expected GET /healthz or POST /invoke)" % (
                    method.decode("latin-1"),
                    path.decode("latin-1"),
                )
                body = dumps({"error": "not_found", "details": {"message": message}})
                sendall(_response(404, body, request_id, close, keep_alive_10))
            body = None
            if state.reserved:  # released before the response in every path above
                self.release(state)
            if close or self.draining:
                return

    def invoke(self, conn, state, decode, body, request_id, http11, close, keep_alive_10):
        # type: (socket.socket, _Connection, Callable[[Any], Any], Any, Optional[bytes], bool, bool, bool) -> bool
        """Serve one POST /invoke; returns whether the connection must be closed.  The body's
        bytes stay counted until the handler returns, and are released before the response
        is sent (a client may send its next request as soon as it has the answer)."""
        invoker = self.invoker
        try:
            env = parse_envelope(body, invoker.validate, decode)
        except ValueError as exc:
            if state.reserved:
                self.release(state)
            if self.debug:
                LOG.debug("rejecting malformed envelope: %s", exc)
            conn.sendall(_response(400, parsing_error_body(str(exc)), request_id, close, keep_alive_10))
            return close
        token = _CURRENT.set(env)
        try:
            if self.debug:
                LOG.debug("invoke: curr=%r", env["route"]["curr"])
            try:
                try:
                    result, snapshot = invoker.call(env)
                finally:
                    if state.reserved:
                        self.release(state)
                rtype = type(result)
                if rtype is dict or (rtype is list and result):
                    out = dumps({"frames": invoker.frames(env, result, snapshot)})
                    close = close or self.draining  # SIGTERM while the handler ran
                    if request_id is not None and not close and not keep_alive_10:
                        # the common case in one formatting operation
                        conn.sendall(_OK_TEMPLATE % (len(out), request_id, out))
                        return close
                    status = 200
                elif result is None or rtype is list:
                    status, out = 204, None  # type: Tuple[int, Optional[bytes]]
                elif isinstance(result, _STREAM_TYPES):
                    return self.stream(
                        conn, env, result, snapshot, request_id, http11, close, keep_alive_10
                    )
                else:
                    status, out = 200, dumps({"frames": invoker.frames(env, result, snapshot)})
            except (Exception, SystemExit) as exc:  # the handler (or its result) failed
                if self.debug:
                    LOG.debug("handler failed", exc_info=True)
                status, out = 500, processing_error_body(exc)
            close = close or self.draining
            conn.sendall(_response(status, out, request_id, close, keep_alive_10))
            return close
        finally:
            _CURRENT.reset(token)

    def stream(self, conn, env, gen, snapshot, request_id, http11, close, keep_alive_10):
        # type: (socket.socket, Dict[str, Any], Any, Any, Optional[bytes], bool, bool, bool) -> bool
        """Serve a generator handler as SSE; chunked on HTTP/1.1 so the connection survives."""
        invoker = self.invoker
        is_async = isinstance(gen, types.AsyncGeneratorType)
        base = None if invoker.envelope_mode else invoker.base_frame(env)
        started = False
        sendall = conn.sendall

        def emit(event):
            # type: (bytes) -> None
            if http11:
                sendall(b"%x\r\n%s\r\n" % (len(event), event))
            else:
                sendall(event)

        abi = None  # type: Optional[AbiState]  # created by the first ABI command
        reply = None  # type: Any  # sent back into the generator (GET's value)
        failure = None  # type: Optional[BaseException]  # a failed command, thrown back in
        try:
            while True:
                try:
                    if is_async:
                        item = invoker.run_async(_asend(gen, reply, failure, env), env)
                    elif failure is not None:
                        exc, failure = failure, None
                        try:
                            item = gen.throw(exc)
                        except StopIteration:
                            item = _END
                    else:
                        try:
                            item = gen.send(reply)
                        except StopIteration:
                            item = _END
                    reply = failure = None
                    if item is _END:
                        break
                    verb = abi_command(item)
                    if verb is not None:
                        if abi is None:
                            abi = AbiState(env)
                        try:
                            reply, event = invoker.command(abi, verb, item)
                        except Exception as exc:  # raised inside the handler at its yield
                            failure = exc
                            continue
                        if verb == "SET" or verb == "DEL":
                            base = abi.base_frame()
                    else:
                        event = invoker.stream_event(env, item, snapshot, base)
                except Exception as exc:
                    if self.debug:
                        LOG.debug("streaming handler failed", exc_info=True)
                    if not started:  # nothing sent yet: a plain 500 response
                        error = processing_error_body(exc)
                        sendall(_response(500, error, request_id, close, keep_alive_10))
                        return close
                    emit(b"event: error\ndata: " + processing_error_body(exc) + b"\n\n")
                    break
                if event is None:
                    continue
                if not started:
                    started = True
                    head = [_SSE_HEAD]
                    if request_id is not None:
                        head.append(b"X-Request-Id: " + request_id + b"\r\n")
                    if http11:
                        head.append(b"Transfer-Encoding: chunked\r\n")
                        if close:
                            head.append(b"Connection: close\r\n")
                    else:
                        close = True  # HTTP/1.0: the body ends when the connection closes
                        head.append(b"Connection: close\r\n")
                    head.append(b"\r\n")
                    if http11:
                        head.append(b"%x\r\n%s\r\n" % (len(event), event))
                    else:
                        head.append(event)
                    sendall(b"".join(head))
                else:
                    emit(event)
            if not started:  # a generator that produced no event: headers + done only
                head = [_SSE_HEAD]
                if request_id is not None:
                    head.append(b"X-Request-Id: " + request_id + b"\r\n")
                if http11:
                    head.append(b"Transfer-Encoding: chunked\r\n")
                    if close:
                        head.append(b"Connection: close\r\n")
                else:
                    close = True
                    head.append(b"Connection: close\r\n")
                head.append(b"\r\n")
                sendall(b"".join(head))
            if http11:
                sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(_DONE_EVENT), _DONE_EVENT))
            else:
                sendall(_DONE_EVENT)
            return close
        finally:
            _close_generator(invoker, gen, is_async, env)


def _waiting_since(conn):
    # type: (_Connection) -> float
    return conn.waiting_since


def _close_generator(invoker, gen, is_async, env):
    # type: (Invoker, Any, bool, Dict[str, Any]) -> None
    """Run the generator's cleanup (finally blocks) whether it finished, failed or was cut."""
    try:
        if is_async:
            invoker.run_async(gen.aclose(), env)
        else:
            gen.close()
    except Exception:
        LOG.debug("closing the generator failed", exc_info=True)


def _unlink_quietly(path):
    # type: (str) -> None
    try:
        os.unlink(path)
    except OSError:
        pass


def _send_quietly(conn, data):
    # type: (socket.socket, bytes) -> None
    try:
        conn.sendall(data)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(environ=None):
    # type: (Optional[Mapping[str, str]]) -> int
    if environ is None:
        environ = os.environ
    setup_logging(logging.INFO)
    try:
        config = Config(environ)
    except ConfigError as exc:
        _fatal(EXIT_CONFIG, str(exc))
        return EXIT_CONFIG  # not reached
    setup_logging(config.log_level)

    _unlink_quietly(config.ready_path)  # never advertise readiness of a previous run
    try:
        func = load_handler(config.handler)
    except HandlerLoadError as exc:
        _fatal(EXIT_HANDLER, str(exc), exc.__cause__ or exc)
        return EXIT_HANDLER
    kind = handler_kind(func)
    invoker = Invoker(func, config.mode == "envelope", config.validate)
    if kind in ("async", "async generator"):
        invoker.loop()  # start the event loop thread before serving

    server = Server(config, invoker)
    force = threading.Event()

    def on_signal(signum, frame):  # type: ignore[no-untyped-def]
        if server.draining:
            force.set()
            return
        server.draining = True
        raise _Shutdown()

    try:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            server.bind()
            server.write_ready()
        except OSError as exc:
            server.remove_files()
            _fatal(EXIT_SOCKET, "cannot serve on %s: %s" % (config.socket_path, exc), exc)
        LOG.info(
            "runtime ready: handler=%s (%s) mode=%s socket=%s validation=%s pid=%d python=%s",
            ".".join(config.handler),
            kind,
            config.mode,
            config.socket_path,
            "on" if config.validate else "off",
            os.getpid(),
            sys.version.split()[0],
        )
        server.serve_forever()
    except _Shutdown:
        pass
    # Stop accepting first, so the host sees the runtime go away, then let in-flight work end.
    if server.listener is not None:
        server.listener.close()
    server.remove_files()
    left = server.drain(config.shutdown_grace, force)
    if left:
        LOG.warning("shutting down with %d request(s) still running", left)
    LOG.info("runtime stopped")
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
