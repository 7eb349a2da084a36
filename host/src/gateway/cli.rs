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
use crate::queue::EndActors;
use crate::sidecar::Reporter;
use crate::transport::nats::{NatsConfig, NatsTransport};
use crate::transport::{Transport, TransportSettings};

/// Variables of the gateway (and of the sidecar's reporting).
pub mod gvars {
    use crate::config::Var;

    pub const ADDR: Var = Var::new("ASYA_GATEWAY_ADDR", ":8090", "listen address");
    pub const FLOWS: Var = Var::optional(
        "ASYA_GATEWAY_FLOWS",
        "TOML file whose [flows] table names routes",
    );
    pub const STORE: Var = Var::new(
        "ASYA_GATEWAY_STORE",
        "memory",
        "task store: memory, or nats (JetStream key-value; survives a restart)",
    );
    pub const TOKEN: Var = Var::optional(
        "ASYA_GATEWAY_TOKEN",
        "bearer token the task API requires (sent by sidecars, trace and send)",
    );
    pub const MAX_PAYLOAD_BYTES: Var = Var::new(
        "ASYA_GATEWAY_MAX_PAYLOAD_BYTES",
        "1048576",
        "larger task payloads get 413",
    );
    pub const KV_BUCKET: Var = Var::derived(
        "ASYA_GATEWAY_KV_BUCKET",
        "asya-<namespace>-tasks",
        "KV bucket of the nats store",
    );
    pub const URL: Var = Var::optional(
        "ASYA_GATEWAY_URL",
        "gateway the sidecar reports to (http://host:8090); never blocks routing",
    );
    pub const OTLP_ENDPOINT: Var = Var::optional(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "export one span per hop over OTLP/HTTP (JSON)",
    );
    pub const OTLP_SERVICE_NAME: Var = Var::derived(
        "OTEL_SERVICE_NAME",
        "asya-<actor>",
        "service name of the exported spans",
    );

    pub const REPORT_TOKEN: Var = Var::derived(
        "ASYA_GATEWAY_REPORT_TOKEN",
        "ASYA_GATEWAY_TOKEN",
        "bearer token of POST /reports (sidecars); a client token cannot forge reports",
    );
    pub const AUTH: Var = Var::optional(
        "ASYA_GATEWAY_AUTH",
        "none: serve without tokens on a non-loopback address (the explicit opt-out)",
    );
    pub const READ_TIMEOUT: Var = Var::new(
        "ASYA_GATEWAY_READ_TIMEOUT",
        "10s",
        "bound on reading a request's head, and separately its body",
    );
    pub const MAX_CONNECTIONS: Var = Var::new(
        "ASYA_GATEWAY_MAX_CONNECTIONS",
        "1024",
        "connections served at once; more are answered 503",
    );
    pub const RETENTION: Var = Var::new(
        "ASYA_GATEWAY_RETENTION",
        "24h",
        "how long a finished task is kept (the nats store's bucket max_age)",
    );
    pub const MCP_WAIT: Var = Var::new(
        "ASYA_GATEWAY_MCP_WAIT",
        "5s",
        "how long an MCP tools/call waits for its task before answering with the task form",
    );
    pub const MAX_TASKS: Var = Var::new(
        "ASYA_GATEWAY_MAX_TASKS",
        "100000",
        "tasks the memory store holds at most (oldest finished dropped first)",
    );

    /// The gateway's own variables, in `--help` order.
    pub const GATEWAY: &[Var] = &[
        ADDR,
        FLOWS,
        STORE,
        TOKEN,
        REPORT_TOKEN,
        AUTH,
        READ_TIMEOUT,
        MAX_CONNECTIONS,
        RETENTION,
        MAX_TASKS,
        MAX_PAYLOAD_BYTES,
        KV_BUCKET,
        MCP_WAIT,
    ];
    /// Where a sidecar reports.
    pub const REPORTING: &[Var] = &[URL, REPORT_TOKEN, TOKEN, OTLP_ENDPOINT, OTLP_SERVICE_NAME];
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
    /// `ASYA_GATEWAY_TOKEN`: required by the task API.
    pub token: Option<String>,
    /// `ASYA_GATEWAY_REPORT_TOKEN` (else `token`): required by `POST /reports`.
    pub report_token: Option<String>,
    /// `ASYA_GATEWAY_AUTH=none`: the operator chose to serve without tokens.
    pub auth_none: bool,
    pub read_timeout: Duration,
    pub max_connections: usize,
    pub retention: Duration,
    pub max_tasks: usize,
    pub max_payload_bytes: usize,
    /// `ASYA_GATEWAY_MCP_WAIT`: how long `/mcp` tools/call waits before the task form.
    pub mcp_wait: Duration,
    pub namespace: String,
    pub ends: EndActors,
    pub kv_bucket: String,
    /// `ASYA_METRICS_ADDR`: the gateway's `/metrics` (queue depth of its flows' actors); off
    /// unless set.
    pub metrics_addr: Option<SocketAddr>,
    pub metrics_namespace: String,
}

impl GatewayConfig {
    pub fn from_source(src: &dyn Source) -> Result<GatewayConfig, ConfigError> {
        let r = Reader(src);
        let addr = parse_listen_addr(&r.string(gvars::ADDR)).map_err(|m| gvars::ADDR.error(m))?;
        let store = match r.string(gvars::STORE).as_str() {
            "memory" => StoreKind::Memory,
            "nats" => StoreKind::Nats,
            other => {
                return Err(gvars::STORE.error(format!("unknown store {other:?} (memory or nats)")))
            }
        };
        let namespace = r.string(vars::NAMESPACE);
        crate::config::validate_actor_name(vars::NAMESPACE.name, &namespace)?;
        let token = r.raw(gvars::TOKEN);
        let report_token = r.raw(gvars::REPORT_TOKEN).or_else(|| token.clone());
        let auth_none = match r.raw(gvars::AUTH).map(|v| v.trim().to_ascii_lowercase()) {
            None => false,
            Some(v) if v == "token" => false,
            Some(v) if v == "none" => true,
            Some(v) => {
                return Err(gvars::AUTH.error(format!("unknown value {v:?} (token or none)")))
            }
        };
        if auth_none && report_token.is_some() {
            return Err(gvars::AUTH.error(format!(
                "is none but {} or {} is set: unset one or the other",
                gvars::TOKEN.name,
                gvars::REPORT_TOKEN.name
            )));
        }
        check_exposure(addr, token.as_deref(), auth_none)?;
        let read_timeout = r.duration(gvars::READ_TIMEOUT)?;
        let max_connections: usize = r.parse(gvars::MAX_CONNECTIONS)?;
        let retention = r.duration(gvars::RETENTION)?;
        let max_tasks: usize = r.parse(gvars::MAX_TASKS)?;
        for (var, zero) in [
            (gvars::READ_TIMEOUT, read_timeout.is_zero()),
            (gvars::MAX_CONNECTIONS, max_connections == 0),
            (gvars::RETENTION, retention.is_zero()),
            (gvars::MAX_TASKS, max_tasks == 0),
        ] {
            if zero {
                return Err(var.error("must be greater than zero"));
            }
        }
        Ok(GatewayConfig {
            addr,
            flows: r.raw(gvars::FLOWS).map(PathBuf::from),
            store,
            token,
            report_token,
            auth_none,
            read_timeout,
            max_connections,
            retention,
            max_tasks,
            max_payload_bytes: r.parse(gvars::MAX_PAYLOAD_BYTES)?,
            mcp_wait: r.duration(gvars::MCP_WAIT)?,
            kv_bucket: r
                .raw(gvars::KV_BUCKET)
                .unwrap_or_else(|| format!("asya-{namespace}-tasks")),
            ends: crate::config::end_actors(src)?,
            metrics_addr: match r.raw(vars::METRICS_ADDR) {
                None => None,
                Some(a) if matches!(a.trim(), "off" | "none") => None,
                Some(a) => {
                    Some(parse_listen_addr(a.trim()).map_err(|m| vars::METRICS_ADDR.error(m))?)
                }
            },
            metrics_namespace: r.string(vars::METRICS_NAMESPACE),
            namespace,
        })
    }
}

/// The secure default: a gateway reachable from other hosts needs a client token, unless
/// the operator opted out with `ASYA_GATEWAY_AUTH=none`. Loopback addresses are exempt.
pub fn check_exposure(
    addr: SocketAddr,
    token: Option<&str>,
    auth_none: bool,
) -> Result<(), ConfigError> {
    if addr.ip().is_loopback() || auth_none || token.is_some_and(|t| !t.is_empty()) {
        return Ok(());
    }
    Err(gvars::TOKEN.error(format!(
        "the gateway would listen on {addr} (not loopback) without authentication: set {} \
         (and {} for sidecars' reports), or {}=none to serve it open",
        gvars::TOKEN.name,
        gvars::REPORT_TOKEN.name,
        gvars::AUTH.name
    )))
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
    #[error(transparent)]
    Metrics(#[from] crate::queue_depth::ExporterError),
    #[error("cannot bind the gateway on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// `asya-host gateway`: first envelopes go out over `transport` (the transport the
/// sidecars use, `ASYA_TRANSPORT`); tasks are kept in the configured store: memory, or the
/// NATS key-value store, on the NATS transport's connection or, beside another transport,
/// on one of its own to `kv_nats`. Serve until `shutdown`.
pub async fn run_gateway(
    cfg: GatewayConfig,
    transport: TransportSettings,
    kv_nats: Option<NatsConfig>,
    shutdown: CancellationToken,
) -> Result<(), GatewayStartError> {
    let flows = match &cfg.flows {
        Some(p) => super::load_flows(p)?,
        None => super::Flows::new(),
    };
    let flow_docs = match &cfg.flows {
        Some(p) => super::mcp::load_flow_docs(p)?,
        None => super::mcp::FlowDocs::new(),
    };
    let (transport, nats_client): (Arc<dyn Transport>, Option<async_nats::Client>) =
        match &transport {
            TransportSettings::Nats(c) => {
                let t = NatsTransport::connect(c.clone()).await?;
                let client = t.client().clone();
                (Arc::new(t), Some(client))
            }
            other => (crate::transport::connect(other).await?, None),
        };
    let cancel_client = nats_client.clone();
    let store: Arc<dyn TaskStore> = match cfg.store {
        StoreKind::Memory => Arc::new(MemoryStore::with_limits(cfg.retention, cfg.max_tasks)),
        StoreKind::Nats => {
            let client = match (nats_client, kv_nats) {
                (Some(c), _) => c,
                (None, Some(kv)) => NatsTransport::connect(kv).await?.client().clone(),
                (None, None) => {
                    return Err(ConfigError {
                        var: gvars::STORE.name,
                        message: "is nats but no NATS settings were read".into(),
                    }
                    .into())
                }
            };
            Arc::new(KvStore::open_with_retention(client, &cfg.kv_bucket, cfg.retention).await?)
        }
    };
    let queues = crate::queue_depth::gateway_queues(
        &cfg.namespace,
        flows.values(),
        [&cfg.ends.sink, &cfg.ends.sump],
    );
    let _depth = crate::queue_depth::serve_gateway_metrics(
        cfg.metrics_addr,
        &cfg.metrics_namespace,
        transport.clone(),
        queues,
    )
    .await?;
    let gw = Gateway::new(
        store,
        transport,
        cfg.namespace.clone(),
        flows,
        cfg.ends.sink.clone(),
        cfg.ends.sump.clone(),
    );
    if let Some(client) = &cancel_client {
        match crate::cancel::open_bucket(client.clone(), &cfg.namespace).await {
            Ok(kv) => gw.set_cancel_bucket(kv),
            Err(e) => tracing::warn!(error = %e, "canceled tasks will not reach the sidecars"),
        }
    }
    gw.set_max_payload_bytes(cfg.max_payload_bytes);
    gw.set_retention(cfg.retention);
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| GatewayStartError::Bind {
            addr: cfg.addr,
            source,
        })?;
    let opts = super::ServeOptions {
        client_token: cfg.token,
        report_token: cfg.report_token,
        read_timeout: cfg.read_timeout,
        max_connections: cfg.max_connections,
        mcp: super::mcp::McpOptions {
            wait: cfg.mcp_wait,
            docs: Arc::new(flow_docs),
            retention: cfg.retention,
        },
    };
    // Paused frames: parked in the task store, resumed by `POST /tasks/{id}/resume`.
    let _parking = gw.spawn_parking(shutdown.clone());
    super::serve_with(listener, gw, opts, shutdown).await;
    Ok(())
}

/// Where a standalone sidecar reports: HTTP to `ASYA_GATEWAY_URL` and/or OTLP spans to
/// `OTEL_EXPORTER_OTLP_ENDPOINT`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReporterSettings {
    pub gateway_url: Option<String>,
    pub token: Option<String>,
    pub otlp_endpoint: Option<String>,
    /// `None`: `asya-<actor>`.
    pub otlp_service: Option<String>,
}

impl ReporterSettings {
    pub fn from_source(src: &dyn Source) -> ReporterSettings {
        let r = Reader(src);
        ReporterSettings {
            gateway_url: r.raw(gvars::URL),
            // Sidecars hold the report credential; the client token is the fallback.
            token: r.raw(gvars::REPORT_TOKEN).or_else(|| r.raw(gvars::TOKEN)),
            otlp_endpoint: r.raw(gvars::OTLP_ENDPOINT),
            otlp_service: r.raw(gvars::OTLP_SERVICE_NAME),
        }
    }

    /// The reporter of `actor` (whose sump is `sump`); `None` when nothing is configured.
    /// Must be called inside a tokio runtime.
    pub fn build(&self, actor: &str, sump: &str) -> Result<Option<Arc<dyn Reporter>>, ConfigError> {
        let mut out: Vec<Arc<dyn Reporter>> = Vec::new();
        if let Some(url) = &self.gateway_url {
            let rep = super::HttpReporter::new(url, self.token.clone(), sump)
                .map_err(|e| gvars::URL.error(e.to_string()))?;
            out.push(Arc::new(rep));
        }
        if let Some(ep) = &self.otlp_endpoint {
            let service = self
                .otlp_service
                .clone()
                .unwrap_or_else(|| format!("asya-{actor}"));
            let rep = OtlpReporter::new(ep, &service)
                .map_err(|e| gvars::OTLP_ENDPOINT.error(e.to_string()))?;
            out.push(Arc::new(rep));
        }
        Ok(match out.len() {
            0 => None,
            1 => out.pop(),
            _ => Some(Arc::new(Tee(out))),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_a_token_or_the_opt_out() {
        let e = GatewayConfig::from_source(&[("X", "")]).unwrap_err();
        assert_eq!(e.var, gvars::TOKEN);
        assert!(e.message.contains("ASYA_GATEWAY_AUTH=none"), "{e}");
        let c = GatewayConfig::from_source(&[(gvars::ADDR.name, "127.0.0.1:8090")]).unwrap();
        assert_eq!((c.token, c.report_token), (None, None));
        let c = GatewayConfig::from_source(&[(gvars::ADDR.name, "[::1]:0")]).unwrap();
        assert!(!c.auth_none);
        let c = GatewayConfig::from_source(&[(gvars::AUTH.name, "none")]).unwrap();
        assert!(c.auth_none);
        let e = GatewayConfig::from_source(&[(gvars::AUTH.name, "none"), (gvars::TOKEN.name, "t")])
            .unwrap_err();
        assert_eq!(e.var, gvars::AUTH);
        let e = GatewayConfig::from_source(&[(gvars::AUTH.name, "maybe")]).unwrap_err();
        assert_eq!(e.var, gvars::AUTH);
    }

    #[test]
    fn report_token_falls_back_to_the_client_token() {
        let c = GatewayConfig::from_source(&[(gvars::TOKEN.name, "c")]).unwrap();
        assert_eq!(c.report_token.as_deref(), Some("c"));
        let c = GatewayConfig::from_source(&[
            (gvars::TOKEN.name, "c"),
            (gvars::REPORT_TOKEN.name, "r"),
        ])
        .unwrap();
        assert_eq!(
            (c.token.as_deref(), c.report_token.as_deref()),
            (Some("c"), Some("r"))
        );
    }

    #[test]
    fn bounds_parse_and_refuse_zero() {
        let c = GatewayConfig::from_source(&[(gvars::TOKEN.name, "t")]).unwrap();
        assert_eq!(c.read_timeout, Duration::from_secs(10));
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.retention, Duration::from_secs(86400));
        assert_eq!(c.max_tasks, 100_000);
        for var in [
            gvars::READ_TIMEOUT,
            gvars::MAX_CONNECTIONS,
            gvars::RETENTION,
            gvars::MAX_TASKS,
        ] {
            let e = GatewayConfig::from_source(&[(gvars::TOKEN.name, "t"), (var.name, "0")])
                .unwrap_err();
            assert_eq!(e.var, var);
        }
    }
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
            pause_metadata: None,
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

#[cfg(test)]
mod default_tests {
    use super::*;
    use crate::config::parse_duration;

    /// The library's defaults (used by `up`'s embedded gateway and by `Gateway::new`) and
    /// the variables' defaults (used by `asya-host gateway` and `--help`) are one value.
    #[test]
    fn the_library_defaults_are_the_variables_defaults() {
        let n = |v: crate::config::Var| v.default_value().unwrap().parse::<usize>().unwrap();
        let d = |v: crate::config::Var| parse_duration(v.default_value().unwrap()).unwrap();
        assert_eq!(
            n(gvars::MAX_PAYLOAD_BYTES),
            super::super::DEFAULT_MAX_PAYLOAD_BYTES
        );
        assert_eq!(
            n(gvars::MAX_CONNECTIONS),
            super::super::DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(n(gvars::MAX_TASKS), super::super::store::DEFAULT_MAX_TASKS);
        assert_eq!(d(gvars::READ_TIMEOUT), super::super::DEFAULT_READ_TIMEOUT);
        assert_eq!(d(gvars::RETENTION), super::super::store::DEFAULT_RETENTION);
        assert_eq!(d(gvars::MCP_WAIT), super::super::mcp::DEFAULT_WAIT);
    }

    #[test]
    fn mcp_wait_is_read_and_may_be_zero() {
        let c = GatewayConfig::from_source(&[(gvars::TOKEN.name, "t")]).unwrap();
        assert_eq!(c.mcp_wait, Duration::from_secs(5));
        let c =
            GatewayConfig::from_source(&[(gvars::TOKEN.name, "t"), (gvars::MCP_WAIT.name, "0s")])
                .unwrap();
        assert_eq!(c.mcp_wait, Duration::ZERO);
        let e =
            GatewayConfig::from_source(&[(gvars::TOKEN.name, "t"), (gvars::MCP_WAIT.name, "soon")])
                .unwrap_err();
        assert_eq!(e.var, gvars::MCP_WAIT);
    }
}
