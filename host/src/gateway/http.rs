//! The gateway's HTTP API (hyper 1, HTTP/1.1).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::mcp::{Endpoint as McpEndpoint, McpOptions};
use super::{Gateway, GatewayError, SubmitRequest, TaskEvent, TaskStatus, WireReport};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Body cap of `POST /reports`.
const MAX_REPORTS_BODY: usize = 16 << 20;
/// Room for the request's own fields around the payload.
const SUBMIT_OVERHEAD: usize = 64 << 10;
/// Cap on `GET /tasks?limit=`.
const MAX_LIST_LIMIT: usize = 10_000;
/// SSE keep-alive comment interval.
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).boxed_unsync())
        .expect("static response parts are valid")
}

fn json_reply(status: StatusCode, v: &impl serde::Serialize) -> Response<Body> {
    full(
        status,
        "application/json",
        serde_json::to_vec(v).expect("JSON serialises"),
    )
}

fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response<Body> {
    json_reply(
        status,
        &json!({"error": code, "message": message.to_string()}),
    )
}

fn gateway_error(e: GatewayError) -> Response<Body> {
    match &e {
        GatewayError::BadRequest(_) => error(StatusCode::BAD_REQUEST, "bad_request", e),
        GatewayError::UnknownFlow(_) => error(StatusCode::BAD_REQUEST, "unknown_flow", e),
        GatewayError::PayloadTooLarge { .. } => {
            error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", e)
        }
        GatewayError::NotFound { .. } => error(StatusCode::NOT_FOUND, "not_found", e),
        GatewayError::Store(_) => error(StatusCode::SERVICE_UNAVAILABLE, "store_error", e),
        GatewayError::Transport(_) => error(StatusCode::SERVICE_UNAVAILABLE, "transport_error", e),
        GatewayError::Conflict(_) => error(StatusCode::CONFLICT, "conflict", e),
    }
}

/// Default bound on reading a request's head, and separately its body
/// (`ASYA_GATEWAY_READ_TIMEOUT`).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on open connections (`ASYA_GATEWAY_MAX_CONNECTIONS`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// How the HTTP API is served: who may call it and how much a client may hold.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Bearer token of the task API (`ASYA_GATEWAY_TOKEN`); `None` = open.
    pub client_token: Option<String>,
    /// Bearer token of `POST /reports` (`ASYA_GATEWAY_REPORT_TOKEN`, else the client
    /// token); `None` = open.
    pub report_token: Option<String>,
    /// Bound on reading a request's head, and separately its body.
    pub read_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// `/mcp`: the flows' descriptions and input schemas, and how long a tool call waits.
    pub mcp: McpOptions,
}

impl ServeOptions {
    /// One token for both audiences (or none), default bounds.
    pub fn with_token(token: Option<String>) -> ServeOptions {
        ServeOptions {
            client_token: token.clone(),
            report_token: token,
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            mcp: McpOptions::default(),
        }
    }
}

/// Tokens as the request handler compares them.
struct Auth {
    client: Option<Arc<str>>,
    report: Option<Arc<str>>,
}

/// Constant-time comparison of the bearer token.
fn authorized(req: &Request<Incoming>, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Length is not secret enough to hide; the content is compared without early exit.
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0
}

async fn read_body(
    body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, Response<Body>> {
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body exceeds {limit} bytes"),
        )),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, "bad_request", e)),
        Err(_) => {
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "request body not received within {} (ASYA_GATEWAY_READ_TIMEOUT)",
                    humantime::format_duration(timeout)
                ),
            );
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            Err(r)
        }
    }
}

/// A JSON body that does not parse is `invalid_json`; one that parses but has a bad field
/// is `bad_request` naming it.
fn json_error(e: serde_json::Error) -> Response<Body> {
    match e.classify() {
        serde_json::error::Category::Data => error(StatusCode::BAD_REQUEST, "bad_request", e),
        _ => error(StatusCode::BAD_REQUEST, "invalid_json", e),
    }
}

fn unauthorized(message: &str) -> Response<Body> {
    let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

fn query_params(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn route(
    gw: Arc<Gateway>,
    auth: Arc<Auth>,
    mcp: McpEndpoint,
    read_timeout: Duration,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let method = req.method().clone();
    if path == "/healthz" {
        return json_reply(StatusCode::OK, &json!({"status": "ok"}));
    }
    // Two audiences: sidecars report with the report token, clients use the task API with
    // theirs; neither token opens the other's routes (unless they are the same token).
    if path == "/reports" {
        if !authorized(&req, auth.report.as_deref()) {
            return unauthorized(
                "missing or wrong bearer token for reports (ASYA_GATEWAY_REPORT_TOKEN)",
            );
        }
    } else if !authorized(&req, auth.client.as_deref()) {
        return unauthorized("missing or wrong bearer token (ASYA_GATEWAY_TOKEN)");
    }
    if path == "/mcp" {
        // The body is read here, bounded in size and time as the task API's are.
        let limit = gw.max_payload_bytes().saturating_add(SUBMIT_OVERHEAD);
        let (head, body) = req.into_parts();
        let body = match read_body(body, limit, read_timeout).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        return mcp.handle(Request::from_parts(head, Full::new(body))).await;
    }
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    match (&method, parts.as_slice()) {
        (&Method::POST, ["tasks"]) => {
            let limit = gw.max_payload_bytes().saturating_add(SUBMIT_OVERHEAD);
            let body = match read_body(req.into_body(), limit, read_timeout).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let sub: SubmitRequest = match serde_json::from_slice(&body) {
                Ok(s) => s,
                Err(e) => return json_error(e),
            };
            match gw.submit(sub).await {
                Ok(v) => json_reply(StatusCode::CREATED, &v),
                Err(e) => gateway_error(e),
            }
        }
        (&Method::GET, ["tasks"]) => {
            let mut status = None;
            let mut flow = None;
            let mut since = None;
            let mut limit = 100usize;
            for (k, v) in query_params(&req) {
                match k.as_str() {
                    "status" => match TaskStatus::parse(&v) {
                        Some(s) => status = Some(s),
                        None => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                "bad_request",
                                format!("status: unknown status {v:?}"),
                            )
                        }
                    },
                    "flow" => flow = Some(v),
                    "since" => match chrono::DateTime::parse_from_rfc3339(&v) {
                        Ok(d) => since = Some(d.with_timezone(&chrono::Utc)),
                        Err(e) => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                "bad_request",
                                format!("since: must be RFC 3339: {e}"),
                            )
                        }
                    },
                    "limit" => match v.parse::<usize>() {
                        Ok(n) => limit = n.min(MAX_LIST_LIMIT),
                        Err(_) => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                "bad_request",
                                format!("limit: {v:?} is not a non-negative integer"),
                            )
                        }
                    },
                    _ => {}
                }
            }
            match gw.list(status, flow.as_deref(), since, limit).await {
                Ok(tasks) => json_reply(StatusCode::OK, &json!({ "tasks": tasks })),
                Err(e) => gateway_error(e),
            }
        }
        (&Method::GET, ["tasks", id]) => match gw.get(id).await {
            Some(v) => json_reply(StatusCode::OK, &v),
            None => gateway_error(gw.not_found(id)),
        },
        (&Method::GET, ["tasks", id, "trace"]) => match gw.get_task(id).await {
            Some(t) => json_reply(
                StatusCode::OK,
                &json!({"task": t.view(), "timeline": t.timeline}),
            ),
            None => gateway_error(gw.not_found(id)),
        },
        (&Method::GET, ["tasks", id, "stream"]) => stream(gw, id).await,
        (&Method::POST, ["tasks", id, "cancel"]) => match gw.cancel(id).await {
            Ok(v) => json_reply(StatusCode::OK, &v),
            Err(e) => gateway_error(e),
        },
        (&Method::POST, ["tasks", id, "resume"]) => {
            let limit = gw.max_payload_bytes().saturating_add(SUBMIT_OVERHEAD);
            let body = match read_body(req.into_body(), limit, read_timeout).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let input = match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Object(mut o)) => o.remove("input").unwrap_or(Value::Null),
                Ok(_) => Value::Null,
                Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
            };
            match gw.resume(id, input).await {
                Ok(v) => json_reply(StatusCode::OK, &v),
                Err(e) => gateway_error(e),
            }
        }
        (&Method::POST, ["reports"]) => {
            let body = match read_body(req.into_body(), MAX_REPORTS_BODY, read_timeout).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let reports: Vec<WireReport> = match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Array(items)) => match items
                    .into_iter()
                    .map(serde_json::from_value)
                    .collect::<Result<_, _>>()
                {
                    Ok(r) => r,
                    Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_report", e),
                },
                Ok(v) => match serde_json::from_value(v) {
                    Ok(r) => vec![r],
                    Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_report", e),
                },
                Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", e),
            };
            if let Some(why) = reports.iter().find_map(|r| r.validate().err()) {
                return error(StatusCode::BAD_REQUEST, "invalid_report", why);
            }
            let n = reports.len();
            for r in reports {
                gw.enqueue(r);
            }
            json_reply(StatusCode::ACCEPTED, &json!({ "accepted": n }))
        }
        (_, ["tasks", ..]) | (_, ["reports"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} {path} is not supported"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route {path}"),
        ),
    }
}

fn sse_frame(kind: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// `GET /tasks/{id}/stream`: the current state, then every update in order, ending with
/// `final`.
async fn stream(gw: Arc<Gateway>, id: &str) -> Response<Body> {
    // Subscribe before reading so nothing falls between the snapshot and the updates.
    let rx = gw.subscribe();
    let Some(view) = gw.get(id).await else {
        return gateway_error(gw.not_found(id));
    };
    let first_kind = if view.status.is_final() {
        "final"
    } else {
        "progress"
    };
    let first = sse_frame(
        first_kind,
        &serde_json::to_value(&view).unwrap_or(Value::Null),
    );
    struct State {
        gw: Arc<Gateway>,
        id: String,
        rx: broadcast::Receiver<Arc<TaskEvent>>,
        done: bool,
    }
    let state = State {
        gw,
        id: id.to_owned(),
        rx,
        done: view.status.is_final(),
    };
    let rest = futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            match tokio::time::timeout(SSE_KEEPALIVE, st.rx.recv()).await {
                Err(_) => return Some((Bytes::from_static(b": keep-alive\n\n"), st)),
                Ok(Ok(ev)) if ev.task_id == st.id => {
                    if ev.kind == "final" {
                        st.done = true;
                    }
                    return Some((sse_frame(ev.kind, &ev.data), st));
                }
                Ok(Ok(_)) => continue,
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    debug!(task_id = %st.id, skipped = n, "SSE subscriber lagged; resending state");
                    let view = st.gw.get(&st.id).await;
                    let v = serde_json::to_value(&view).unwrap_or(Value::Null);
                    let kind = if view.is_some_and(|v| v.status.is_final()) {
                        st.done = true;
                        "final"
                    } else {
                        "progress"
                    };
                    return Some((sse_frame(kind, &v), st));
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return None,
            }
        }
    });
    let body = futures::stream::once(async move { first })
        .chain(rest)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(BodyExt::boxed_unsync(StreamBody::new(body)))
        .expect("static response parts are valid")
}

/// Serve the task API until `shutdown` is cancelled. `token`: require
/// `Authorization: Bearer <token>` on every route but `/healthz` (reports included); the
/// default read timeout and connection bound.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    token: Option<String>,
    shutdown: CancellationToken,
) {
    serve_with(listener, gw, ServeOptions::with_token(token), shutdown).await
}

/// Serve the task API until `shutdown` is cancelled, with `opts`.
///
/// A client costs a socket for a bounded time: the request head must arrive within
/// `read_timeout` (an idle keep-alive connection is closed after it too), the body within
/// `read_timeout` again; past `max_connections` open connections a new one is answered
/// 503 and closed at once.
pub async fn serve_with(
    listener: TcpListener,
    gw: Arc<Gateway>,
    opts: ServeOptions,
    shutdown: CancellationToken,
) {
    let nonempty = |t: Option<String>| t.filter(|t| !t.is_empty()).map(Arc::<str>::from);
    let auth = Arc::new(Auth {
        client: nonempty(opts.client_token),
        report: nonempty(opts.report_token),
    });
    if let Ok(addr) = listener.local_addr() {
        info!(
            %addr,
            client_auth = auth.client.is_some(),
            report_auth = auth.report.is_some(),
            read_timeout = ?opts.read_timeout,
            max_connections = opts.max_connections,
            "gateway listening"
        );
    }
    let read_timeout = opts.read_timeout;
    let mcp = McpEndpoint::new(
        gw.clone(),
        opts.mcp,
        gw.max_payload_bytes().saturating_add(SUBMIT_OVERHEAD),
        shutdown.child_token(),
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections.max(1)));
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSALS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "gateway accept failed");
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "gateway connection refused: too many connections (ASYA_GATEWAY_MAX_CONNECTIONS)");
            refuse(stream, &refusals);
            continue;
        };
        let gw = gw.clone();
        let auth = auth.clone();
        let mcp = mcp.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let gw = gw.clone();
                let auth = auth.clone();
                let mcp = mcp.clone();
                async move { Ok::<_, Infallible>(route(gw, auth, mcp, read_timeout, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(read_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    debug!(%peer, error = %e, "gateway connection closed");
                },
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Connections past the bound being answered 503 at once; past this they are just closed.
const REFUSALS: usize = 64;
/// How long a refused connection is kept to let the client read the 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Answer 503 and close. Closing a socket with unread request bytes resets it (the client
/// may lose the answer), so the request is read and discarded first, for at most
/// `REFUSAL_LINGER`, by at most `REFUSALS` connections at a time.
fn refuse(stream: tokio::net::TcpStream, refusals: &Arc<tokio::sync::Semaphore>) {
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(TOO_MANY_CONNECTIONS).await?;
            stream.shutdown().await?;
            let mut buf = [0u8; 4096];
            while stream.read(&mut buf).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// The answer to a connection past `max_connections`.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 112\r\n\r\n{\"error\":\"too_many_connections\",\"message\":\"the gateway serves ASYA_GATEWAY_MAX_CONNECTIONS connections at once\"}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn too_many_connections_answer_is_well_formed() {
        let text = std::str::from_utf8(TOO_MANY_CONNECTIONS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{text}"
        );
        serde_json::from_str::<Value>(body).unwrap();
    }

    #[test]
    fn decode() {
        assert_eq!(percent_decode("a%3Ab+c"), "a:b c");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
