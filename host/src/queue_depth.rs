//! `asya_actor_queue_depth{queue}`: the autoscaling signal we export ourselves. Each
//! sidecar refreshes its own queue; the gateway refreshes every actor of its flows, so a
//! queue whose actor is scaled to zero still has a depth (scale-from-zero needs a signal
//! while no sidecar runs).
//!
//! Why our own gauge next to KEDA's NATS JetStream scaler: that scaler reads the monitoring
//! endpoint of whichever server answers (stale counts from followers on a cluster) and
//! reads a missing consumer as an infinite backlog. Consumer info comes from the consumer's
//! leader, and a queue that does not exist yet has no series instead of a huge one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::{vars, ConfigError};
use crate::metrics::{Metrics, QueueLabel};
use crate::queue::QueueName;
use crate::transport::Transport;

/// How often the depth is read.
pub const REFRESH: Duration = Duration::from_secs(5);
/// Bound of one read (all queues of one refresh share it).
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Stops the refresh task when dropped.
pub struct DepthTask {
    stop: CancellationToken,
}

impl Drop for DepthTask {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Read the depth of every queue in `queues` now and then every `every`, into `metrics`.
/// Queues the transport cannot count are skipped (no series), errors are logged at DEBUG
/// and the last value stays.
pub fn spawn(
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    queues: Vec<QueueName>,
    every: Duration,
) -> DepthTask {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = token.cancelled() => return,
            }
            refresh(transport.as_ref(), &metrics, &queues).await;
        }
    });
    DepthTask { stop }
}

/// One refresh of every queue.
pub async fn refresh(transport: &dyn Transport, metrics: &Metrics, queues: &[QueueName]) {
    for queue in queues {
        match tokio::time::timeout(READ_TIMEOUT, transport.queue_depth(queue)).await {
            Ok(Ok(Some(n))) => {
                let l = QueueLabel {
                    queue: queue.to_string(),
                };
                metrics
                    .queue_depth
                    .get_or_create(&l)
                    .set(n.min(i64::MAX as u64) as i64);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => debug!(%queue, error = %e, "cannot read the queue depth"),
            Err(_) => debug!(%queue, "reading the queue depth timed out"),
        }
    }
}

/// The queues the gateway watches: every actor of `flows`, and the end actors.
pub fn gateway_queues<'a>(
    namespace: &str,
    flows: impl IntoIterator<Item = &'a Vec<String>>,
    ends: [&'a str; 2],
) -> Vec<QueueName> {
    let mut out: Vec<QueueName> = Vec::new();
    for actor in flows.into_iter().flatten().map(String::as_str).chain(ends) {
        // Flow files and end actors are validated names; one that is not cannot be a queue.
        let Ok(q) = QueueName::new(namespace, actor) else {
            continue;
        };
        if !out.contains(&q) {
            out.push(q);
        }
    }
    out
}

/// Why the gateway's metrics server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind the gateway's metrics server on {addr}: {source} (set {var} to another address, or off)", var = vars::METRICS_ADDR.name)]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The gateway's `/metrics` (and `/healthz`, `/readyz`) on `ASYA_METRICS_ADDR` (off unless
/// set): the queue depth of every queue in `queues`. Server and refresh stop when the
/// returned guard drops.
pub async fn serve_gateway_metrics(
    addr: Option<SocketAddr>,
    namespace: &str,
    transport: Arc<dyn Transport>,
    queues: Vec<QueueName>,
) -> Result<Option<DepthTask>, ExporterError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ExporterError::Bind { addr, source })?;
    let metrics = Metrics::new(namespace);
    let t = transport.clone();
    let state = crate::admin::AdminState {
        metrics: metrics.clone(),
        inflight: crate::sidecar::Inflight::new(),
        checks: vec![("transport".into(), Arc::new(move || t.is_connected()))],
        live: Vec::new(),
    };
    let task = spawn(transport, metrics, queues, REFRESH);
    tokio::spawn(crate::admin::serve(
        listener,
        state,
        task.stop.child_token(),
    ));
    Ok(Some(task))
}
