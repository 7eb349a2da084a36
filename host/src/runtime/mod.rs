//! Client for the runtime protocol (SPEC §3): HTTP/1.1 over a Unix socket with keep-alive,
//! HTTP/1.0 and close-delimited responses accepted, JSON frames, 204/400/500, SSE streams.
//!
//! Every request carries a fresh `X-Request-Id`; a response that echoes a different id is a
//! stale response on a reused connection and is rejected (the connection is dropped).
//! A broken or truncated response is an error, never a panic.

mod http;
mod sse;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::envelope::{ErrorInfo, Frame};
use http::Conn;
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
    /// The connection failed before any byte of the answer (see [`RuntimeError::is_lost`]).
    #[error("runtime connection failed: {0}")]
    Connection(#[source] std::io::Error),
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
        matches!(self, RuntimeError::Connection(_))
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
        Conn::connect(&self.socket)
            .await
            .map_err(|source| RuntimeError::Connect {
                path: self.socket.clone(),
                source,
            })
    }

    /// A connection: a pooled one if any is still usable, else a new one.
    async fn checkout(&self) -> Result<Conn, RuntimeError> {
        loop {
            let pooled = self.pool().pop();
            match pooled {
                Some(mut c) => {
                    if c.is_reusable() {
                        return Ok(c);
                    }
                }
                None => return self.connect().await,
            }
        }
    }

    fn checkin(&self, c: Conn) {
        self.pool().push(c);
    }

    /// Drop every pooled connection (after a timeout the runtime may still answer late).
    pub fn reset(&self) {
        self.pool().clear();
    }

    /// Send `POST /invoke` with a fresh `X-Request-Id` and read the answer's head; an answer
    /// that echoes another id is refused (its connection is dropped: it is out of step).
    async fn request(&self, envelope: &[u8]) -> Result<(http::Head, Conn), RuntimeError> {
        let mut id_text = uuid::Uuid::encode_buffer();
        let request_id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut id_text);
        let mut c = self.checkout().await?;
        c.send_invoke(envelope, request_id).await?;
        let head = c.read_head().await?;
        if let Some(got) = &head.request_id {
            if got != request_id.as_bytes() {
                return Err(RuntimeError::RequestIdMismatch {
                    expected: request_id.to_owned(),
                    got: String::from_utf8_lossy(got).into_owned(),
                });
            }
        }
        Ok((head, c))
    }

    /// The whole body of `head`'s answer; the connection goes back to the pool when the
    /// answer allows it.
    async fn read_body(&self, head: &http::Head, mut c: Conn) -> Result<Bytes, RuntimeError> {
        let (body, reusable) = c.read_body(head, self.max_body).await?;
        if reusable {
            self.checkin(c);
        }
        Ok(body)
    }

    /// `POST /invoke` with the envelope bytes; answer within `deadline`.
    pub async fn invoke(&self, envelope: Bytes, deadline: Instant) -> Result<Reply, RuntimeError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let call = async {
            let (head, conn) = self.request(&envelope).await?;
            if head.status == 200 && head.event_stream {
                let body = head.body();
                return Ok(Err(SseStream::new(conn, body, deadline, self.max_body)));
            }
            let body = self.read_body(&head, conn).await?;
            Ok(Ok((head.status, body)))
        };
        let (status, body) = match tokio::time::timeout_at(deadline, call).await {
            Err(_) => return Err(RuntimeError::Timeout(timeout)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Err(stream))) => return Ok(Reply::Stream(Box::new(stream))),
            Ok(Ok(Ok(answer))) => answer,
        };
        match status {
            200 => {
                let parsed: FramesBody = crate::envelope::from_json_bytes(&body).map_err(|e| {
                    RuntimeError::Malformed(format!("200 body is not {{\"frames\": [...]}}: {e}"))
                })?;
                Ok(Reply::Frames(parsed.frames))
            }
            204 => Ok(Reply::Abort),
            400 | 500 => {
                let parsed: ErrorBody = serde_json::from_slice(&body).map_err(|e| {
                    RuntimeError::Malformed(format!("{status} body is not an error object: {e}"))
                })?;
                if status == 400 {
                    Ok(Reply::BadRequest(parsed.into_info("MessageParsingError")))
                } else {
                    Ok(Reply::HandlerError(parsed.into_info("ProcessingError")))
                }
            }
            other => Err(RuntimeError::UnexpectedStatus {
                status: other,
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            }),
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
