//! The `asya-host` binary: parse the command line, initialise logging, call the library,
//! map errors to exit codes (1 = configuration or startup error, 3 = runtime timeout crash).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use asya_host::config::{ProcessEnv, SidecarConfig};
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
    Sidecar,
    /// Create the NATS JetStream stream and consumers of a namespace (idempotent; x-sink
    /// and x-sump included).
    Provision {
        /// Namespace (stream `asya-<namespace>`).
        #[arg(long, env = "ASYA_NAMESPACE")]
        namespace: String,
        /// Actor names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        actors: Vec<String>,
        /// Server URL(s); overrides ASYA_NATS_URL.
        #[arg(long)]
        nats_url: Option<String>,
    },
    /// Serve the task API (ASYA_GATEWAY_* variables; first envelopes go out over NATS).
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
    /// WebAssembly plugin tools.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Say which world a component implements and whether it fits this host's contract.
    Check {
        /// The component (`.wasm`).
        file: std::path::PathBuf,
    },
}

/// Exit code after the runtime exceeded the actor timeout (the orchestrator restarts us).
const EXIT_RUNTIME_TIMEOUT: u8 = 3;

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let level = std::env::var("ASYA_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| EnvFilter::new(level.to_ascii_lowercase()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("ASYA_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
            Command::Plugin {
                command: PluginCommand::Check { file },
            } => {
                let report = asya_host::plugin::check(&file)?;
                println!("{report}");
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("asya-host: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn sidecar() -> anyhow::Result<ExitCode> {
    let cfg = SidecarConfig::from_source(&ProcessEnv)?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let exit = asya_host::serve_sidecar(cfg, shutdown).await?;
    Ok(match exit {
        Exit::Shutdown => ExitCode::SUCCESS,
        Exit::RuntimeTimeout => ExitCode::from(EXIT_RUNTIME_TIMEOUT),
    })
}

async fn provision(
    namespace: &str,
    actors: &[String],
    nats_url: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let locs = asya_host::transport::nats::provision_from(&ProcessEnv, namespace, actors, nats_url)
        .await?;
    for l in locs {
        println!(
            "stream {} subject {} consumer {}",
            l.stream, l.subject, l.consumer
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn gateway() -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    asya_host::gateway::cli::run_gateway(&ProcessEnv, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

fn gateway_token() -> Option<String> {
    std::env::var("ASYA_GATEWAY_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
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
