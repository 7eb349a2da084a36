//! One span per hop, exported over OTLP/HTTP JSON (`OTEL_EXPORTER_OTLP_ENDPOINT`):
//! `POST {endpoint}/v1/traces` with the OTLP JSON encoding, batched from a bounded queue.
//!
//! A hand-rolled exporter instead of the `opentelemetry` crates: the host already has
//! hyper, the span shape is fixed (one per hop, attributes from the hop report), and the
//! opentelemetry + tonic/reqwest stack would add minutes to a 2-core build.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::client::{call, ClientError, Endpoint};
use crate::sidecar::{Report, Reporter};

// Its variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`) are
// `super::cli::gvars::OTLP_*`.

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// Exports a span per hop. Never blocks: drops and counts when the queue is full.
pub struct OtlpReporter {
    tx: mpsc::Sender<Value>,
    dropped: Arc<AtomicU64>,
}

impl OtlpReporter {
    /// `endpoint` is the collector's base URL (`http://host:4318`). Must be called inside a
    /// tokio runtime.
    pub fn new(endpoint: &str, service: &str) -> Result<OtlpReporter, ClientError> {
        let ep = Endpoint::parse(endpoint)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(export_loop(ep, service.to_owned(), rx));
        Ok(OtlpReporter {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A 32-hex trace id for any `trace_id` header (uuids and W3C ids kept, others hashed).
pub fn otlp_trace_id(trace_id: &str) -> String {
    if trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return trace_id.to_ascii_lowercase();
    }
    if let Ok(u) = uuid::Uuid::parse_str(trace_id) {
        return u.simple().to_string();
    }
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, trace_id.as_bytes())
        .simple()
        .to_string()
}

fn span_id(parts: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, parts.as_bytes())
        .simple()
        .to_string()[..16]
        .to_owned()
}

fn attr(key: &str, v: Value) -> Value {
    let value = match v {
        Value::String(s) => json!({ "stringValue": s }),
        Value::Bool(b) => json!({ "boolValue": b }),
        Value::Number(n) if n.is_i64() => json!({ "intValue": n.to_string() }),
        Value::Number(n) => json!({ "doubleValue": n.as_f64() }),
        other => json!({ "stringValue": other.to_string() }),
    };
    json!({ "key": key, "value": value })
}

/// The OTLP span of one hop.
pub fn hop_span(h: &crate::sidecar::HopReport) -> Value {
    let trace_id = otlp_trace_id(&h.trace_id);
    let start = h.received_at.timestamp_nanos_opt().unwrap_or(0);
    let end = start + h.duration.as_nanos() as i64;
    let mut attrs = vec![
        attr("asya.actor", json!(h.actor)),
        attr("asya.envelope_id", json!(h.envelope_id)),
        attr("asya.attempt", json!(h.attempt)),
        attr("asya.retried", json!(h.retried)),
        attr(
            "asya.routed_to",
            json!(h
                .sent
                .iter()
                .map(|(q, _)| q.as_str())
                .collect::<Vec<_>>()
                .join(",")),
        ),
    ];
    if let Some(p) = &h.parent_id {
        attrs.push(attr("asya.parent_id", json!(p)));
    }
    let mut events = vec![json!({"timeUnixNano": start.to_string(), "name": "received"})];
    if let Some(rt) = h.runtime {
        attrs.push(attr("asya.runtime_ms", json!(rt.as_secs_f64() * 1e3)));
        events.push(json!({
            "timeUnixNano": (end - rt.as_nanos() as i64).max(start).to_string(),
            "name": "invoke",
            "attributes": [attr("duration_ms", json!(rt.as_secs_f64() * 1e3))],
        }));
    }
    events.push(json!({"timeUnixNano": end.to_string(), "name": "routed"}));
    let status = match &h.error {
        Some(e) => json!({"code": 2, "message": format!("{}: {}", e.kind, e.message)}),
        None => json!({"code": 1}),
    };
    json!({
        "traceId": trace_id,
        "spanId": span_id(&format!("{}:{}:{}:{}", h.envelope_id, h.actor, h.attempt, start)),
        "parentSpanId": super::root_span_id(&trace_id),
        "name": format!("hop {}", h.actor),
        "kind": 5,
        "startTimeUnixNano": start.to_string(),
        "endTimeUnixNano": end.to_string(),
        "attributes": attrs,
        "events": events,
        "status": status,
    })
}

impl Reporter for OtlpReporter {
    fn report(&self, report: Report) {
        let Report::Hop(h) = report else { return };
        if self.tx.try_send(hop_span(&h)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The OTLP JSON request body for `spans`.
pub fn export_body(service: &str, spans: Vec<Value>) -> Value {
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [attr("service.name", json!(service))]},
            "scopeSpans": [{
                "scope": {"name": "asya-host", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    })
}

async fn export_loop(ep: Endpoint, service: String, mut rx: mpsc::Receiver<Value>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let n = batch.len();
        let body = export_body(&service, std::mem::take(&mut batch));
        let body = Bytes::from(serde_json::to_vec(&body).expect("spans serialise"));
        // One retry: tracing is best effort and must not pile up.
        for attempt in 0..2 {
            match call(
                &ep,
                Method::POST,
                "/v1/traces",
                None,
                Some(body.clone()),
                POST_TIMEOUT,
            )
            .await
            {
                Ok((s, _)) if s.is_success() => break,
                r => {
                    if attempt == 1 {
                        warn!(spans = n, result = ?r.map(|(s, _)| s), "OTLP export failed; spans dropped");
                    } else {
                        debug!("OTLP export failed; retrying once");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
}
