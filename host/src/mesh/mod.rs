//! `asya-host up FLOW_FILE`: a whole flow on one machine (SPEC §10). One stock Python
//! runtime per actor (supervised, restarted when it dies), every sidecar in process, x-sink,
//! x-sump and the gateway, on the in-process `memory` transport, on NATS, or on a transport
//! component (`--transport wasm`: RabbitMQ, Redis Streams, ...).
//!
//! - [`flowfile`]: the TOML flow file
//! - [`supervisor`]: runtime processes (own process group, SIGTERM then SIGKILL, restarts)
//! - [`summary`]: per-actor numbers and the table printed at the end
//! - [`known_actors`]: a frame routed to an actor outside the mesh goes to x-sump at once
//!
//! Shutdown order: stop taking work (gateway, inputs) → drain every sidecar → stop the
//! runtimes → stop x-sink / x-sump → remove the temporary directory.

pub mod deploy;
pub mod flowfile;
pub mod known_actors;
pub mod summary;
pub mod supervisor;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::builder::{Sidecar, SidecarBuilder};
use crate::config::SidecarConfig;
use crate::gateway::{self, Gateway, MemoryStore, SubmitRequest, TaskStatus, TaskView};
use crate::metrics::Metrics;
use crate::plugin::{PluginEngine, PolicyChain, PolicyOptions};
use crate::queue::EndActors;
use crate::sidecar::{self, Exit, Inflight, Reporter};
use crate::transport::memory::MemoryTransport;
use crate::transport::nats::{NatsConfig, NatsTransport};
use crate::transport::{Transport, TransportError, TransportKind};

pub use flowfile::{ActorSpec, FlowFile, FlowFileError, HandlerMode};
pub use summary::{ActorStats, Table};
pub use supervisor::RuntimeStartError;

/// The stock runtime, written to a temporary directory at start (only `python3` is needed).
const RUNTIME_PY: &str = include_str!("../../../sdk/python/asya_runtime.py");
/// The command that builds the stock plugins.
pub const PLUGINS_BUILD: &str =
    "cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release";
/// Default gateway address when `up` serves.
pub const DEFAULT_GATEWAY_ADDR: &str = "127.0.0.1:8090";
/// How long each sidecar may take to finish its in-flight envelopes at shutdown.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// Non-TTY progress lines at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where the mesh's queues live.
#[derive(Debug, Clone)]
pub enum MeshTransport {
    /// In-process queues (the default).
    Memory,
    /// NATS JetStream; the namespace is taken from the flow file.
    Nats(Box<NatsConfig>),
    /// A transport component (`ASYA_TRANSPORT=wasm` settings); every queue of the mesh is
    /// made sure of first, as `asya-host provision` does.
    Wasm(Box<crate::transport::wasm::WasmSettings>),
}

/// Options of `asya-host up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub flow_file: PathBuf,
    pub transport: MeshTransport,
    /// Tasks to run (JSONL); `None` = serve the gateway until shutdown.
    pub input: Option<PathBuf>,
    /// Flow of every input line (then each line is a bare payload).
    pub flow: Option<String>,
    /// Where results go (JSONL); `None` = stdout.
    pub output: Option<PathBuf>,
    /// Gateway address; always served without `input`, only when given with it.
    pub gateway_addr: Option<SocketAddr>,
    /// Bearer token of the gateway API.
    pub gateway_token: Option<String>,
    /// How long an MCP `tools/call` waits before the task form (`ASYA_GATEWAY_MCP_WAIT`).
    pub mcp_wait: Duration,
    /// One admin server (`/metrics`, `/readyz`, ...) for every in-process sidecar.
    pub metrics_addr: Option<SocketAddr>,
    /// Python interpreter (`ASYA_PYTHONEXECUTABLE`, default `python3`).
    pub python: OsString,
    /// Deadline of each input task.
    pub task_timeout: Duration,
    /// How long a runtime may take to start.
    pub ready_timeout: Duration,
    /// Show an interactive progress bar (`None`: when stderr is a terminal).
    pub progress_bar: Option<bool>,
    /// The end actors (`ASYA_ACTOR_SINK`, `ASYA_ACTOR_SUMP`).
    pub ends: EndActors,
    /// `PYTHONPATH` to keep after the flow file's folder on the runtimes' import path.
    pub pythonpath: Option<String>,
    /// Compiled-code cache of the route policies (`ASYA_PLUGIN_CACHE_DIR`).
    pub plugin_cache_dir: Option<PathBuf>,
    /// Names of the variables set in `up`'s environment (to warn about those it ignores).
    pub set_vars: Vec<String>,
}

impl UpOptions {
    pub fn new(flow_file: impl Into<PathBuf>) -> Self {
        UpOptions {
            flow_file: flow_file.into(),
            transport: MeshTransport::Memory,
            input: None,
            flow: None,
            output: None,
            gateway_addr: None,
            gateway_token: None,
            mcp_wait: gateway::mcp::DEFAULT_WAIT,
            metrics_addr: None,
            python: "python3".into(),
            task_timeout: Duration::from_secs(300),
            ready_timeout: Duration::from_secs(60),
            progress_bar: None,
            ends: EndActors::default(),
            pythonpath: None,
            plugin_cache_dir: None,
            set_vars: Vec::new(),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct UpReport {
    /// Input tasks (0 when serving).
    pub tasks: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Not final when the run stopped (timeout or shutdown).
    pub unfinished: usize,
    /// Flow-file actors, then x-sink and x-sump.
    pub actors: Vec<ActorStats>,
    /// Runtime restarts per actor.
    pub restarts: BTreeMap<String, u64>,
    /// Flow file to every runtime ready.
    pub startup: Duration,
    /// Running the input tasks (or serving).
    pub elapsed: Duration,
    /// Where the results were written (`None`: stdout or no input).
    pub output: Option<PathBuf>,
}

impl UpReport {
    /// Every task succeeded.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.unfinished == 0
    }
}

impl std::fmt::Display for UpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", Table(&self.actors))?;
        let restarts: Vec<String> = self
            .restarts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(a, n)| format!("{a} ×{n}"))
            .collect();
        if !restarts.is_empty() {
            writeln!(f, "runtime restarts: {}", restarts.join(", "))?;
        }
        if self.tasks > 0 {
            write!(
                f,
                "{} tasks: {} succeeded, {} failed",
                self.tasks, self.succeeded, self.failed
            )?;
            if self.unfinished > 0 {
                write!(f, ", {} unfinished", self.unfinished)?;
            }
            write!(
                f,
                " in {:.1}s (start-up {:.1}s)",
                self.elapsed.as_secs_f64(),
                self.startup.as_secs_f64()
            )?;
            if let Some(p) = &self.output {
                write!(f, "; results in {}", p.display())?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Why `up` could not run. One line each.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    FlowFile(#[from] FlowFileError),
    #[error("actor {actor}: route policy {} not found; build the stock plugins with `{PLUGINS_BUILD}`", path.display())]
    PolicyMissing { actor: String, path: PathBuf },
    #[error("actor {actor}: {source}")]
    Policy {
        actor: String,
        #[source]
        source: crate::plugin::PluginError,
    },
    #[error("{}:{line}: {message}", path.display())]
    Input {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for the gateway: {source} (choose another address with --gateway-addr)")]
    GatewayBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for metrics: {source} (choose another address with --metrics-addr)")]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeStartError),
    #[error("nats: {0}")]
    Transport(#[from] TransportError),
    #[error("nats: {0}")]
    Provision(#[from] crate::transport::nats::ProvisionError),
    #[error(transparent)]
    TransportConfig(#[from] crate::config::ConfigError),
    #[error("wasm transport: {0}")]
    Wasm(#[source] TransportError),
    #[error(transparent)]
    Name(#[from] crate::queue::InvalidName),
    #[error("interrupted")]
    Interrupted,
    #[error("actor {actor}: {source}")]
    Sidecar {
        actor: String,
        #[source]
        source: sidecar::SidecarError,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}

/// One task from the input file.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTask {
    /// 1-based line in the input file.
    pub line: usize,
    pub flow: String,
    pub payload: Value,
}

/// Read `path`: each non-empty line is `{"flow": ..., "payload": ...}`, or a bare payload
/// when `flow` is given. Every flow must exist.
pub fn read_input(
    path: &Path,
    flow: Option<&str>,
    flows: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<InputTask>, MeshError> {
    let text = std::fs::read_to_string(path)
        .map_err(io_err(format!("cannot read input {}", path.display())))?;
    let bad = |line: usize, message: String| MeshError::Input {
        path: path.to_owned(),
        line,
        message,
    };
    let known = || flows.keys().cloned().collect::<Vec<_>>().join(", ");
    let mut tasks = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(raw).map_err(|e| bad(line, format!("not JSON: {e}")))?;
        let (flow, payload) = match flow {
            Some(f) => (f.to_owned(), v),
            None => {
                let Value::Object(mut m) = v else {
                    return Err(bad(line, "expected {\"flow\": ..., \"payload\": ...} (or pass --flow NAME to send bare payloads)".into()));
                };
                let Some(Value::String(f)) = m.remove("flow") else {
                    return Err(bad(
                        line,
                        "missing \"flow\" (a string); or pass --flow NAME to send bare payloads"
                            .into(),
                    ));
                };
                let payload = m.remove("payload").unwrap_or(Value::Null);
                if let Some(k) = m.keys().next() {
                    return Err(bad(
                        line,
                        format!("unknown key {k:?} (a line has \"flow\" and \"payload\")"),
                    ));
                }
                (f, payload)
            }
        };
        if !flows.contains_key(&flow) {
            return Err(bad(
                line,
                format!("unknown flow {flow:?} (flows: {})", known()),
            ));
        }
        tasks.push(InputTask {
            line,
            flow,
            payload,
        });
    }
    Ok(tasks)
}

/// Everything started for one routing actor.
struct ActorHandle {
    name: String,
    restarts: Arc<AtomicU64>,
}

/// Run the mesh until the inputs are done (with `input`) or `shutdown`.
pub async fn up(opts: UpOptions, shutdown: CancellationToken) -> Result<UpReport, MeshError> {
    let started = Instant::now();
    let flow = FlowFile::load(&opts.flow_file)?;
    if let Some(f) = &opts.flow {
        if !flow.flows.contains_key(f) {
            let known: Vec<&str> = flow.flows.keys().map(String::as_str).collect();
            return Err(MeshError::Input {
                path: opts.flow_file.clone(),
                line: 0,
                message: format!(
                    "--flow {f:?} is not in [flows] (flows: {})",
                    known.join(", ")
                ),
            });
        }
    }
    let inputs = match &opts.input {
        Some(p) => Some(read_input(p, opts.flow.as_deref(), &flow.flows)?),
        None => None,
    };
    let metrics = Metrics::new("asya_actor");
    let policies = load_policies(&flow, &metrics, opts.plugin_cache_dir.clone()).await?;
    for var in flowfile::ignored_resiliency_vars(opts.set_vars.iter().cloned()) {
        warn!("{var} is not read by `up`: set the actor's retry policy in the flow file (timeout, max_attempts, non_retryable_errors, backoff_initial, backoff_max, backoff_multiplier under [actors.NAME])");
    }

    // Bind listeners before starting anything, so a busy port fails fast.
    let gateway_addr = match (&opts.gateway_addr, &inputs) {
        (Some(a), _) => Some(*a),
        (None, None) => Some(DEFAULT_GATEWAY_ADDR.parse().expect("valid default address")),
        (None, Some(_)) => None,
    };
    let gateway_listener = match gateway_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| MeshError::GatewayBind { addr, source })?,
        ),
        None => None,
    };
    let admin_listener = match opts.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| MeshError::AdminBind { addr, source })?,
        ),
        None => None,
    };
    let output = match &opts.output {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p)
                .map_err(io_err(format!("cannot create output {}", p.display())))?,
        )),
        None => None,
    };

    // Runtimes.
    let tmp = tempfile::Builder::new()
        .prefix("asya-up-")
        .tempdir()
        .map_err(io_err("cannot create a temporary directory"))?;
    let script = tmp.path().join("asya_runtime.py");
    std::fs::write(&script, RUNTIME_PY)
        .map_err(io_err(format!("cannot write {}", script.display())))?;
    let pythonpath = match &opts.pythonpath {
        Some(p) if !p.is_empty() => {
            let mut v = absolute(&flow.dir).into_os_string();
            v.push(":");
            v.push(p);
            v
        }
        _ => absolute(&flow.dir).into_os_string(),
    };
    let mut runtime_cfgs = Vec::new();
    for (i, a) in flow.actors.iter().enumerate() {
        let mut env = vec![
            ("ASYA_HANDLER".to_owned(), a.handler.clone()),
            ("ASYA_HANDLER_MODE".to_owned(), a.mode.as_str().to_owned()),
            (
                "PYTHONPATH".to_owned(),
                pythonpath.to_string_lossy().into_owned(),
            ),
        ];
        env.extend(a.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        runtime_cfgs.push(supervisor::RuntimeConfig {
            actor: a.name.clone(),
            python: opts.python.clone(),
            script: script.clone(),
            // Short paths: a Unix socket path has a 108-byte limit.
            socket_dir: tmp.path().join(format!("r{i}")),
            env,
            ready_timeout: opts.ready_timeout,
        });
    }
    let mut procs = Vec::new();
    let mut started_ok: Result<(), MeshError> = Ok(());
    for c in &runtime_cfgs {
        match supervisor::RuntimeProcess::spawn(c) {
            Ok(p) => procs.push(p),
            Err(e) => {
                started_ok = Err(e.into());
                break;
            }
        }
    }
    if started_ok.is_ok() {
        let ready = futures::future::try_join_all(
            procs
                .iter_mut()
                .zip(&runtime_cfgs)
                .map(|(p, c)| p.wait_ready(c)),
        );
        started_ok = tokio::select! {
            r = ready => r.map(|_| ()).map_err(MeshError::from),
            _ = shutdown.cancelled() => Err(MeshError::Interrupted),
        };
    }
    if let Err(e) = started_ok {
        // Stop what did start before the temporary directory goes.
        for p in &mut procs {
            p.terminate(Duration::from_secs(2)).await;
        }
        return match e {
            MeshError::Interrupted => Ok(UpReport::default()),
            e => Err(e),
        };
    }
    let startup = started.elapsed();
    info!(actors = flow.actors.len(), ?startup, "runtimes ready");

    // Transport and gateway.
    let (transport, kind): (Arc<dyn Transport>, TransportKind) = match &opts.transport {
        MeshTransport::Memory => (Arc::new(MemoryTransport::new()), TransportKind::Memory),
        MeshTransport::Nats(cfg) => {
            let names: Vec<String> = flow.actors.iter().map(|a| a.name.clone()).collect();
            crate::transport::nats::provision((**cfg).clone(), &flow.namespace, &names, &opts.ends)
                .await?;
            (
                Arc::new(NatsTransport::connect((**cfg).clone()).await?),
                TransportKind::Nats,
            )
        }
        MeshTransport::Wasm(settings) => {
            let names: Vec<String> = flow.actors.iter().map(|a| a.name.clone()).collect();
            let queues = crate::provision::queues(&flow.namespace, &names, &opts.ends)?;
            let t = crate::transport::wasm::WasmTransport::connect(settings.resolve().await?)
                .await
                .map_err(MeshError::Wasm)?;
            t.ensure_queues(&queues).await.map_err(MeshError::Wasm)?;
            t.attach_metrics(metrics.clone());
            (Arc::new(t), TransportKind::Wasm)
        }
    };
    let gw = Gateway::new(
        Arc::new(MemoryStore::new()),
        transport.clone(),
        flow.namespace.clone(),
        flow.flows.clone(),
        opts.ends.sink.clone(),
        opts.ends.sump.clone(),
    );
    let parking_stop = CancellationToken::new();
    let _parking_guard = parking_stop.clone().drop_guard();
    gw.spawn_parking(parking_stop.clone());
    let stats = summary::StatsReporter::new(Some(gw.reporter()));
    let reporter: Arc<dyn Reporter> = stats.clone();
    let inflight = Inflight::new();

    // Sidecars and supervisors.
    let sidecar_stop = CancellationToken::new();
    let runtime_stop = CancellationToken::new();
    let end_stop = CancellationToken::new();
    // Cancelled when a sidecar fails for good: the run stops.
    let failed = CancellationToken::new();
    let first_failure: Arc<std::sync::Mutex<Option<MeshError>>> = Default::default();
    let mut sidecars = JoinSet::new();
    let mut supervisors = JoinSet::new();
    let mut ends = JoinSet::new();
    let mut actors = Vec::new();
    let mut checks: Vec<crate::admin::ReadyCheck> = Vec::new();
    let mut live: Vec<crate::admin::ReadyCheck> = Vec::new();
    let known: Arc<std::collections::BTreeSet<String>> = Arc::new(
        flow.actors
            .iter()
            .map(|a| a.name.clone())
            .chain(opts.ends.names().map(String::from))
            .collect(),
    );
    for ((a, rc), proc) in flow.actors.iter().zip(runtime_cfgs).zip(procs) {
        let mut cfg = SidecarConfig::new(&a.name, &flow.namespace, &rc.socket_dir);
        cfg.ends = opts.ends.clone();
        cfg.transport = kind;
        cfg.concurrency = a.concurrency;
        cfg.ready_timeout = opts.ready_timeout;
        cfg.shutdown_grace = DRAIN_GRACE;
        cfg.resiliency = a.resiliency();
        // The configured chain, then the check that the next actor is in this mesh.
        let policy: Arc<dyn crate::plugin::RoutePolicy> = Arc::new(known_actors::KnownActors::new(
            policies.get(&a.name).cloned(),
            known.clone(),
        ));
        let sidecar = SidecarBuilder::new(cfg, transport.clone())
            .metrics(metrics.clone())
            .inflight(inflight.clone())
            .reporter(Some(reporter.clone()))
            .policy(Some(policy))
            .canceled(Some(gw.canceled()))
            .build();
        checks.push(sidecar.ready_check());
        live.push(sidecar.live_check());
        let (restart_tx, restart_rx) = mpsc::channel(1);
        let restarts = Arc::new(AtomicU64::new(0));
        supervisors.spawn(supervisor::supervise(
            rc,
            proc,
            restart_rx,
            runtime_stop.clone(),
            restarts.clone(),
        ));
        sidecars.spawn(run_sidecar(
            sidecar,
            sidecar_stop.clone(),
            restart_tx,
            failed.clone(),
            first_failure.clone(),
        ));
        actors.push(ActorHandle {
            name: a.name.clone(),
            restarts,
        });
    }
    for end in opts.ends.names() {
        let mut cfg = SidecarConfig::new(end, &flow.namespace, tmp.path());
        cfg.ends = opts.ends.clone();
        cfg.transport = kind;
        cfg.is_end_actor = true;
        cfg.concurrency = 16;
        cfg.shutdown_grace = DRAIN_GRACE;
        let sidecar = SidecarBuilder::new(cfg, transport.clone())
            .metrics(metrics.clone())
            .inflight(inflight.clone())
            .reporter(Some(reporter.clone()))
            .build();
        let (restart_tx, _) = mpsc::channel(1);
        ends.spawn(run_sidecar(
            sidecar,
            end_stop.clone(),
            restart_tx,
            failed.clone(),
            first_failure.clone(),
        ));
    }
    let _depth = crate::queue_depth::spawn(
        transport.clone(),
        metrics.clone(),
        crate::queue_depth::gateway_queues(
            &flow.namespace,
            [&flow.actors.iter().map(|a| a.name.clone()).collect()],
            ["x-sink", "x-sump"],
        ),
        crate::queue_depth::REFRESH,
    );
    let admin_stop = CancellationToken::new();
    if let Some(listener) = admin_listener {
        let t = transport.clone();
        checks.push(("transport".into(), Arc::new(move || t.is_connected())));
        let state = crate::admin::AdminState {
            metrics: metrics.clone(),
            inflight: inflight.clone(),
            checks,
            live,
        };
        tokio::spawn(crate::admin::serve(listener, state, admin_stop.clone()));
    }
    let gateway_stop = CancellationToken::new();
    if let Some(listener) = gateway_listener {
        let addr = listener.local_addr().ok();
        let serve_opts = gateway::ServeOptions {
            mcp: gateway::mcp::McpOptions {
                wait: opts.mcp_wait,
                docs: Arc::new(flow.flow_docs.clone()),
                ..gateway::mcp::McpOptions::default()
            },
            ..gateway::ServeOptions::with_token(opts.gateway_token.clone())
        };
        tokio::spawn(gateway::serve_with(
            listener,
            gw.clone(),
            serve_opts,
            gateway_stop.clone(),
        ));
        if let Some(addr) = addr {
            let flows: Vec<&str> = flow.flows.keys().map(String::as_str).collect();
            info!(
                "gateway on http://{addr} (flows: {}); submit with: curl -s -X POST http://{addr}/tasks -d '{{\"flow\": \"{}\", \"payload\": {{}}}}'",
                flows.join(", "),
                flows.first().copied().unwrap_or("NAME"),
            );
        }
    }

    // Work.
    let work_started = Instant::now();
    let mut report = UpReport {
        startup,
        output: opts.output.clone(),
        ..UpReport::default()
    };
    let stop = {
        let any = CancellationToken::new();
        let (a, b, c) = (any.clone(), shutdown.clone(), failed.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = b.cancelled() => {}
                _ = c.cancelled() => {}
            }
            a.cancel();
        });
        any
    };
    let run_result = match inputs {
        Some(tasks) => run_inputs(&gw, tasks, &opts, output, &stop, &mut report).await,
        None => {
            stop.cancelled().await;
            Ok(())
        }
    };

    // Shutdown: no new work, drain sidecars, stop runtimes, then the end actors.
    gateway_stop.cancel();
    sidecar_stop.cancel();
    while sidecars.join_next().await.is_some() {}
    runtime_stop.cancel();
    while supervisors.join_next().await.is_some() {}
    end_stop.cancel();
    while ends.join_next().await.is_some() {}
    admin_stop.cancel();
    if let Some(e) = first_failure.lock().expect("failure lock").take() {
        return Err(e);
    }
    run_result?;
    let mut names: Vec<String> = actors.iter().map(|a| a.name.clone()).collect();
    names.extend(opts.ends.names().map(String::from));
    report.actors = stats.snapshot(&names);
    report.restarts = actors
        .iter()
        .map(|a| (a.name.clone(), a.restarts.load(Ordering::Relaxed)))
        .collect();
    report.elapsed = work_started.elapsed();
    drop(tmp);
    Ok(report)
}

/// One sidecar, run again after a runtime timeout once its runtime was restarted.
async fn run_sidecar(
    sidecar: Sidecar,
    stop: CancellationToken,
    restart: mpsc::Sender<supervisor::RestartRequest>,
    failed: CancellationToken,
    first_failure: Arc<std::sync::Mutex<Option<MeshError>>>,
) {
    loop {
        match sidecar.clone().run(stop.clone()).await {
            Ok(Exit::Shutdown) => return,
            Ok(Exit::RuntimeTimeout | Exit::RuntimeLost) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if restart.send(tx).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = rx => {}
                    _ = stop.cancelled() => return,
                }
            }
            Err(source) => {
                error!(actor = %sidecar.cfg.actor, error = %source, "sidecar failed; stopping the mesh");
                let mut f = first_failure.lock().expect("failure lock");
                if f.is_none() {
                    *f = Some(MeshError::Sidecar {
                        actor: sidecar.cfg.actor.clone(),
                        source,
                    });
                }
                failed.cancel();
                return;
            }
        }
    }
}

/// Load every actor's route policies (one engine for all), checking the files first.
async fn load_policies(
    flow: &FlowFile,
    metrics: &Arc<Metrics>,
    cache_dir: Option<PathBuf>,
) -> Result<BTreeMap<String, Arc<dyn crate::plugin::RoutePolicy>>, MeshError> {
    let mut out: BTreeMap<String, Arc<dyn crate::plugin::RoutePolicy>> = BTreeMap::new();
    for a in &flow.actors {
        for p in &a.policies {
            if !p.path.is_file() {
                return Err(MeshError::PolicyMissing {
                    actor: a.name.clone(),
                    path: p.path.clone(),
                });
            }
        }
    }
    if flow.actors.iter().all(|a| a.policies.is_empty()) {
        return Ok(out);
    }
    let engine = PluginEngine::new(cache_dir).map_err(|source| MeshError::Policy {
        actor: flow.actors[0].name.clone(),
        source,
    })?;
    for a in flow.actors.iter().filter(|a| !a.policies.is_empty()) {
        let chain = PolicyChain::load(
            &engine,
            &a.policies,
            PolicyOptions::default(),
            Some(metrics.clone()),
        )
        .await
        .map_err(|source| MeshError::Policy {
            actor: a.name.clone(),
            source,
        })?;
        out.insert(a.name.clone(), Arc::new(chain));
    }
    Ok(out)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// One line of the results file.
fn result_line(task: &InputTask, view: Result<TaskView, String>, timeout: Duration) -> Value {
    match view {
        Ok(v) => {
            let mut line = json!({
                "line": task.line,
                "id": v.id,
                "flow": task.flow,
                "status": v.status.as_str(),
            });
            if let Some(r) = v.result {
                line["result"] = r;
            }
            if let Some(e) = v.error {
                line["error"] = serde_json::to_value(e).unwrap_or(Value::Null);
            } else if !v.status.is_final() {
                line["error"] = json!({
                    "message": format!("not finished within {timeout:?} (last seen at {})", v.current_actor_name.as_deref().unwrap_or("?")),
                });
            }
            line
        }
        Err(message) => json!({
            "line": task.line,
            "flow": task.flow,
            "status": "failed",
            "error": {"message": message},
        }),
    }
}

/// Submit every task, wait for each, write results in input order, show progress.
async fn run_inputs(
    gw: &Arc<Gateway>,
    tasks: Vec<InputTask>,
    opts: &UpOptions,
    output: Option<std::io::BufWriter<std::fs::File>>,
    stop: &CancellationToken,
    report: &mut UpReport,
) -> Result<(), MeshError> {
    let total = tasks.len();
    report.tasks = total;
    let started = Instant::now();
    let progress = Progress::new(
        total,
        opts.progress_bar
            .unwrap_or_else(|| std::io::stderr().is_terminal()),
    );
    let mut out: Box<dyn Write + Send> = match output {
        Some(w) => Box::new(w),
        None => Box::new(std::io::stdout()),
    };
    // Enough tasks in flight to keep every actor busy, few enough that queued tasks do not
    // burn their deadline waiting.
    let window = 64;
    let timeout = opts.task_timeout;
    let wait_bound = timeout + Duration::from_secs(10);
    let mut results = futures::stream::iter(tasks.into_iter().enumerate())
        .map(|(i, t)| {
            let gw = gw.clone();
            async move {
                let req = SubmitRequest {
                    flow: Some(t.flow.clone()),
                    route: None,
                    payload: t.payload.clone(),
                    timeout: Some(timeout),
                };
                let view = match gw.submit(req).await {
                    Ok(v) => gw
                        .wait_final(&v.id, wait_bound)
                        .await
                        .ok_or_else(|| format!("task {} disappeared", v.id)),
                    Err(e) => Err(format!("cannot submit: {e}")),
                };
                (i, t, view)
            }
        })
        .buffer_unordered(window);
    let mut pending: BTreeMap<usize, Value> = BTreeMap::new();
    let mut next = 0usize;
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    ticker.tick().await;
    let mut done = 0usize;
    loop {
        let item = tokio::select! {
            item = results.next() => item,
            _ = ticker.tick() => {
                progress.tick(done, report.failed, started.elapsed());
                continue;
            }
            _ = stop.cancelled() => {
                warn!(done, total, "stopped before every task finished");
                break;
            }
        };
        let Some((i, task, view)) = item else { break };
        match &view {
            Ok(v) if v.status == TaskStatus::Succeeded => report.succeeded += 1,
            Ok(v) if !v.status.is_final() => report.unfinished += 1,
            _ => report.failed += 1,
        }
        done += 1;
        progress.set(done, report.failed);
        pending.insert(i, result_line(&task, view, timeout));
        while let Some(line) = pending.remove(&next) {
            let w = progress.suspend(|| writeln!(out, "{line}"));
            w.map_err(io_err("cannot write results"))?;
            next += 1;
        }
    }
    report.unfinished += total - done;
    // Anything left out of order (only after a stop) is still written.
    for line in pending.into_values() {
        writeln!(out, "{line}").map_err(io_err("cannot write results"))?;
    }
    out.flush().map_err(io_err("cannot write results"))?;
    progress.finish(done, report.failed, started.elapsed());
    Ok(())
}

/// A progress bar on a terminal, otherwise a line every few seconds.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    failed_seen: AtomicUsize,
}

impl Progress {
    fn new(total: usize, bar: bool) -> Self {
        let bar = bar.then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} tasks {msg}",
            ) {
                b.set_style(style);
            }
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Progress {
            bar,
            total,
            failed_seen: AtomicUsize::new(0),
        }
    }

    fn set(&self, done: usize, failed: usize) {
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
            if failed != self.failed_seen.swap(failed, Ordering::Relaxed) {
                b.set_message(format!("({failed} failed)"));
            }
        }
    }

    fn tick(&self, done: usize, failed: usize, elapsed: Duration) {
        if self.bar.is_none() {
            eprintln!(
                "progress: {done}/{} tasks done, {failed} failed, {:.0}s",
                self.total,
                elapsed.as_secs_f64()
            );
        }
    }

    fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    fn finish(&self, done: usize, failed: usize, elapsed: Duration) {
        match &self.bar {
            Some(b) => b.finish_and_clear(),
            None => eprintln!(
                "progress: {done}/{} tasks done, {failed} failed, {:.1}s",
                self.total,
                elapsed.as_secs_f64()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        let mut flows = BTreeMap::new();
        flows.insert("f".to_string(), vec!["a".to_string()]);
        std::fs::write(
            &p,
            "{\"flow\": \"f\", \"payload\": {\"x\": 1}}\n\n{\"flow\": \"f\"}\n",
        )
        .unwrap();
        let t = read_input(&p, None, &flows).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].payload["x"], 1);
        assert_eq!(t[1].line, 3);
        assert_eq!(t[1].payload, Value::Null);

        std::fs::write(&p, "{\"x\": 1}\n[1, 2]\n").unwrap();
        let t = read_input(&p, Some("f"), &flows).unwrap();
        assert_eq!(t[1].payload, json!([1, 2]));

        for (text, needle) in [
            ("{\"x\": 1}\n", ":1: missing \"flow\""),
            ("{\"flow\": \"f\"}\nnope\n", ":2: not JSON"),
            ("{\"flow\": \"g\"}\n", "unknown flow \"g\""),
            (
                "{\"flow\": \"f\", \"payload\": 1, \"extra\": 2}\n",
                "unknown key",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = read_input(&p, None, &flows).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
