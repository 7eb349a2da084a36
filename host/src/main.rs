//! The `asya-host` binary: parse the command line, initialise logging, call the library,
//! map errors to exit codes (1 = configuration or startup error, 3 = runtime timeout crash).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use asya_host::config::{LogSettings, ProcessEnv};
use asya_host::settings::{self, GatewaySettings, SidecarSettings, UpSettings};
use asya_host::sidecar::Exit;

#[derive(Parser)]
#[command(
    name = "asya-host",
    version,
    about = "Asya actor host: sidecar, gateway, local mesh, plugin tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar next to one actor's runtime (configured by ASYA_* variables).
    #[command(after_help = settings::help(&settings::sidecar_vars()))]
    Sidecar,
    /// Create a namespace's queues on the transport of ASYA_TRANSPORT (idempotent; x-sink
    /// and x-sump included): NATS JetStream's stream and consumers, or what a transport
    /// component creates (RabbitMQ: exchange, queues, bindings).
    #[command(after_help = settings::help(&settings::provision_vars()))]
    Provision {
        /// Namespace (queues `asya-<namespace>-<actor>`).
        #[arg(long, env = "ASYA_NAMESPACE")]
        namespace: String,
        /// Actor names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        actors: Vec<String>,
        /// NATS server URL(s) with ASYA_TRANSPORT=nats; overrides ASYA_NATS_URL.
        #[arg(long)]
        nats_url: Option<String>,
    },
    /// Serve the task API (ASYA_GATEWAY_* variables; first envelopes go out over the
    /// transport of ASYA_TRANSPORT, as the sidecars'; tasks kept in memory or NATS KV).
    #[command(after_help = settings::help(&settings::gateway_vars()))]
    Gateway,
    /// Print the hop-by-hop timeline of a task (actor, received, runtime, routed to, errors).
    Trace {
        task_id: String,
        /// Gateway base URL.
        #[arg(
            long,
            env = "ASYA_GATEWAY_URL",
            default_value = "http://127.0.0.1:8090"
        )]
        gateway: String,
    },
    /// Submit one task and print it (with --wait, its result; exit 1 when it failed).
    Send {
        /// Flow name.
        flow: String,
        /// Payload (JSON).
        json: String,
        /// Wait until the task is final.
        #[arg(long)]
        wait: bool,
        /// Task deadline (e.g. 30s).
        #[arg(long)]
        timeout: Option<String>,
        /// Gateway base URL.
        #[arg(
            long,
            env = "ASYA_GATEWAY_URL",
            default_value = "http://127.0.0.1:8090"
        )]
        gateway: String,
    },
    /// Run a whole flow on this machine: one Python runtime per actor, every sidecar,
    /// x-sink, x-sump and the gateway in this process (examples/README.md).
    #[command(after_help = settings::help(&settings::up_vars()))]
    Up(UpArgs),
    /// Render deployment manifests from a flow file.
    Render {
        #[command(subcommand)]
        command: RenderCommand,
    },
    /// Dead letters (x-sump) of a namespace.
    #[command(after_help = settings::help(&settings::provision_vars()))]
    Sump {
        #[command(subcommand)]
        command: SumpCommand,
    },
    /// WebAssembly plugin tools.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum SumpCommand {
    /// Read x-sump (on the transport of ASYA_TRANSPORT), show what would be replayed, and
    /// republish the original envelopes (unwrapped from the x-sump shape) to the actor each
    /// one was for; `x-asya-replays` counts replays, and an envelope replayed --max-replays
    /// times stays in x-sump. Everything not replayed is handed back to x-sump unchanged.
    /// x-sump is a work queue: an x-sump end actor running meanwhile takes envelopes first.
    Replay(ReplayArgs),
}

/// Options of `asya-host sump replay`.
#[derive(clap::Args)]
struct ReplayArgs {
    /// Namespace (queues `asya-<namespace>-<actor>`).
    #[arg(long, env = "ASYA_NAMESPACE")]
    namespace: String,
    /// Only envelopes that failed at this actor.
    #[arg(long)]
    actor: Option<String>,
    /// Only this reason: status.reason (RuntimeError, MaxRetriesExhausted, Timeout, ...) or
    /// the x-sump payload's error code (processing_error, ...).
    #[arg(long)]
    reason: Option<String>,
    /// Only envelopes that went to x-sump at or after this time (RFC 3339, or a duration
    /// back from now such as 1h).
    #[arg(long)]
    since: Option<String>,
    /// Replay at most this many envelopes.
    #[arg(long)]
    limit: Option<usize>,
    /// Show what would be replayed; publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// An envelope replayed this many times already stays in x-sump.
    #[arg(long, default_value_t = asya_host::replay::DEFAULT_MAX_REPLAYS)]
    max_replays: u32,
    /// The run ends when x-sump stays quiet this long.
    #[arg(long, default_value = "2s")]
    idle: String,
    /// NATS server URL(s) with ASYA_TRANSPORT=nats; overrides ASYA_NATS_URL.
    #[arg(long)]
    nats_url: Option<String>,
}

#[derive(Subcommand)]
enum RenderCommand {
    /// Kubernetes manifests (multi-document YAML on stdout, for `kubectl apply -f -`):
    /// per actor a Deployment (runtime + sidecar) and a KEDA ScaledObject, x-sink, x-sump,
    /// the gateway, a provisioning Job, PodMonitor/ServiceMonitor, PrometheusRule, dashboard.
    K8s(RenderK8sArgs),
}

/// Options of `asya-host render k8s`.
#[derive(clap::Args)]
struct RenderK8sArgs {
    /// The flow file (the one `asya-host up` runs).
    flow_file: std::path::PathBuf,
    /// Kubernetes namespace of every object (default: the flow's namespace).
    #[arg(long)]
    namespace: Option<String>,
    /// The asya-host image (sidecars, gateway, provisioning, the runtime file).
    #[arg(long, default_value_t = asya_host::render::default_image())]
    image: String,
    /// Runtime image of actors whose flow file entry names none.
    #[arg(long)]
    runtime_image: Option<String>,
    /// NATS server URL(s) as seen from the pods.
    #[arg(long, default_value = "nats://nats:4222")]
    nats_url: String,
    /// Autoscaling trigger: nats (KEDA's nats-jetstream scaler) or prometheus (our
    /// asya_actor_queue_depth gauge, via --prometheus-url).
    #[arg(long, default_value = "nats", value_parser = ["nats", "prometheus"])]
    scaler: String,
    /// NATS monitoring endpoint for the nats scaler (default: the first server's host, port 8222).
    #[arg(long)]
    nats_monitoring: Option<String>,
    /// Prometheus server of the prometheus scaler.
    #[arg(long, default_value = "http://prometheus-operated.monitoring.svc:9090")]
    prometheus_url: String,
    /// Write one file per part (and the plain Prometheus rules file) into this directory
    /// instead of printing.
    #[arg(short = 'o', long = "output-dir")]
    output_dir: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Say which world a component implements and whether it fits this host's contract.
    Check {
        /// The component (`.wasm`).
        file: std::path::PathBuf,
    },
    /// Run the transport conformance suite against a transport component (it needs its
    /// broker running; every case uses fresh queues).
    Test {
        /// The transport component (`.wasm`).
        file: std::path::PathBuf,
        /// Its JSON configuration (what `ASYA_TRANSPORT_CONFIG` would hold).
        #[arg(long, default_value = "{}")]
        config: String,
        /// Addresses it may connect to (`ASYA_TRANSPORT_ALLOW` syntax).
        #[arg(long, default_value = "")]
        allow: String,
        /// The transport does not deduplicate by message id: skip that case.
        #[arg(long)]
        no_dedup: bool,
    },
    /// Create a plugin crate to start from (outside any workspace; builds for
    /// wasm32-wasip2 with the size-optimised profile; a native test and a README).
    New(NewArgs),
}

/// Options of `asya-host plugin new`.
#[derive(clap::Args)]
struct NewArgs {
    /// `policy` (complete: builds, tests and passes `plugin check` as generated) or
    /// `transport` (a skeleton whose operations fail with TODO until written).
    #[arg(value_enum)]
    kind: NewKind,
    /// Crate name (lower-case letters, digits, '-').
    name: String,
    /// Directory to create the crate in (as DIR/NAME).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// Git URL of the asya-host repository (the SDK is not on crates.io).
    #[arg(long, env = "ASYA_SDK_GIT", conflicts_with = "sdk_path")]
    sdk_git: Option<String>,
    /// Pin the git dependency to this commit or tag.
    #[arg(long, requires = "sdk_git")]
    sdk_rev: Option<String>,
    /// Path of a checkout's sdk/ directory instead (development of the SDK).
    #[arg(long)]
    sdk_path: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum NewKind {
    Policy,
    Transport,
}

/// Exit code after the runtime exceeded the actor timeout (the orchestrator restarts us).
const EXIT_RUNTIME_TIMEOUT: u8 = 3;
/// Exit code after the runtime became unreachable and did not come back within
/// `ASYA_RUNTIME_READY_TIMEOUT`.
const EXIT_RUNTIME_LOST: u8 = 4;

fn init_logging(log: &LogSettings, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = log
        .filter
        .as_deref()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            // The MCP SDK logs every stateless /mcp request at info; keep it to warnings
            // unless debugging.
            let level = log.level_or(default_level);
            let sdk = if level.contains("debug") || level.contains("trace") {
                ""
            } else {
                ",rmcp=warn"
            };
            EnvFilter::new(format!("{level}{sdk}"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(
        &settings::logging(&ProcessEnv),
        match cli.command {
            // `up` is interactive: the mesh's own lines and warnings, not every sidecar's.
            Some(Command::Up(_)) => "warn,asya_host::mesh=info",
            _ => "info",
        },
    );
    // The sidecar runs on one thread. A delivery is a chain of hand-offs (transport → worker →
    // runtime socket → worker → transport); across the worker threads of a multi-thread
    // runtime each one is a cross-thread wake-up, tens of µs on these VMs, while the host's
    // own work per hop is ~10 µs of CPU (host/benches/hop.rs: hop p50 78–83 µs on two worker
    // threads, 52–55 µs on one, same machine and run). One thread carries tens of thousands of
    // hops per second, more than any handler runtime next to it. Everything else (`up` runs
    // many sidecars and a gateway in one process) uses every core.
    let one_thread = matches!(cli.command, None | Some(Command::Sidecar));
    let built = if one_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("asya-host: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match cli.command.unwrap_or(Command::Sidecar) {
            Command::Sidecar => sidecar().await,
            Command::Provision {
                namespace,
                actors,
                nats_url,
            } => provision(&namespace, &actors, nats_url.as_deref()).await,
            Command::Gateway => gateway().await,
            Command::Trace { task_id, gateway } => trace(&task_id, &gateway).await,
            Command::Send {
                flow,
                json,
                wait,
                timeout,
                gateway,
            } => send(&flow, &json, wait, timeout.as_deref(), &gateway).await,
            Command::Up(args) => up(args).await,
            Command::Sump {
                command: SumpCommand::Replay(args),
            } => sump_replay(args).await,
            Command::Render {
                command: RenderCommand::K8s(args),
            } => render_k8s(args),
            Command::Plugin {
                command: PluginCommand::Check { file },
            } => {
                let report = asya_host::plugin::check(&file)?;
                println!("{report}");
                Ok(ExitCode::SUCCESS)
            }
            Command::Plugin {
                command: PluginCommand::New(args),
            } => plugin_new(args),
            Command::Plugin {
                command:
                    PluginCommand::Test {
                        file,
                        config,
                        allow,
                        no_dedup,
                    },
            } => {
                // The waits first: a case that fails by timing out says how long it waited.
                let opts = asya_host::transport::wasm::plugin_test_options(!no_dedup);
                println!("transport conformance: {}", opts.describe());
                let report =
                    asya_host::transport::wasm::conformance_test(&file, &config, &allow, !no_dedup)
                        .await?;
                print!("{report}");
                Ok(if report.passed() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("asya-host: {}", error_line(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line. Most of our errors already name their source in
/// their message (`cannot bind …: Address already in use`); a cause is added only when the
/// line does not say it yet, so nothing is printed twice.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

fn plugin_new(args: NewArgs) -> anyhow::Result<ExitCode> {
    use asya_host::plugin::scaffold::{self, Kind, NewPlugin, SdkSource};
    let sdk = match (args.sdk_git, args.sdk_path) {
        (Some(url), _) => SdkSource::Git {
            url,
            rev: args.sdk_rev,
        },
        (None, Some(path)) => SdkSource::Path(std::path::absolute(&path)?),
        (None, None) => anyhow::bail!(
            "plugin new: say where asya-sdk comes from: --sdk-git URL (the asya-host repository; or ASYA_SDK_GIT) or --sdk-path PATH/TO/sdk"
        ),
    };
    let created = scaffold::create(&NewPlugin {
        kind: match args.kind {
            NewKind::Policy => Kind::Policy,
            NewKind::Transport => Kind::Transport,
        },
        name: args.name,
        dir: args.dir,
        sdk,
    })?;
    print!("{created}");
    Ok(ExitCode::SUCCESS)
}

async fn sidecar() -> anyhow::Result<ExitCode> {
    let settings = SidecarSettings::from_source(&ProcessEnv)?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let exit = asya_host::serve_sidecar(settings, shutdown).await?;
    Ok(match exit {
        Exit::Shutdown => ExitCode::SUCCESS,
        Exit::RuntimeTimeout => ExitCode::from(EXIT_RUNTIME_TIMEOUT),
        Exit::RuntimeLost => ExitCode::from(EXIT_RUNTIME_LOST),
    })
}

async fn provision(
    namespace: &str,
    actors: &[String],
    nats_url: Option<&str>,
) -> anyhow::Result<ExitCode> {
    use asya_host::transport::TransportSettings;
    let (mut transport, ends) = settings::provision_settings(&ProcessEnv)?;
    match (&mut transport, nats_url) {
        (TransportSettings::Nats(cfg), Some(u)) => cfg.url = u.to_owned(),
        (_, Some(_)) => anyhow::bail!("--nats-url: only with ASYA_TRANSPORT=nats"),
        _ => {}
    }
    for line in asya_host::provision::provision(&transport, namespace, actors, &ends).await? {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn sump_replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    use asya_host::replay::{replay, ReplayOptions};
    use asya_host::transport::TransportSettings;
    let (mut transport, ends) = settings::provision_settings(&ProcessEnv)?;
    match (&mut transport, args.nats_url.as_deref()) {
        (TransportSettings::Nats(cfg), Some(u)) => cfg.url = u.to_owned(),
        (_, Some(_)) => anyhow::bail!("--nats-url: only with ASYA_TRANSPORT=nats"),
        _ => {}
    }
    let mut opts = ReplayOptions::new(&args.namespace);
    opts.sump = ends.sump.clone();
    opts.actor = args.actor;
    opts.reason = args.reason;
    opts.dry_run = args.dry_run;
    opts.max_replays = args.max_replays;
    opts.limit = args.limit.unwrap_or(usize::MAX);
    opts.idle = asya_host::config::parse_duration(&args.idle)
        .map_err(|e| anyhow::anyhow!("--idle {:?}: {e}", args.idle))?;
    if let Some(since) = &args.since {
        opts.since = Some(match chrono::DateTime::parse_from_rfc3339(since) {
            Ok(t) => t.with_timezone(&chrono::Utc),
            Err(_) => {
                let back = asya_host::config::parse_duration(since).map_err(|e| {
                    anyhow::anyhow!("--since {since:?}: neither RFC 3339 nor a duration: {e}")
                })?;
                chrono::Utc::now() - chrono::Duration::from_std(back)?
            }
        });
    }
    let transport = asya_host::transport::connect(&transport).await?;
    let summary = replay(&*transport, &opts, |line| println!("{line}")).await?;
    println!("{}{summary}", if opts.dry_run { "dry run: " } else { "" });
    Ok(ExitCode::SUCCESS)
}

/// Options of `asya-host up`.
#[derive(clap::Args)]
struct UpArgs {
    /// The flow file (TOML: namespace, [actors.NAME], [flows]).
    flow_file: std::path::PathBuf,
    /// Tasks to run, one JSON object per line ({"flow": ..., "payload": ...}); without it
    /// the gateway serves until Ctrl-C.
    #[arg(long)]
    input: Option<std::path::PathBuf>,
    /// Flow of every input line; each line is then a bare payload.
    #[arg(long)]
    flow: Option<String>,
    /// Where results go (JSONL); default stdout.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
    /// Gateway address (served by default at 127.0.0.1:8090 without --input).
    #[arg(long)]
    gateway_addr: Option<String>,
    /// Bearer token required by the gateway API.
    #[arg(long, env = "ASYA_GATEWAY_TOKEN", hide_env_values = true)]
    gateway_token: Option<String>,
    /// How long an MCP tools/call (/mcp) waits for its task before answering with the
    /// task form (task id, then tasks/get).
    #[arg(long, env = "ASYA_GATEWAY_MCP_WAIT", default_value = "5s")]
    mcp_wait: String,
    /// One admin server (/metrics, /readyz, /debug/inflight) for every actor.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Queue transport: memory (in process), nats, or wasm (a transport component).
    #[arg(long, default_value = "memory", value_parser = ["memory", "nats", "wasm"])]
    transport: String,
    /// NATS server(s) with --transport nats; overrides ASYA_NATS_URL.
    #[arg(long)]
    nats_url: Option<String>,
    /// The transport component (.wasm) with --transport wasm; overrides ASYA_TRANSPORT_PLUGIN.
    #[arg(long)]
    transport_plugin: Option<String>,
    /// Its JSON configuration; overrides ASYA_TRANSPORT_CONFIG.
    #[arg(long)]
    transport_config: Option<String>,
    /// Addresses it may connect to (host:port, comma-separated); overrides ASYA_TRANSPORT_ALLOW.
    #[arg(long)]
    transport_allow: Option<String>,
    /// Deadline of each input task.
    #[arg(long, default_value = "5m")]
    timeout: String,
    /// Python interpreter of the runtimes.
    #[arg(long, env = "ASYA_PYTHONEXECUTABLE", default_value = "python3")]
    python: std::ffi::OsString,
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    use asya_host::config::{parse_duration, parse_listen_addr};
    use asya_host::mesh::{MeshTransport, UpOptions};
    let addr = |flag: &str, v: Option<String>| -> anyhow::Result<_> {
        v.map(|a| parse_listen_addr(&a).map_err(|e| anyhow::anyhow!("{flag}: {e}")))
            .transpose()
    };
    let mut opts = UpOptions::new(args.flow_file);
    opts.input = args.input;
    opts.flow = args.flow;
    opts.output = args.output;
    opts.gateway_addr = addr("--gateway-addr", args.gateway_addr)?;
    opts.gateway_token = args.gateway_token.filter(|t| !t.is_empty());
    opts.mcp_wait = parse_duration(&args.mcp_wait)
        .map_err(|e| anyhow::anyhow!("--mcp-wait (ASYA_GATEWAY_MCP_WAIT): {e}"))?;
    opts.metrics_addr = addr("--metrics-addr", args.metrics_addr)?;
    opts.python = args.python;
    use asya_host::transport::{wasm, TransportKind, TransportSettings};
    let kind = match args.transport.as_str() {
        "nats" => TransportKind::Nats,
        "wasm" => TransportKind::Wasm,
        _ => TransportKind::Memory,
    };
    let wasm_flags = [
        (
            "--transport-plugin",
            wasm::vars::PLUGIN.name,
            args.transport_plugin,
        ),
        (
            "--transport-config",
            wasm::vars::CONFIG.name,
            args.transport_config,
        ),
        (
            "--transport-allow",
            wasm::vars::ALLOW.name,
            args.transport_allow,
        ),
    ];
    let mut set = Vec::new();
    for (flag, var, value) in wasm_flags {
        match value {
            Some(_) if kind != TransportKind::Wasm => {
                anyhow::bail!("{flag}: only with --transport wasm")
            }
            Some(v) => set.push((var, v)),
            None => {}
        }
    }
    if args.nats_url.is_some() && kind != TransportKind::Nats {
        anyhow::bail!("--nats-url: only with --transport nats");
    }
    let src = settings::Flags {
        set,
        under: &ProcessEnv,
    };
    let vars = UpSettings::from_source(&src, kind)?;
    opts.ends = vars.ends;
    opts.pythonpath = vars.pythonpath;
    opts.plugin_cache_dir = vars.plugin_cache_dir;
    opts.set_vars = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .collect();
    opts.task_timeout = parse_duration(&args.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--timeout: invalid duration {:?}", args.timeout))?;
    opts.transport = match vars.transport {
        TransportSettings::Memory => MeshTransport::Memory,
        TransportSettings::Nats(mut cfg) => {
            if let Some(u) = args.nats_url {
                cfg.url = u;
            }
            MeshTransport::Nats(Box::new(cfg))
        }
        TransportSettings::Wasm(w) => MeshTransport::Wasm(Box::new(w)),
    };
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    match asya_host::mesh::up(opts, shutdown).await {
        Ok(report) => {
            eprint!("{report}");
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(e) => {
            // One line: the mesh's errors already name their cause.
            eprintln!("asya-host: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn render_k8s(args: RenderK8sArgs) -> anyhow::Result<ExitCode> {
    use asya_host::render::{self, K8sOptions, Scaler};
    let flow = asya_host::mesh::flowfile::FlowFile::load(&args.flow_file)?;
    let scaler = match args.scaler.as_str() {
        "prometheus" => Scaler::Prometheus {
            server_address: args.prometheus_url,
        },
        _ => Scaler::NatsJetStream {
            monitoring_endpoint: args
                .nats_monitoring
                .unwrap_or_else(|| render::monitoring_endpoint(&args.nats_url)),
        },
    };
    let opts = K8sOptions {
        namespace: args.namespace,
        image: args.image,
        nats_url: args.nats_url,
        scaler,
        runtime_image: args.runtime_image,
    };
    let manifests = render::k8s(&flow, &opts)?;
    match args.output_dir {
        Some(dir) => {
            let rules = render::monitoring::rules_file(&flow);
            for p in render::write_dir(&manifests, &rules, &dir)? {
                println!("{}", p.display());
            }
        }
        None => print!("{}", render::to_stream(&manifests)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn gateway() -> anyhow::Result<ExitCode> {
    let s = GatewaySettings::from_source(&ProcessEnv)?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    asya_host::gateway::cli::run_gateway(s.gateway, s.transport, s.kv_nats, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

fn gateway_token() -> Option<String> {
    settings::client_token(&ProcessEnv)
}

async fn trace(task_id: &str, gateway: &str) -> anyhow::Result<ExitCode> {
    let table =
        asya_host::gateway::cli::trace(gateway, gateway_token().as_deref(), task_id).await?;
    print!("{table}");
    Ok(ExitCode::SUCCESS)
}

async fn send(
    flow: &str,
    json: &str,
    wait: bool,
    timeout: Option<&str>,
    gateway: &str,
) -> anyhow::Result<ExitCode> {
    let timeout = timeout
        .map(|t| {
            asya_host::config::parse_duration(t).map_err(|e| anyhow::anyhow!("--timeout: {e}"))
        })
        .transpose()?;
    let wait_for = wait.then(|| timeout.unwrap_or(std::time::Duration::from_secs(300)));
    let view = asya_host::gateway::cli::send(
        gateway,
        gateway_token().as_deref(),
        flow,
        json,
        timeout,
        wait_for,
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&view)?);
    if let Some(waited) = wait_for.filter(|_| !view.status.is_final()) {
        eprintln!(
            "asya-host send: {}",
            asya_host::gateway::cli::stopped_waiting(&view, waited, timeout.is_some())
        );
    }
    use asya_host::gateway::TaskStatus;
    Ok(match view.status {
        TaskStatus::Failed | TaskStatus::Canceled => ExitCode::from(1),
        TaskStatus::Succeeded => ExitCode::SUCCESS,
        _ if wait => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    })
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested");
        shutdown.cancel();
    });
}
