//! Alert rules and the Grafana dashboard, on the queries of seed 000 and our own
//! `asya_actor_queue_depth` / `asya_actor_ready` gauges.
//!
//! The rules are rendered per flow (the "queue at max replicas" rule needs each actor's
//! maximum): the same groups go into the `PrometheusRule` object and into the plain rules
//! file (`asya-alerts.rules.yml` in `render k8s -o DIR`; `deploy/prometheus/` holds the one
//! of `examples/reviews`).

use serde_json::{json, Value};

use super::k8s::LAG_PER_SLOT;
use super::queue_name;
use crate::mesh::deploy::Scaling;
use crate::mesh::flowfile::FlowFile;

/// The Grafana dashboard (`deploy/grafana/asya-dashboard.json`).
pub const DASHBOARD: &str = include_str!("../../../deploy/grafana/asya-dashboard.json");
/// Name of the plain rules file written by `render k8s -o DIR`.
pub const RULES_FILE: &str = "asya-alerts.rules.yml";
/// p95 processing time above which `AsyaProcessingSlow` fires.
pub const P95_THRESHOLD_SECS: f64 = 10.0;
/// Failed / received above which `AsyaErrorRatioHigh` fires.
pub const ERROR_RATIO: f64 = 0.05;

/// One alert: its rule, and the queries that must return series on a live mesh for the rule
/// to be able to fire (each metric it reads, without the threshold).
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub name: String,
    pub expr: String,
    pub for_: &'static str,
    pub severity: &'static str,
    pub summary: String,
    pub description: String,
    pub signals: Vec<String>,
}

/// The alerts of `flow`.
pub fn alerts(flow: &FlowFile) -> Vec<Alert> {
    let ns = &flow.namespace;
    let queues = format!("queue=~\"asya-{ns}-.*\"");
    let sump = queue_name(ns, "x-sump");
    let mut out = vec![
        Alert {
            name: "AsyaSumpGrowing".into(),
            expr: format!(
                "sum by (destination_queue) (rate(asya_actor_messages_sent_total{{message_type=\"sump\", destination_queue=\"{sump}\"}}[10m])) > 0"
            ),
            for_: "15m",
            severity: "warning",
            summary: "envelopes keep landing in x-sump".into(),
            description: "{{ $value | humanize }}/s envelopes went to {{ $labels.destination_queue }} over the last 10 minutes: a handler fails systematically. Read the x-sump logs (kubectl logs deployment/x-sump) for the error type.".into(),
            signals: vec![format!(
                "asya_actor_messages_sent_total{{message_type=\"sump\", destination_queue=\"{sump}\"}}"
            )],
        },
        Alert {
            name: "AsyaErrorRatioHigh".into(),
            expr: format!(
                "sum by (queue) (rate(asya_actor_messages_failed_total{{{queues}}}[5m])) / sum by (queue) (rate(asya_actor_messages_received_total{{{queues}}}[5m])) > {ERROR_RATIO}"
            ),
            for_: "10m",
            severity: "warning",
            summary: "more than 5% of an actor's messages fail".into(),
            description: "{{ $labels.queue }}: {{ $value | humanizePercentage }} of received messages failed over 5 minutes (asya_actor_messages_failed_total by reason says why).".into(),
            signals: vec![
                format!("asya_actor_messages_failed_total{{{queues}}}"),
                format!("asya_actor_messages_received_total{{{queues}}}"),
            ],
        },
        Alert {
            name: "AsyaProcessingSlow".into(),
            expr: format!(
                "histogram_quantile(0.95, sum by (queue, le) (rate(asya_actor_processing_duration_seconds_bucket{{{queues}}}[5m]))) > {P95_THRESHOLD_SECS}"
            ),
            for_: "15m",
            severity: "warning",
            summary: "p95 processing time above 10s".into(),
            description: "{{ $labels.queue }}: p95 receive-to-send time is {{ $value | humanizeDuration }}.".into(),
            signals: vec![format!(
                "asya_actor_processing_duration_seconds_bucket{{{queues}}}"
            )],
        },
        Alert {
            name: "AsyaSidecarNotReady".into(),
            expr: "asya_actor_ready == 0".into(),
            for_: "5m",
            severity: "critical",
            summary: "a sidecar (or the gateway) is not ready".into(),
            description: "{{ $labels.pod }}: readiness check {{ $labels.check }} has failed for 5 minutes (runtime not answering, broker unreachable, or plugins not loaded). See /readyz and the pod's logs.".into(),
            signals: vec!["asya_actor_ready".into()],
        },
    ];
    for a in &flow.actors {
        let max = match a.deploy.scaling {
            Scaling::Auto { max, .. } => max,
            Scaling::Fixed(n) => n,
        };
        let q = queue_name(ns, &a.name);
        let backlog = LAG_PER_SLOT * a.concurrency as u64 * u64::from(max.max(1));
        out.push(Alert {
            name: "AsyaQueueAtMaxReplicas".into(),
            expr: format!(
                "(max by (queue) (asya_actor_queue_depth{{queue=\"{q}\"}}) > {backlog}) and on (queue) (count by (queue) (asya_actor_active_messages{{queue=\"{q}\"}}) >= {max})"
            ),
            for_: "15m",
            severity: "warning",
            summary: format!("actor {} is at its maximum of {max} replicas with a backlog", a.name),
            description: "{{ $labels.queue }} holds {{ $value }} messages while every allowed replica runs: raise max in the flow file or make the handler faster.".into(),
            signals: vec![
                format!("asya_actor_queue_depth{{queue=\"{q}\"}}"),
                format!("asya_actor_active_messages{{queue=\"{q}\"}}"),
            ],
        });
    }
    out
}

/// A Prometheus rules file (`groups:`), also the `spec` of the `PrometheusRule`.
pub fn rules_file(flow: &FlowFile) -> Value {
    let rules: Vec<Value> = alerts(flow)
        .into_iter()
        .map(|a| {
            json!({
                "alert": a.name,
                "expr": a.expr,
                "for": a.for_,
                "labels": {"severity": a.severity, "asya_namespace": flow.namespace},
                "annotations": {"summary": a.summary, "description": a.description},
            })
        })
        .collect();
    json!({"groups": [{"name": format!("asya-{}", flow.namespace), "rules": rules}]})
}

/// Every query of the dashboard, with its variables resolved (`$queue` → `.*`).
pub fn dashboard_queries() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is valid JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    panel["title"].as_str().unwrap_or("").to_owned(),
                    expr.replace("$queue", ".*"),
                ));
            }
        }
    }
    out
}
