//! `asya-host`: the sidecar that runs next to every actor's runtime, the gateway, the local
//! mesh and the WebAssembly plugin engine of the Asya actor mesh.
//!
//! Module map:
//! - [`config`]: typed `ASYA_*` configuration
//! - [`envelope`]: the envelope, route rules, status
//! - [`runtime`]: the runtime protocol client (HTTP over a Unix socket, SSE)
//! - [`transport`]: the `Transport` trait and its implementations
//! - [`sidecar`]: the receive → invoke → route → ack loop
//! - [`plugin`]: route policies
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/debug/inflight`
//! - [`metrics`]: every metric

pub mod admin;
pub mod config;
pub mod envelope;
pub mod gateway;
pub mod mesh;
pub mod metrics;
pub mod plugin;
pub mod queue_depth;
pub mod render;
pub mod runtime;
pub mod sidecar;
pub mod transport;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Why a standalone sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot bind the admin server on {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error(transparent)]
    Sidecar(#[from] sidecar::SidecarError),
    #[error(transparent)]
    Plugin(#[from] plugin::LoadError),
}

/// Run one sidecar as its own process: transport from the config, admin server, loop.
pub async fn serve_sidecar(
    cfg: config::SidecarConfig,
    shutdown: CancellationToken,
) -> Result<sidecar::Exit, StartError> {
    let metrics = metrics::Metrics::new(&cfg.metrics_namespace);
    // Plugins, the reporter and the admin port first: a bad plugin, URL or port stops
    // start-up before the broker is touched.
    let policy = plugin::PolicyChain::from_source(&config::ProcessEnv, Some(metrics.clone()))
        .await?
        .map(|chain| Arc::new(chain) as Arc<dyn plugin::RoutePolicy>);
    let reporter = gateway::cli::sidecar_reporter(&config::ProcessEnv, &cfg)?;
    let admin_listener = match cfg.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Admin { addr, source })?,
        ),
        None => None,
    };
    let transport = transport::connect(cfg.transport, &config::ProcessEnv).await?;
    transport.attach_metrics(metrics.clone());
    let _depth = queue_depth::spawn(
        transport.clone(),
        metrics.clone(),
        vec![cfg.queue()],
        queue_depth::REFRESH,
    );
    let mut deps = sidecar::Deps::new(transport.clone(), metrics.clone());
    deps.policy = policy;
    deps.reporter = reporter;
    let admin_stop = CancellationToken::new();
    if let Some(listener) = admin_listener {
        let readiness = deps.readiness.clone();
        let t = transport.clone();
        let state = admin::AdminState {
            metrics,
            inflight: deps.inflight.clone(),
            checks: vec![
                (
                    format!("runtime:{}", cfg.actor),
                    Arc::new(move || readiness.is_ready()),
                ),
                ("transport".into(), Arc::new(move || t.is_connected())),
            ],
        };
        tokio::spawn(admin::serve(listener, state, admin_stop.clone()));
    }
    let exit = sidecar::run(cfg, deps, shutdown).await;
    admin_stop.cancel();
    Ok(exit?)
}
