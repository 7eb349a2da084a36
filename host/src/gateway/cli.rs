//! `asya-host gateway | trace | send`: the logic behind the thin clap glue in `main.rs`,
//! and the reporter a standalone sidecar builds from its variables.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::client::{call, ClientError, Endpoint};
use super::otlp::OtlpReporter;
use super::reporter::Tee;
use super::{Gateway, HopEntry, KvStore, MemoryStore, TaskStore, TaskView};
use crate::config::{parse_listen_addr, vars, ConfigError, Reader, Source};
use crate::sidecar::Reporter;

/// Variables of the gateway.
pub mod gvars {
    pub const ADDR: &str = "ASYA_GATEWAY_ADDR";
    pub const FLOWS: &str = "ASYA_GATEWAY_FLOWS";
    pub const STORE: &str = "ASYA_GATEWAY_STORE";
    pub const TOKEN: &str = "ASYA_GATEWAY_TOKEN";
    pub const MAX_PAYLOAD_BYTES: &str = "ASYA_GATEWAY_MAX_PAYLOAD_BYTES";
    /// KV bucket of the nats store (default `asya-<namespace>-tasks`).
    pub const KV_BUCKET: &str = "ASYA_GATEWAY_KV_BUCKET";
    /// Where sidecars report (`http://gateway:8090`).
    pub const URL: &str = "ASYA_GATEWAY_URL";
}

/// Which task store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Nats,
}

/// `asya-host gateway` configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub addr: SocketAddr,
    pub flows: Option<PathBuf>,
    pub store: StoreKind,
    pub token: Option<String>,
    pub max_payload_bytes: usize,
    pub namespace: String,
    pub sink: String,
    pub sump: String,
    pub kv_bucket: String,
}

impl GatewayConfig {
    pub fn from_source(src: &dyn Source) -> Result<GatewayConfig, ConfigError> {
        let r = Reader(src);
        let addr_text = r.string(gvars::ADDR, ":8090");
        let addr = parse_listen_addr(&addr_text).map_err(|message| ConfigError {
            var: gvars::ADDR,
            message,
        })?;
        let store = match r.string(gvars::STORE, "memory").as_str() {
            "memory" => StoreKind::Memory,
            "nats" => StoreKind::Nats,
            other => {
                return Err(ConfigError {
                    var: gvars::STORE,
                    message: format!("unknown store {other:?} (memory or nats)"),
                })
            }
        };
        let namespace = r.string(vars::NAMESPACE, "default");
        crate::config::validate_actor_name(vars::NAMESPACE, &namespace)?;
        Ok(GatewayConfig {
            addr,
            flows: r.raw(gvars::FLOWS).map(PathBuf::from),
            store,
            token: r.raw(gvars::TOKEN),
            max_payload_bytes: r
                .parse(gvars::MAX_PAYLOAD_BYTES, super::DEFAULT_MAX_PAYLOAD_BYTES)?,
            kv_bucket: r.string(gvars::KV_BUCKET, &format!("asya-{namespace}-tasks")),
            sink: r.string(vars::ACTOR_SINK, "x-sink"),
            sump: r.string(vars::ACTOR_SUMP, "x-sump"),
            namespace,
        })
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayStartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Flows(#[from] super::FlowsError),
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    #[error(transparent)]
    Store(#[from] super::StoreError),
    #[error("cannot bind the gateway on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// `asya-host gateway`: NATS transport (or `ASYA_TRANSPORT`), the configured store, serve
/// until `shutdown`.
pub async fn run_gateway(
    src: &dyn Source,
    shutdown: CancellationToken,
) -> Result<(), GatewayStartError> {
    let cfg = GatewayConfig::from_source(src)?;
    let flows = match &cfg.flows {
        Some(p) => super::load_flows(p)?,
        None => super::Flows::new(),
    };
    let nats = crate::transport::nats::NatsTransport::from_source(src).await?;
    let store: Arc<dyn TaskStore> = match cfg.store {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Nats => Arc::new(KvStore::open(nats.client().clone(), &cfg.kv_bucket).await?),
    };
    let gw = Gateway::new(
        store,
        Arc::new(nats),
        cfg.namespace.clone(),
        flows,
        cfg.sink.clone(),
        cfg.sump.clone(),
    );
    gw.set_max_payload_bytes(cfg.max_payload_bytes);
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| GatewayStartError::Bind {
            addr: cfg.addr,
            source,
        })?;
    super::serve(listener, gw, cfg.token, shutdown).await;
    Ok(())
}

/// The reporter of a standalone sidecar: HTTP to `ASYA_GATEWAY_URL` and/or OTLP spans to
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` when neither is set.
pub fn sidecar_reporter(
    src: &dyn Source,
    cfg: &crate::config::SidecarConfig,
) -> Result<Option<Arc<dyn Reporter>>, ConfigError> {
    let r = Reader(src);
    let mut out: Vec<Arc<dyn Reporter>> = Vec::new();
    if let Some(url) = r.raw(gvars::URL) {
        let rep = super::HttpReporter::new(&url, r.raw(gvars::TOKEN), &cfg.namespace, &cfg.sump)
            .map_err(|e| ConfigError {
                var: gvars::URL,
                message: e.to_string(),
            })?;
        out.push(Arc::new(rep));
    }
    if let Some(ep) = r.raw(super::otlp::ENDPOINT_VAR) {
        let service =
            r.0.get(super::otlp::SERVICE_NAME_VAR)
                .unwrap_or_else(|| format!("asya-{}", cfg.actor));
        let rep = OtlpReporter::new(&ep, &service).map_err(|e| ConfigError {
            var: super::otlp::ENDPOINT_VAR,
            message: e.to_string(),
        })?;
        out.push(Arc::new(rep));
    }
    Ok(match out.len() {
        0 => None,
        1 => out.pop(),
        _ => Some(Arc::new(Tee(out))),
    })
}

/// A CLI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("gateway answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("unexpected gateway answer: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("invalid JSON payload: {0}")]
    Payload(serde_json::Error),
}

const CLI_TIMEOUT: Duration = Duration::from_secs(10);

async fn get_json(ep: &Endpoint, path: &str, token: Option<&str>) -> Result<Value, CliError> {
    let (s, b) = call(ep, Method::GET, path, token, None, CLI_TIMEOUT).await?;
    if !s.is_success() {
        return Err(CliError::Status {
            status: s.as_u16(),
            body: String::from_utf8_lossy(&b).trim().to_owned(),
        });
    }
    Ok(serde_json::from_slice(&b)?)
}

/// `asya-host trace TASK_ID`: the hop-by-hop timeline as a table.
pub async fn trace(gateway: &str, token: Option<&str>, id: &str) -> Result<String, CliError> {
    let ep = Endpoint::parse(gateway)?;
    let v = get_json(&ep, &format!("/tasks/{id}/trace"), token).await?;
    let task: TaskView = serde_json::from_value(v["task"].clone())?;
    let timeline: Vec<HopEntry> = serde_json::from_value(v["timeline"].clone())?;
    Ok(format_trace(&task, &timeline))
}

/// The timeline table printed by `asya-host trace`.
pub fn format_trace(task: &TaskView, timeline: &[HopEntry]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "task {}  status {}  trace {}  actors {}/{}",
        task.id,
        task.status.as_str(),
        task.trace_id,
        task.actors_completed,
        task.total_actors
    );
    let mut hops: Vec<&HopEntry> = timeline.iter().collect();
    hops.sort_by(|a, b| a.received_at.cmp(&b.received_at));
    let t0 = hops
        .first()
        .and_then(|h| chrono::DateTime::parse_from_rfc3339(&h.received_at).ok());
    let _ = writeln!(
        out,
        "{:<3} {:<20} {:<10} {:>10} {:>11} {:>11}  {:<24} ERROR",
        "#", "ACTOR", "ENVELOPE", "RECEIVED", "RUNTIME", "TOTAL", "ROUTED TO"
    );
    for (i, h) in hops.iter().enumerate() {
        let offset = match (
            t0,
            chrono::DateTime::parse_from_rfc3339(&h.received_at).ok(),
        ) {
            (Some(a), Some(b)) => {
                format!(
                    "+{:.1}ms",
                    (b - a).num_microseconds().unwrap_or(0) as f64 / 1e3
                )
            }
            _ => h.received_at.clone(),
        };
        let runtime = h
            .runtime_ms
            .map(|r| format!("{r:.1}ms"))
            .unwrap_or_else(|| "-".into());
        let total = if h.kind.as_deref() == Some("final") {
            "final".to_owned()
        } else {
            format!("{:.1}ms", h.duration_ms)
        };
        let mut routed = h.routed_to.join(",");
        if h.retried {
            routed = format!("retry (attempt {})", h.attempt);
        }
        if routed.is_empty() {
            routed = "-".into();
        }
        let err = h
            .error
            .as_ref()
            .map(|e| format!("{}: {}", e.kind, e.message))
            .unwrap_or_default();
        let env: String = h.envelope_id.chars().take(8).collect();
        let _ = writeln!(
            out,
            "{:<3} {:<20} {:<10} {:>10} {:>11} {:>11}  {:<24} {}",
            i + 1,
            h.actor,
            env,
            offset,
            runtime,
            total,
            routed,
            err
        );
    }
    if let Some(e) = &task.error {
        let _ = writeln!(out, "error: {}: {}", e.kind, e.message);
        if let Some(tb) = &e.traceback {
            let _ = writeln!(out, "{}", tb.trim_end());
        }
    }
    out
}

/// `asya-host send FLOW JSON [--wait]`: submit one task; with `wait`, poll until it is final.
pub async fn send(
    gateway: &str,
    token: Option<&str>,
    flow: &str,
    payload: &str,
    timeout: Option<Duration>,
    wait: Option<Duration>,
) -> Result<TaskView, CliError> {
    let ep = Endpoint::parse(gateway)?;
    let payload: Value = serde_json::from_str(payload).map_err(CliError::Payload)?;
    let req = super::SubmitRequest {
        flow: Some(flow.to_owned()),
        route: None,
        payload,
        timeout,
    };
    let body = Bytes::from(serde_json::to_vec(&req)?);
    let (s, b) = call(&ep, Method::POST, "/tasks", token, Some(body), CLI_TIMEOUT).await?;
    if !s.is_success() {
        return Err(CliError::Status {
            status: s.as_u16(),
            body: String::from_utf8_lossy(&b).trim().to_owned(),
        });
    }
    let mut view: TaskView = serde_json::from_slice(&b)?;
    let Some(wait) = wait else { return Ok(view) };
    let deadline = tokio::time::Instant::now() + wait;
    let mut every = Duration::from_millis(20);
    while !view.status.is_final() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(every).await;
        every = (every * 2).min(Duration::from_millis(500));
        view = serde_json::from_value(get_json(&ep, &format!("/tasks/{}", view.id), token).await?)?;
    }
    Ok(view)
}

/// Why `send --wait` stopped waiting for a task that is not final: one line naming the
/// bound that was reached, where the task is, and how to look further.
pub fn stopped_waiting(view: &TaskView, waited: Duration, by_timeout_flag: bool) -> String {
    let bound = if by_timeout_flag {
        "the --timeout"
    } else {
        "the default wait; set --timeout"
    };
    let status = view.status.as_str();
    let place = match (&view.current_actor_name, view.status) {
        (Some(actor), super::TaskStatus::Paused) => {
            format!("paused at actor {actor:?} (it waits for a resume)")
        }
        (Some(actor), _) if !actor.is_empty() => format!(
            "still {status} at actor {actor:?} ({} of {} actors done); is a sidecar consuming its queue, and its runtime ready?",
            view.actors_completed, view.total_actors
        ),
        _ => format!("still {status}: no actor has reported it yet; are the sidecars running?"),
    };
    format!(
        "stopped waiting after {} ({bound}): task {} is {place} `asya-host trace {}` shows its hops",
        humantime::format_duration(waited),
        view.id,
        view.id
    )
}

#[cfg(test)]
mod send_tests {
    use super::*;
    use crate::gateway::TaskStatus;

    fn view(status: TaskStatus, actor: Option<&str>) -> TaskView {
        TaskView {
            id: "t1".into(),
            status,
            current_actor_name: actor.map(str::to_owned),
            actors_completed: 1,
            total_actors: 2,
            result: None,
            error: None,
            created_at: String::new(),
            updated_at: String::new(),
            trace_id: String::new(),
            flow: None,
            deadline_at: None,
        }
    }

    #[test]
    fn stopped_waiting_names_the_bound_and_the_actor() {
        let line = stopped_waiting(
            &view(TaskStatus::Running, Some("count")),
            Duration::from_secs(10),
            true,
        );
        assert_eq!(
            line,
            "stopped waiting after 10s (the --timeout): task t1 is still running at actor \"count\" (1 of 2 actors done); is a sidecar consuming its queue, and its runtime ready? `asya-host trace t1` shows its hops"
        );
        let line = stopped_waiting(
            &view(TaskStatus::Pending, None),
            Duration::from_secs(300),
            false,
        );
        assert!(
            line.contains("5m (the default wait; set --timeout)"),
            "{line}"
        );
        assert!(line.contains("no actor has reported it yet"), "{line}");
        let line = stopped_waiting(
            &view(TaskStatus::Paused, Some("review")),
            Duration::from_secs(1),
            true,
        );
        assert!(line.contains("paused at actor \"review\""), "{line}");
    }
}
