//! The sidecar loop (SPEC §5): receive → parse → check → invoke → route → ack, with
//! retries, crash-on-timeout, concurrency and graceful drain.
//!
//! - `plan`: the decisions of one delivery, pure (route rules, retries, status stamps,
//!   sink/sump shapes, policy outcomes, settlement) — unit-tested without any process;
//! - `delivery`: the I/O around them (runtime call, policy calls, publish, settle);
//! - `msgid`: every message id and assigned envelope id;
//! - this module: workers, concurrency, drain and exit.

mod delivery;
mod inflight;
mod msgid;
mod plan;
mod report;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;

use tokio::sync::Mutex as AsyncMutex;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::SidecarConfig;
use crate::metrics::{ActorMetrics, Metrics};
use crate::plugin::RoutePolicy;
use crate::queue::QueueName;
use crate::runtime::{Runtime, RuntimeClient, RuntimeError};
use crate::transport::{Receiver, Transport, TransportError};

pub use inflight::{Inflight, InflightRow, Stage};
pub use report::{HopReport, Report, Reporter};

/// Why a sidecar stopped (when it did not fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown was requested and in-flight work drained.
    Shutdown,
    /// The runtime exceeded the actor timeout: the envelope went to x-sump and was acked;
    /// the process should exit non-zero so the orchestrator restarts the pair.
    RuntimeTimeout,
}

/// Why a sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("runtime is not ready: {0}")]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Queue(#[from] crate::queue::InvalidName),
    #[error("cannot consume queue {queue}: {source}")]
    Subscribe {
        queue: String,
        #[source]
        source: TransportError,
    },
}

/// Shared state for `/readyz`.
#[derive(Default)]
pub struct Readiness {
    runtime_ready: AtomicBool,
    consuming: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.runtime_ready.load(Ordering::Relaxed) && self.consuming.load(Ordering::Relaxed)
    }
}

/// What a sidecar is wired to.
#[derive(Clone)]
pub struct Deps {
    pub transport: Arc<dyn Transport>,
    pub metrics: Arc<Metrics>,
    pub inflight: Arc<Inflight>,
    pub readiness: Arc<Readiness>,
    pub policy: Option<Arc<dyn RoutePolicy>>,
    pub reporter: Option<Arc<dyn Reporter>>,
    /// The runtime to call; `None` (the default): a [`RuntimeClient`] on the configured
    /// socket.
    pub runtime: Option<Arc<dyn Runtime>>,
}

impl Deps {
    pub fn new(transport: Arc<dyn Transport>, metrics: Arc<Metrics>) -> Self {
        Deps {
            transport,
            metrics,
            inflight: Inflight::new(),
            readiness: Arc::new(Readiness::default()),
            policy: None,
            reporter: None,
            runtime: None,
        }
    }
}

/// Everything a worker needs, shared by all workers of one sidecar.
struct Shared {
    cfg: SidecarConfig,
    rules: plan::Rules,
    actor: Arc<str>,
    queue: QueueName,
    transport: Arc<dyn Transport>,
    runtime: Arc<dyn Runtime>,
    metrics: ActorMetrics,
    inflight: Arc<Inflight>,
    policy: Option<Arc<dyn RoutePolicy>>,
    reporter: Option<Arc<dyn Reporter>>,
}

/// Run one sidecar until `shutdown` is cancelled (→ [`Exit::Shutdown`]) or the runtime times
/// out with crash-on-timeout (→ [`Exit::RuntimeTimeout`]).
pub async fn run(
    cfg: SidecarConfig,
    deps: Deps,
    shutdown: CancellationToken,
) -> Result<Exit, SidecarError> {
    let rules = plan::Rules::new(&cfg)?;
    let queue = rules.queue.clone();
    let runtime: Arc<dyn Runtime> = match &deps.runtime {
        Some(r) => r.clone(),
        None => Arc::new(RuntimeClient::new(&cfg.socket_path, cfg.max_message_bytes)),
    };
    if !cfg.is_end_actor {
        info!(actor = %cfg.actor, socket = %cfg.socket_path.display(), "waiting for runtime");
        tokio::select! {
            r = runtime.wait_ready(&cfg.ready_file, cfg.ready_timeout) => r?,
            _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
        }
    }
    deps.readiness.runtime_ready.store(true, Ordering::Relaxed);
    let receiver = deps
        .transport
        .subscribe(&queue, cfg.concurrency)
        .await
        .map_err(|source| SidecarError::Subscribe {
            queue: queue.to_string(),
            source,
        })?;
    deps.readiness.consuming.store(true, Ordering::Relaxed);
    info!(actor = %cfg.actor, %queue, concurrency = cfg.concurrency, transport = cfg.transport.as_str(), "consuming");

    let shared = Arc::new(Shared {
        rules,
        actor: Arc::from(cfg.actor.as_str()),
        metrics: ActorMetrics::new(
            deps.metrics.clone(),
            queue.as_str(),
            deps.transport.kind().as_str(),
        ),
        queue,
        transport: deps.transport.clone(),
        runtime,
        inflight: deps.inflight.clone(),
        policy: deps.policy.clone(),
        reporter: deps.reporter.clone(),
        cfg,
    });
    // Cancelled by a worker that hit a runtime timeout with crash-on-timeout.
    let crash = CancellationToken::new();
    let stop_receiving = CancellationToken::new();
    let mut workers = JoinSet::new();
    // One worker owns the receiver; several share it behind a lock (a worker holds the lock
    // only while it waits for its next delivery).
    let sources: Vec<Source> = if shared.cfg.concurrency <= 1 {
        vec![Source::Owned(receiver)]
    } else {
        let shared_rx = Arc::new(AsyncMutex::new(receiver));
        (0..shared.cfg.concurrency)
            .map(|_| Source::Shared(shared_rx.clone()))
            .collect()
    };
    for source in sources {
        workers.spawn(worker(
            shared.clone(),
            source,
            stop_receiving.clone(),
            crash.clone(),
        ));
    }

    let exit = tokio::select! {
        _ = shutdown.cancelled() => Exit::Shutdown,
        _ = crash.cancelled() => Exit::RuntimeTimeout,
    };
    stop_receiving.cancel();
    deps.readiness.consuming.store(false, Ordering::Relaxed);
    match exit {
        Exit::Shutdown => {
            let grace = shared.cfg.shutdown_grace;
            info!(actor = %shared.actor, in_flight = shared.metrics.active.get(), ?grace, "draining");
            let drained = tokio::time::timeout(grace, async {
                while workers.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                // Unacked deliveries are redelivered by the broker; nothing is dead-lettered.
                warn!(actor = %shared.actor, "shutdown grace elapsed; in-flight envelopes left unacked for redelivery");
                workers.abort_all();
            }
        }
        Exit::RuntimeTimeout => {
            error!(actor = %shared.actor, "runtime exceeded the actor timeout; exiting so the runtime is restarted");
            // Other in-flight envelopes stay unacked and are redelivered.
            workers.abort_all();
        }
    }
    while workers.join_next().await.is_some() {}
    Ok(exit)
}

/// One worker: receive, handle, settle. The previous delivery's settlement (the ack and its
/// confirmation by the broker) runs while the next delivery is received and handled, so a
/// broker round trip per envelope leaves the critical path; a worker has at most one
/// settlement outstanding, and waits for it before it settles the next or stops.
async fn worker(
    shared: Arc<Shared>,
    mut source: Source,
    stop: CancellationToken,
    crash: CancellationToken,
) {
    let mut settling: Option<BoxFuture<'_, ()>> = None;
    loop {
        let waited = Instant::now();
        let next = source.recv();
        tokio::pin!(next);
        let delivery = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break None,
                () = async { settling.as_mut().expect("guarded by the condition").await },
                    if settling.is_some() => settling = None,
                d = &mut next => break Some(d),
            }
        };
        let Some(delivery) = delivery else { break };
        match delivery {
            Ok(d) => {
                shared
                    .metrics
                    .receive_duration
                    .observe(waited.elapsed().as_secs_f64());
                let work = delivery::handle(&shared, d);
                let handled = match settling.take() {
                    Some(previous) => tokio::join!(work, previous).0,
                    None => work.await,
                };
                if handled.exits() {
                    // The envelope is in x-sump: ack it, then stop the sidecar.
                    delivery::settle(&shared, handled).await;
                    crash.cancel();
                    return;
                }
                settling = Some(Box::pin(delivery::settle(&shared, handled)));
            }
            Err(TransportError::Closed) => {
                stop.cancel();
                break;
            }
            Err(e) => {
                shared
                    .metrics
                    .failed(crate::metrics::FailReason::TransportError);
                warn!(actor = %shared.actor, error = %e, "receive failed; retrying");
                if let Some(previous) = settling.take() {
                    previous.await;
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                }
            }
        }
    }
    if let Some(previous) = settling {
        previous.await;
    }
}

/// Where a worker takes its deliveries from.
enum Source {
    /// The only worker: no lock between it and the transport.
    Owned(Box<dyn Receiver>),
    Shared(Arc<AsyncMutex<Box<dyn Receiver>>>),
}

impl Source {
    /// Cancel-safe, as [`Receiver::recv`] is.
    async fn recv(&mut self) -> Result<crate::transport::Delivery, TransportError> {
        match self {
            Source::Owned(rx) => rx.recv().await,
            Source::Shared(rx) => rx.lock().await.recv().await,
        }
    }
}
