//! Client for the runtime protocol (SPEC §3): HTTP/1.1 over a Unix socket with keep-alive,
//! HTTP/1.0 and close-delimited responses accepted, JSON frames, 204/400/500, SSE streams.
//!
//! Every request carries a fresh `X-Request-Id`; a response that echoes a different id is a
//! stale response on a reused connection and is rejected (the connection is dropped).
//! A broken or truncated response is an error, never a panic.

mod sse;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::envelope::{ErrorInfo, Frame};
pub use sse::{SseEvent, SseStream};

/// What the sidecar needs from its runtime: [`RuntimeClient`] talks to a real one; tests of
/// the sidecar loop can put a scripted one in [`crate::sidecar::Deps::runtime`].
#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    /// Call the handler with the envelope bytes; answer within `deadline`.
    async fn invoke(&self, envelope: Bytes, deadline: Instant) -> Result<Reply, RuntimeError>;
    /// Forget pooled connections (after a timeout the runtime may still answer late).
    fn reset(&self);
    /// Wait until the runtime can take calls.
    async fn wait_ready(&self, ready_file: &Path, timeout: Duration) -> Result<(), RuntimeError>;
    /// Is a runtime there right now (its ready file exists and something accepts
    /// connections on its socket)? A runtime busy with long calls is there. `Err` says what
    /// is missing. The sidecar probes this every second while it consumes.
    async fn reachable(&self, _ready_file: &Path) -> Result<(), String> {
        Ok(())
    }
}

/// The events of a streaming (SSE) answer.
#[async_trait::async_trait]
pub trait EventStream: Send + std::fmt::Debug {
    /// The next event; `Ok(None)` after `done`. A stream that ends without `done`, or an
    /// event that cannot be parsed, is an error.
    async fn next(&mut self) -> Result<Option<SseEvent>, RuntimeError>;
    /// The next event if it has already arrived (no waiting, no I/O); `None` otherwise.
    fn next_buffered(&mut self) -> Option<Result<Option<SseEvent>, RuntimeError>>;
}

/// Bound of one reachability probe's connect.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Header carrying the per-request id.
pub const REQUEST_ID: &str = "x-request-id";

/// Why a runtime call failed (as opposed to the handler failing, which is a [`Reply`]).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot connect to runtime socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime connection failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("runtime did not answer within {0:?}")]
    Timeout(Duration),
    #[error("runtime answered request {expected} with X-Request-Id {got}")]
    RequestIdMismatch { expected: String, got: String },
    #[error("runtime response body exceeds {0} bytes")]
    BodyTooLarge(usize),
    #[error("runtime response is broken: {0}")]
    Malformed(String),
    #[error("runtime answered with unexpected status {status}: {body}")]
    UnexpectedStatus { status: u16, body: String },
    #[error("runtime not ready after {waited:?}: {reason}")]
    NotReady { waited: Duration, reason: String },
}

impl RuntimeError {
    /// The runtime is not there (no socket, connection refused) or went away during the
    /// call before answering anything: a fault of the pair, not of the handler — the call
    /// did not happen or did not finish, and the sidecar waits for the runtime instead of
    /// counting a failure. See [`RuntimeError::is_lost`] for the second kind.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RuntimeError::Connect { .. }) || self.is_lost()
    }

    /// The connection ended before any byte of the answer (the runtime died or restarted
    /// during the call — which a handler can cause, e.g. by running out of memory, so the
    /// sidecar bounds how often one envelope may meet it).
    pub fn is_lost(&self) -> bool {
        matches!(self, RuntimeError::Http(e) if !e.is_parse() && !e.is_user() && !e.is_timeout())
    }

    /// The error `type` recorded on an envelope that failed this way.
    pub fn error_type(&self) -> &'static str {
        match self {
            RuntimeError::Timeout(_) => "Timeout",
            RuntimeError::RequestIdMismatch { .. } => "RequestIdMismatch",
            RuntimeError::Malformed(_) | RuntimeError::BodyTooLarge(_) => "MalformedResponse",
            RuntimeError::UnexpectedStatus { .. } => "UnexpectedStatus",
            _ => "ConnectionError",
        }
    }
}

/// What the runtime answered.
#[derive(Debug)]
pub enum Reply {
    /// 200 JSON: the outgoing frames.
    Frames(Vec<Frame>),
    /// 200 SSE: frames arrive one by one.
    Stream(Box<dyn EventStream>),
    /// 204: the handler aborted (returned None).
    Abort,
    /// 400: the runtime could not parse the envelope.
    BadRequest(ErrorInfo),
    /// 500: the handler raised.
    HandlerError(ErrorInfo),
}

#[derive(Deserialize)]
struct FramesBody {
    frames: Vec<Frame>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    details: Value,
}

impl ErrorBody {
    fn into_info(self, default_type: &str) -> ErrorInfo {
        let mut info: ErrorInfo = serde_json::from_value(self.details.clone()).unwrap_or_default();
        if info.kind.is_empty() {
            info.kind = default_type.to_owned();
        }
        if info.message.is_empty() {
            info.message = match &self.details {
                Value::Null => self.error.clone(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
        }
        info
    }
}

type Sender = SendRequest<Full<Bytes>>;
type Connection = hyper::client::conn::http1::Connection<TokioIo<UnixStream>, Full<Bytes>>;

/// One keep-alive connection. The connection future is driven by whoever uses the
/// connection (see [`Conn::drive`]) rather than by a task of its own: a runtime call then
/// costs no cross-task wake-ups, which is most of an HTTP client's overhead on a socket.
pub(crate) struct Conn {
    sender: Sender,
    /// `None` once the connection ended: it is dropped at once, because hyper fails the
    /// requests still waiting on a connection only when the connection is dropped — kept,
    /// a request on a connection the runtime closed waited for ever (a dead runtime became
    /// "did not answer within <timeout>").
    conn: Option<std::pin::Pin<Box<Connection>>>,
}

impl Conn {
    /// Await `fut` while polling the connection (reads, writes, keep-alive bookkeeping).
    /// Once the connection has ended, `fut` still completes from what was already read (or
    /// fails: the connection is gone).
    pub(crate) async fn drive<F: std::future::Future>(&mut self, fut: F) -> F::Output {
        drive(&mut self.conn, fut).await
    }

    fn is_closed(&self) -> bool {
        self.conn.is_none() || self.sender.is_closed()
    }

    /// Wait until the connection can take a request; false when it cannot (it ended).
    async fn ready(&mut self) -> bool {
        let ok = drive(&mut self.conn, self.sender.ready()).await.is_ok();
        ok && !self.is_closed()
    }
}

async fn drive<F: std::future::Future>(
    conn: &mut Option<std::pin::Pin<Box<Connection>>>,
    fut: F,
) -> F::Output {
    tokio::pin!(fut);
    loop {
        let Some(c) = conn.as_mut() else {
            return fut.await;
        };
        tokio::select! {
            biased;
            out = &mut fut => return out,
            _ = c.as_mut() => *conn = None,
        }
    }
}

/// A request to the runtime with its `Host` and a fresh `X-Request-Id`, built from constants
/// rather than parsed by the request builder (one is on every delivery's path).
fn runtime_request(method: hyper::Method, path: &'static str, body: Bytes) -> Request<Full<Bytes>> {
    let mut id_text = uuid::Uuid::encode_buffer();
    let request_id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut id_text);
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = hyper::Uri::from_static(path);
    let headers = req.headers_mut();
    headers.insert(hyper::header::HOST, HeaderValue::from_static("localhost"));
    headers.insert(
        HeaderName::from_static(REQUEST_ID),
        HeaderValue::from_str(request_id).expect("a uuid is a header value"),
    );
    req
}

/// Pool of keep-alive connections to one runtime socket.
pub struct RuntimeClient {
    socket: PathBuf,
    pool: Mutex<Vec<Conn>>,
    max_body: usize,
}

impl RuntimeClient {
    pub fn new(socket: impl Into<PathBuf>, max_body: usize) -> Self {
        RuntimeClient {
            socket: socket.into(),
            pool: Mutex::new(Vec::new()),
            max_body,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The pool (a panic elsewhere never poisons it for good: it only holds connections).
    fn pool(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`Runtime::reachable`].
    pub async fn reachable(&self, ready_file: &Path) -> Result<(), String> {
        if !ready_file.exists() {
            return Err(format!(
                "ready file {} does not exist",
                ready_file.display()
            ));
        }
        match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(&self.socket)).await {
            Ok(Ok(_)) => Ok(()),
            // A full accept backlog: the runtime is there, busy.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Ok(()),
            Ok(Err(e)) => Err(format!("cannot connect to {}: {e}", self.socket.display())),
        }
    }

    async fn connect(&self) -> Result<Conn, RuntimeError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| RuntimeError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        Ok(Conn {
            sender,
            conn: Some(Box::pin(conn)),
        })
    }

    /// A ready connection: a pooled one if any is still usable, else a new one.
    async fn checkout(&self) -> Result<Conn, RuntimeError> {
        loop {
            let pooled = self.pool().pop();
            match pooled {
                Some(mut c) => {
                    if c.is_closed() {
                        continue;
                    }
                    if c.ready().await {
                        return Ok(c);
                    }
                }
                None => return self.connect().await,
            }
        }
    }

    fn checkin(&self, c: Conn) {
        if !c.is_closed() {
            self.pool().push(c);
        }
    }

    /// Drop every pooled connection (after a timeout the runtime may still answer late).
    pub fn reset(&self) {
        self.pool().clear();
    }

    /// Send `req` (made by [`runtime_request`]) and read the answer's head; an answer that
    /// echoes another `X-Request-Id` is refused.
    async fn request(
        &self,
        req: Request<Full<Bytes>>,
        deadline: Instant,
    ) -> Result<(hyper::Response<Incoming>, Conn), RuntimeError> {
        let request_id = req.headers()[REQUEST_ID].clone();
        let timeout = deadline.saturating_duration_since(Instant::now());
        let fut = async {
            let mut c = self.checkout().await?;
            let sent = c.sender.send_request(req);
            let resp = c.drive(sent).await?;
            Ok::<_, RuntimeError>((resp, c))
        };
        let (resp, conn) = tokio::time::timeout_at(deadline, fut)
            .await
            .map_err(|_| RuntimeError::Timeout(timeout))??;
        if let Some(got) = resp.headers().get(REQUEST_ID) {
            if got != request_id {
                // A stale answer: this connection is out of step; drop it.
                return Err(RuntimeError::RequestIdMismatch {
                    expected: String::from_utf8_lossy(request_id.as_bytes()).into_owned(),
                    got: String::from_utf8_lossy(got.as_bytes()).into_owned(),
                });
            }
        }
        Ok((resp, conn))
    }

    async fn read_body(
        &self,
        conn: &mut Conn,
        body: Incoming,
        deadline: Instant,
    ) -> Result<Bytes, RuntimeError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let collect = Limited::new(body, self.max_body).collect();
        let collected = tokio::time::timeout_at(deadline, conn.drive(collect))
            .await
            .map_err(|_| RuntimeError::Timeout(timeout))?;
        match collected {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) => {
                if e.is::<http_body_util::LengthLimitError>() {
                    Err(RuntimeError::BodyTooLarge(self.max_body))
                } else {
                    Err(RuntimeError::Malformed(format!("body read failed: {e}")))
                }
            }
        }
    }

    /// `POST /invoke` with the envelope bytes; answer within `deadline`.
    pub async fn invoke(&self, envelope: Bytes, deadline: Instant) -> Result<Reply, RuntimeError> {
        let mut req = runtime_request(hyper::Method::POST, "/invoke", envelope);
        req.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let (resp, mut conn) = self.request(req, deadline).await?;
        let status = resp.status();
        let is_sse = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if status == StatusCode::OK && is_sse {
            return Ok(Reply::Stream(Box::new(SseStream::new(
                resp.into_body(),
                deadline,
                self.max_body,
                conn,
            ))));
        }
        let body = self
            .read_body(&mut conn, resp.into_body(), deadline)
            .await?;
        self.checkin(conn);
        match status {
            StatusCode::OK => {
                let parsed: FramesBody = serde_json::from_slice(&body).map_err(|e| {
                    RuntimeError::Malformed(format!("200 body is not {{\"frames\": [...]}}: {e}"))
                })?;
                Ok(Reply::Frames(parsed.frames))
            }
            StatusCode::NO_CONTENT => Ok(Reply::Abort),
            StatusCode::BAD_REQUEST | StatusCode::INTERNAL_SERVER_ERROR => {
                let parsed: ErrorBody = serde_json::from_slice(&body).map_err(|e| {
                    RuntimeError::Malformed(format!(
                        "{} body is not an error object: {e}",
                        status.as_u16()
                    ))
                })?;
                if status == StatusCode::BAD_REQUEST {
                    Ok(Reply::BadRequest(parsed.into_info("MessageParsingError")))
                } else {
                    Ok(Reply::HandlerError(parsed.into_info("ProcessingError")))
                }
            }
            other => Err(RuntimeError::UnexpectedStatus {
                status: other.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            }),
        }
    }

    /// `GET /healthz`: true when the runtime answers 200.
    pub async fn healthz(&self, timeout: Duration) -> bool {
        let req = runtime_request(hyper::Method::GET, "/healthz", Bytes::new());
        let deadline = Instant::now() + timeout;
        match self.request(req, deadline).await {
            Ok((resp, mut conn)) => {
                let ok = resp.status() == StatusCode::OK;
                if self
                    .read_body(&mut conn, resp.into_body(), deadline)
                    .await
                    .is_ok()
                {
                    self.checkin(conn);
                }
                ok
            }
            Err(_) => false,
        }
    }

    /// Wait until the socket exists, `ready_file` exists and a connection succeeds.
    pub async fn wait_ready(
        &self,
        ready_file: &Path,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let start = Instant::now();
        let deadline = start + timeout;
        // Never wait silently: say what is missing after 2 s, then every 10 s.
        let mut next_report = start + Duration::from_secs(2);
        let mut reason;
        loop {
            reason = if !self.socket.exists() {
                format!("socket {} does not exist", self.socket.display())
            } else if !ready_file.exists() {
                format!("ready file {} does not exist", ready_file.display())
            } else {
                match UnixStream::connect(&self.socket).await {
                    Ok(_) => return Ok(()),
                    Err(e) => format!("cannot connect to {}: {e}", self.socket.display()),
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(RuntimeError::NotReady {
                    waited: start.elapsed(),
                    reason,
                });
            }
            if now >= next_report {
                tracing::info!(
                    waited_s = start.elapsed().as_secs(),
                    ?timeout,
                    %reason,
                    "still waiting for the runtime (is it running with the same ASYA_SOCKET_DIR? the wait is bounded by ASYA_RUNTIME_READY_TIMEOUT)"
                );
                next_report = now + Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[async_trait::async_trait]
impl Runtime for RuntimeClient {
    async fn invoke(&self, envelope: Bytes, deadline: Instant) -> Result<Reply, RuntimeError> {
        RuntimeClient::invoke(self, envelope, deadline).await
    }

    fn reset(&self) {
        RuntimeClient::reset(self)
    }

    async fn wait_ready(&self, ready_file: &Path, timeout: Duration) -> Result<(), RuntimeError> {
        RuntimeClient::wait_ready(self, ready_file, timeout).await
    }

    async fn reachable(&self, ready_file: &Path) -> Result<(), String> {
        RuntimeClient::reachable(self, ready_file).await
    }
}
