#![doc = include_str!("../README.md")]

pub mod admin;
pub mod builder;
pub mod cancel;
pub mod config;
pub mod envelope;
pub mod gateway;
pub mod mesh;
pub mod metrics;
pub mod plugin;
pub mod provision;
pub mod queue;
pub mod queue_depth;
pub mod render;
pub mod replay;
pub mod runtime;
pub mod settings;
pub mod sidecar;
pub mod transport;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use builder::{Sidecar, SidecarBuilder};
pub use settings::SidecarSettings;

/// Every binary built from this crate — `asya-host`, its tests and its benches — allocates
/// with mimalloc: with glibc's allocator, `malloc`/`free` were ~15 % of the instructions of
/// a hop (callgrind; a hop allocates the parsed envelope's strings and maps and two
/// KB-sized buffers). docs/NOTES.md has the measurement.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Plugin(#[from] plugin::PluginError),
}

/// Run one sidecar as its own process from its parsed settings: policies, reporter, admin
/// server, transport, then the loop.
pub async fn serve_sidecar(
    settings: SidecarSettings,
    shutdown: CancellationToken,
) -> Result<sidecar::Exit, StartError> {
    let SidecarSettings {
        sidecar: cfg,
        transport,
        policies,
        reporter,
    } = settings;
    let metrics = metrics::Metrics::new(&cfg.metrics_namespace);
    // Plugins, the reporter and the admin port first: a bad plugin, URL or port stops
    // start-up before the broker is touched.
    let policy = policies
        .load(Some(metrics.clone()))
        .await?
        .map(|chain| Arc::new(chain) as Arc<dyn plugin::RoutePolicy>);
    let reporter = reporter.build(&cfg.actor, &cfg.ends.sump)?;
    let admin_listener = match cfg.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Admin { addr, source })?,
        ),
        None => None,
    };
    let (transport, nats_client): (Arc<dyn transport::Transport>, _) = match &transport {
        transport::TransportSettings::Nats(c) => {
            let t = transport::nats::NatsTransport::connect(c.clone()).await?;
            let client = t.client().clone();
            (Arc::new(t), Some(client))
        }
        other => (transport::connect(other).await?, None),
    };
    transport.attach_metrics(metrics.clone());
    // Canceled tasks: watched in the namespace's NATS KV bucket (see `cancel`).
    let cancel_stop = CancellationToken::new();
    let _cancel_guard = cancel_stop.clone().drop_guard();
    let canceled = match nats_client {
        Some(client) if !cfg.is_end_actor => {
            match cancel::open_bucket(client, &cfg.namespace).await {
                Ok(kv) => {
                    let set = cancel::Canceled::new();
                    cancel::watch(kv, set.clone(), cancel_stop.clone());
                    Some(set)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "canceled tasks will not be known to this sidecar");
                    None
                }
            }
        }
        _ => None,
    };
    let _depth = queue_depth::spawn(
        transport.clone(),
        metrics.clone(),
        vec![cfg.queue().map_err(sidecar::SidecarError::from)?],
        queue_depth::REFRESH,
    );
    let sidecar = SidecarBuilder::new(cfg, transport.clone())
        .metrics(metrics.clone())
        .policy(policy)
        .reporter(reporter)
        .canceled(canceled)
        .build();
    let admin_stop = CancellationToken::new();
    if let Some(listener) = admin_listener {
        let state = admin::AdminState {
            metrics,
            inflight: sidecar.deps.inflight.clone(),
            live: vec![sidecar.live_check()],
            checks: vec![
                sidecar.ready_check(),
                (
                    "transport".into(),
                    Arc::new(move || transport.is_connected()),
                ),
            ],
        };
        tokio::spawn(admin::serve(listener, state, admin_stop.clone()));
    }
    let exit = sidecar.run(shutdown).await;
    admin_stop.cancel();
    Ok(exit?)
}
