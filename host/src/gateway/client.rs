//! A small HTTP/1.1 client (plain `http://`, one connection per request, every step
//! bounded) and the [`HttpReporter`] that sidecars use to report to a remote gateway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::reporter::{Naming, WireReport};
use crate::sidecar::{Report, Reporter};

/// Cap on a response body read by the client.
const MAX_RESPONSE: usize = 64 << 20;

/// A failed HTTP call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad url {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("{url}: {message}")]
    Io { url: String, message: String },
    #[error("{url}: timed out after {after:?}")]
    Timeout { url: String, after: Duration },
}

/// `http://host:port/base` split into authority and path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub authority: String,
    pub base: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, ClientError> {
        let bad = |m: &str| ClientError::Url {
            url: url.to_owned(),
            message: m.to_owned(),
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("missing host"));
        }
        let authority = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Endpoint {
            authority,
            base: path.trim_end_matches('/').to_owned(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.authority, self.base, path)
    }
}

/// One request. Returns the status and body.
pub async fn call(
    ep: &Endpoint,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), ClientError> {
    let url = ep.url(path);
    let work = async {
        let io_err = |e: &dyn std::fmt::Display| ClientError::Io {
            url: url.clone(),
            message: e.to_string(),
        };
        let stream = tokio::net::TcpStream::connect(&ep.authority)
            .await
            .map_err(|e| io_err(&e))?;
        let _ = stream.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| io_err(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{}", ep.base, path))
            .header(header::HOST, &ep.authority);
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        let req = b
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| io_err(&e))?;
        let resp = send.send_request(req).await.map_err(|e| io_err(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| io_err(&e))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout {
            url: url.clone(),
            after: timeout,
        })?
}

/// Reports queued before new ones are dropped.
pub const REPORTER_QUEUE: usize = 4096;
/// Reports per `POST /reports`.
const BATCH: usize = 256;
/// How long one batch is retried while the gateway is unreachable (a gateway restart).
const RETRY_FOR: Duration = Duration::from_secs(60);
const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// Queues reports in a bounded channel and POSTs them to `{url}/reports` in the background.
/// Never blocks: when the queue is full, the report is dropped and counted.
pub struct HttpReporter {
    tx: mpsc::Sender<WireReport>,
    naming: Naming,
    dropped: Arc<AtomicU64>,
}

impl HttpReporter {
    /// Must be called inside a tokio runtime.
    pub fn new(url: &str, token: Option<String>, sump: &str) -> Result<HttpReporter, ClientError> {
        let ep = Endpoint::parse(url)?;
        let (tx, rx) = mpsc::channel(REPORTER_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(post_loop(ep, token, rx));
        Ok(HttpReporter {
            tx,
            naming: Naming {
                sump: sump.to_owned(),
            },
            dropped,
        })
    }

    /// Reports dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Reporter for HttpReporter {
    fn report(&self, report: Report) {
        let r = WireReport::from_report(report, &self.naming);
        if self.tx.try_send(r).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(dropped = n, "gateway report queue full; dropping reports");
            }
        }
    }
}

async fn post_loop(ep: Endpoint, token: Option<String>, mut rx: mpsc::Receiver<WireReport>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let body = Bytes::from(serde_json::to_vec(&batch).expect("reports serialise"));
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            match call(
                &ep,
                Method::POST,
                "/reports",
                token.as_deref(),
                Some(body.clone()),
                POST_TIMEOUT,
            )
            .await
            {
                Ok((s, _)) if s.is_success() => break,
                Ok((s, b)) if s.is_client_error() => {
                    warn!(status = %s, body = %String::from_utf8_lossy(&b), "gateway refused reports; dropping them");
                    break;
                }
                r => {
                    if started.elapsed() > RETRY_FOR {
                        warn!(
                            reports = batch.len(),
                            "gateway unreachable; dropping reports"
                        );
                        break;
                    }
                    debug!(result = ?r.map(|(s, _)| s), "posting reports failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://127.0.0.1:8090/").unwrap();
        assert_eq!(e.authority, "127.0.0.1:8090");
        assert_eq!(e.url("/tasks"), "http://127.0.0.1:8090/tasks");
        let e = Endpoint::parse("http://gw/api").unwrap();
        assert_eq!(e.url("/tasks"), "http://gw:80/api/tasks");
        assert!(Endpoint::parse("https://x").is_err());
    }
}
