"""HTTP framing, keep-alive, request ids, limits and concurrency."""

import json
import os

from conftest import envelope, wait_until


def test_healthz(start_runtime):
    rt = start_runtime("basic.echo")
    resp = rt.client().request("GET", "/healthz", headers={"X-Request-Id": "h-1"})
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"status": "ready"}
    assert resp.headers["x-request-id"] == "h-1"


def test_unknown_paths_and_methods_are_404_json(start_runtime):
    c = start_runtime("basic.echo").client()
    for method, path in [("GET", "/nope"), ("GET", "/invoke"), ("POST", "/healthz"), ("PUT", "/invoke")]:
        resp = c.request(method, path, body=b"{}", headers={"X-Request-Id": "r-404"})
        assert resp.status == 404, (method, path)
        body = resp.json()
        assert body["error"] == "not_found"
        assert path in body["details"]["message"]
        assert resp.headers["x-request-id"] == "r-404"
    assert c.request("GET", "/healthz").status == 200  # the connection survived


def test_query_string_is_ignored(start_runtime):
    c = start_runtime("basic.echo").client()
    assert c.request("GET", "/healthz?probe=1").status == 200


def test_request_id_echoed_on_every_kind_of_response(start_runtime):
    rt = start_runtime("basic.echo")
    c = rt.client()
    cases = [
        (envelope({"a": 1}), 200),
        (envelope(None), 204),
        (b"not json", 400),
    ]
    for i, (env, status) in enumerate(cases):
        rid = "0b9c6d1e-%04d-4c1a-9f00-ABCDEFabcdef" % i
        resp = c.invoke(env, headers={"X-Request-Id": rid})
        assert resp.status == status
        assert resp.headers["x-request-id"] == rid  # byte for byte, case kept
    resp = c.invoke(envelope(1))
    assert resp.status == 200 and "x-request-id" not in resp.headers


def test_request_id_echoed_on_500(start_runtime):
    c = start_runtime("basic.raise_value").client()
    resp = c.invoke(envelope(1), headers={"x-request-id": "lower-case-header"})
    assert resp.status == 500
    assert resp.headers["x-request-id"] == "lower-case-header"


def test_keep_alive_many_requests_on_one_connection(start_runtime):
    rt = start_runtime("basic.double")
    c = rt.client()
    for i in range(50):
        resp = c.invoke(envelope({"value": i}), headers={"X-Request-Id": "k-%d" % i})
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "k-%d" % i
        assert resp.json()["frames"][0]["payload"] == {"result": 2 * i}
        assert "connection" not in resp.headers
    assert not c.is_closed(timeout=0.05)


def test_http10_closes_after_reply(start_runtime):
    c = start_runtime("basic.echo").client()
    resp = c.invoke(envelope({"v": 1}), version="HTTP/1.0")
    assert resp.status == 200
    assert resp.json()["frames"][0]["payload"] == {"v": 1}
    assert resp.headers["connection"] == "close"
    assert c.is_closed()


def test_http10_keep_alive_when_asked(start_runtime):
    c = start_runtime("basic.echo").client()
    for i in range(3):
        resp = c.invoke(envelope(i), headers={"Connection": "keep-alive"}, version="HTTP/1.0")
        assert resp.status == 200
        assert resp.headers["connection"] == "keep-alive"
    assert not c.is_closed(timeout=0.05)


def test_connection_close_is_honoured(start_runtime):
    c = start_runtime("basic.echo").client()
    resp = c.invoke(envelope(1), headers={"Connection": "close"})
    assert resp.status == 200
    assert resp.headers["connection"] == "close"
    assert c.is_closed()


def test_missing_content_length_is_400_and_closes(start_runtime):
    c = start_runtime("basic.echo").client()
    c.send(b"POST /invoke HTTP/1.1\r\nX-Request-Id: m-1\r\n\r\n")
    resp = c.read_response()
    assert resp.status == 400
    assert resp.json()["error"] == "msg_parsing_error"
    assert "Content-Length" in resp.json()["details"]["message"]
    assert resp.headers["x-request-id"] == "m-1"
    assert c.is_closed()


def test_invalid_content_length_is_400(start_runtime):
    rt = start_runtime("basic.echo")
    for value in ["abc", "-5", "1e3", "12, 12"]:
        c = rt.client()
        c.send(("POST /invoke HTTP/1.1\r\nContent-Length: %s\r\n\r\n{}" % value).encode())
        resp = c.read_response()
        assert resp.status == 400, value
        assert "Content-Length" in resp.json()["details"]["message"]
        assert c.is_closed()


def test_duplicate_content_length_is_400(start_runtime):
    c = start_runtime("basic.echo").client()
    c.send(b"POST /invoke HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}")
    assert c.read_response().status == 400


def test_chunked_request_body_is_refused(start_runtime):
    c = start_runtime("basic.echo").client()
    c.send(b"POST /invoke HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    resp = c.read_response()
    assert resp.status == 400
    assert "Transfer-Encoding" in resp.json()["details"]["message"]
    assert c.is_closed()


def test_malformed_request_line_is_400(start_runtime):
    c = start_runtime("basic.echo").client()
    c.send(b"GARBAGE\r\n\r\n")
    assert c.read_response().status == 400
    assert c.is_closed()


def test_body_over_cap_is_413_without_reading_it(start_runtime):
    rt = start_runtime("basic.echo", env={"ASYA_MAX_BODY_BYTES": "1024"})
    c = rt.client()
    c.send(b"POST /invoke HTTP/1.1\r\nX-Request-Id: big\r\nContent-Length: 1025\r\n\r\n")
    resp = c.read_response()
    assert resp.status == 413
    body = resp.json()
    assert body["error"] == "msg_parsing_error"
    assert "ASYA_MAX_BODY_BYTES=1024" in body["details"]["message"]
    assert resp.headers["x-request-id"] == "big"
    assert c.is_closed()
    # exactly at the cap is fine
    env = envelope("x" * 100)
    raw = json.dumps(env).encode()
    env["payload"] = "x" * (100 + 1024 - len(raw))
    raw = json.dumps(env).encode()
    assert len(raw) == 1024
    assert rt.client().invoke(raw).status == 200


def test_default_cap_is_64_mib(start_runtime):
    c = start_runtime("basic.echo").client()
    c.send(b"POST /invoke HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (64 * 1024 * 1024 + 1))
    resp = c.read_response()
    assert resp.status == 413
    assert "67108864" in resp.json()["details"]["message"]


def test_huge_body_actually_sent_over_cap(start_runtime):
    rt = start_runtime("basic.echo", env={"ASYA_MAX_BODY_BYTES": "65536"})
    c = rt.client()
    body = json.dumps(envelope("y" * 2000000)).encode()
    try:
        c.send(b"POST /invoke HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the runtime answered and closed before reading the body
    resp = c.read_response()
    assert resp.status == 413
    assert rt.client().request("GET", "/healthz").status == 200


def test_large_body_read_in_small_chunks(start_runtime):
    """ASYA_CHUNK_SIZE=7 forces headers and body to arrive over many recv calls."""
    rt = start_runtime("basic.echo", env={"ASYA_CHUNK_SIZE": "7"})
    c = rt.client()
    payload = {"blob": "z" * 300000, "list": list(range(1000))}
    for _ in range(2):
        resp = c.invoke(envelope(payload), headers={"X-Request-Id": "chunky"})
        assert resp.status == 200
        assert resp.json()["frames"][0]["payload"] == payload
        assert resp.headers["x-request-id"] == "chunky"


def test_headers_too_large_is_431(start_runtime):
    c = start_runtime("basic.echo").client()
    c.send(b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 70000)
    resp = c.read_response()
    assert resp.status == 431
    assert c.is_closed()


def test_connections_are_served_concurrently(start_runtime, sockdir):
    rt = start_runtime("basic.block")
    release = os.path.join(sockdir, "release")
    slow, fast = rt.client(), rt.client()
    started = os.path.join(sockdir, "started")
    slow.send_request("POST", "/invoke", json.dumps(envelope({"release": release, "started": started})).encode())
    wait_until(lambda: os.path.exists(started), "the slow handler to start")
    # the second connection is answered while the first handler call is still blocked
    fast_release = os.path.join(sockdir, "already-there")
    open(fast_release, "w").close()
    resp = fast.invoke(envelope({"release": fast_release}))
    assert resp.status == 200
    assert not slow.has_data(timeout=0.05)
    open(release, "w").close()
    resp = slow.read_response()
    assert resp.status == 200
    assert resp.json()["frames"][0]["payload"] == {"released": True}


def test_client_disconnect_mid_request_does_not_hurt(start_runtime):
    rt = start_runtime("basic.echo")
    c = rt.client()
    c.send(b"POST /invoke HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"id\":")
    c.close()
    c2 = rt.client()
    c2.send(b"GET /heal")
    c2.close()
    wait_until(lambda: rt.client().request("GET", "/healthz").status == 200, "healthz")
    assert rt.proc.poll() is None
