//! Admin HTTP server: `/metrics`, `/healthz` (live), `/readyz` (runtime reachable,
//! transport connected, plugins loaded), `/debug/inflight`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::sidecar::Inflight;

/// One named readiness check (`runtime:<actor>`, `transport`, `plugins`).
pub type ReadyCheck = (String, Arc<dyn Fn() -> bool + Send + Sync>);

/// What the admin server reports on.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub inflight: Arc<Inflight>,
    pub checks: Vec<ReadyCheck>,
    /// `/healthz` checks (a sidecar whose worker died fails its own).
    pub live: Vec<ReadyCheck>,
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn route(state: &AdminState, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            for (name, check) in &state.checks {
                let l = crate::metrics::CheckLabel {
                    check: name.clone(),
                };
                state.metrics.ready.get_or_create(&l).set(check() as i64);
            }
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(),
            )
        }
        "/healthz" => {
            let failing: Vec<&str> = state
                .live
                .iter()
                .filter(|(_, check)| !check())
                .map(|(name, _)| name.as_str())
                .collect();
            if failing.is_empty() {
                reply(StatusCode::OK, "application/json", r#"{"status":"ok"}"#)
            } else {
                let body = serde_json::json!({ "status": "failing", "failing": failing });
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    body.to_string(),
                )
            }
        }
        "/readyz" => {
            let results: serde_json::Map<String, serde_json::Value> = state
                .checks
                .iter()
                .map(|(name, check)| (name.clone(), serde_json::Value::Bool(check())))
                .collect();
            let ready = results
                .values()
                .all(|v| v == &serde_json::Value::Bool(true));
            let body = serde_json::json!({
                "status": if ready { "ready" } else { "not_ready" },
                "checks": results,
            });
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(code, "application/json", body.to_string())
        }
        "/debug/inflight" => {
            let rows = state.inflight.snapshot();
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&serde_json::json!({ "inflight": rows }))
                    .expect("rows serialise"),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serve until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin server listening");
    }
    let state = Arc::new(state);
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = route(&state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection failed");
            }
        });
    }
}
