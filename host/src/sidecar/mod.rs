//! The sidecar loop (SPEC §5): receive → parse → check → invoke → route → ack, with
//! retries, crash-on-timeout, concurrency and graceful drain.
//!
//! - `plan`: the decisions of one delivery, pure (route rules, retries, status stamps,
//!   sink/sump shapes, policy outcomes, settlement) — unit-tested without any process;
//! - `delivery`: the I/O around them (runtime call, policy calls, publish, settle);
//! - `msgid`: every message id and assigned envelope id;
//! - `gate`: whether the runtime can take calls (probed every second; consumption pauses
//!   while it is unreachable);
//! - this module: workers, concurrency, drain and exit.

mod delivery;
mod gate;
mod inflight;
mod msgid;
mod plan;
mod report;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::panic::AssertUnwindSafe;

use futures::future::BoxFuture;
use futures::FutureExt;

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
use crate::transport::{Delivery, Receiver, Transport, TransportError};

pub use inflight::{Inflight, InflightRow, Stage};
pub use report::{HopReport, Report, Reporter};

/// Why a sidecar stopped (when it did not fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown was requested and in-flight work drained.
    Shutdown,
    /// The runtime exceeded the actor timeout (or a call was cut by the envelope's
    /// deadline): the envelope went to x-sump and was acked; the process should exit
    /// non-zero so the orchestrator restarts the pair.
    RuntimeTimeout,
    /// The runtime became unreachable and did not come back within
    /// `ASYA_RUNTIME_READY_TIMEOUT`; the held deliveries were handed back.
    RuntimeLost,
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

/// Shared state for `/readyz` and `/healthz`.
#[derive(Default)]
pub struct Readiness {
    runtime_ready: AtomicBool,
    consuming: AtomicBool,
    /// A worker died outside a delivery: the sidecar no longer consumes as configured.
    broken: AtomicBool,
}

impl Readiness {
    /// `/readyz`: the runtime is reachable now (re-probed every second) and the queue is
    /// consumed.
    pub fn is_ready(&self) -> bool {
        self.runtime_ready.load(Ordering::Relaxed)
            && self.consuming.load(Ordering::Relaxed)
            && self.is_live()
    }

    /// `/healthz`: false once a worker died, so the orchestrator restarts the pod.
    pub fn is_live(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
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
    /// Canceled task ids: an envelope of one goes to x-sink as canceled, uncalled.
    pub canceled: Option<Arc<crate::cancel::Canceled>>,
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
            canceled: None,
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
    gate: gate::Gate,
    metrics: ActorMetrics,
    inflight: Arc<Inflight>,
    policy: Option<Arc<dyn RoutePolicy>>,
    reporter: Option<Arc<dyn Reporter>>,
    canceled: Option<Arc<crate::cancel::Canceled>>,
}

/// Run one sidecar until `shutdown` is cancelled (→ [`Exit::Shutdown`]), the runtime times
/// out with crash-on-timeout (→ [`Exit::RuntimeTimeout`]) or stays unreachable
/// (→ [`Exit::RuntimeLost`]).
pub async fn run(
    cfg: SidecarConfig,
    deps: Deps,
    shutdown: CancellationToken,
) -> Result<Exit, SidecarError> {
    let mut rules = plan::Rules::new(&cfg)?;
    rules.max_output_bytes = deps.transport.max_message_bytes();
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

    let metrics = ActorMetrics::new(
        deps.metrics.clone(),
        queue.as_str(),
        deps.transport.kind().as_str(),
    );
    let shared = Arc::new(Shared {
        rules,
        actor: Arc::from(cfg.actor.as_str()),
        gate: gate::Gate::new(deps.readiness.clone(), metrics.outages.clone()),
        metrics,
        queue,
        transport: deps.transport.clone(),
        runtime,
        inflight: deps.inflight.clone(),
        policy: deps.policy.clone(),
        reporter: deps.reporter.clone(),
        canceled: deps.canceled.clone(),
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
    // Probes the runtime while it is up; waits for it while it is down.
    let watchdog = (!shared.cfg.is_end_actor).then(|| tokio::spawn(gate::watch(shared.clone())));

    let exit = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Exit::Shutdown,
            _ = crash.cancelled() => break Exit::RuntimeTimeout,
            () = shared.gate.lost() => break Exit::RuntimeLost,
            Some(ended) = workers.join_next() => {
                if let Err(e) = ended {
                    if e.is_panic() {
                        // A panic outside a delivery (those are caught and fail the delivery):
                        // this worker is gone, so say so where the orchestrator looks.
                        shared.metrics.panics.inc();
                        deps.readiness.broken.store(true, Ordering::Relaxed);
                        error!(actor = %shared.actor, panic = %panic_text(e.into_panic().as_ref()), "a worker died; /healthz and /readyz now fail so the pod is restarted");
                    }
                }
            }
        }
    };
    if let Some(w) = watchdog {
        w.abort();
    }
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
        Exit::RuntimeLost => {
            // The workers holding deliveries for the runtime hand them back, then stop.
            let handed_back = tokio::time::timeout(shared.cfg.shutdown_grace, async {
                while workers.join_next().await.is_some() {}
            })
            .await;
            if handed_back.is_err() {
                workers.abort_all();
            }
            error!(actor = %shared.actor, waited = ?shared.cfg.ready_timeout, "the runtime did not come back within ASYA_RUNTIME_READY_TIMEOUT; exiting so the pair is restarted");
        }
    }
    while workers.join_next().await.is_some() {}
    Ok(exit)
}

/// The text of a panic payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(not a string)".to_owned()
    }
}

/// One worker: receive, handle, settle. The previous delivery's settlement (the ack and its
/// confirmation by the broker) runs while the next delivery is received and handled, so a
/// broker round trip per envelope leaves the critical path; a worker has at most one
/// settlement outstanding, and waits for it before it settles the next or stops.
///
/// A panic while handling a delivery (a dependency's assert, a bug of ours) is caught: the
/// delivery is failed ([`delivery::panicked`]), the panic counted and logged with the
/// envelope id, and the worker goes on.
async fn worker(
    shared: Arc<Shared>,
    mut source: Source,
    stop: CancellationToken,
    crash: CancellationToken,
) {
    let mut settling: Option<BoxFuture<'_, ()>> = None;
    loop {
        // Take nothing while the runtime is unreachable.
        if !shared.gate.is_up() {
            if let Some(previous) = settling.take() {
                previous.await;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                up = shared.gate.wait_up() => if !up { break },
            }
        }
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
                let Delivery {
                    body,
                    attempt,
                    acker,
                } = d;
                let work =
                    AssertUnwindSafe(delivery::handle(&shared, body.clone(), attempt, &*acker))
                        .catch_unwind();
                let outcome = match settling.take() {
                    Some(previous) => tokio::join!(work, previous).0,
                    None => work.await,
                };
                let handled = match outcome {
                    Ok(outcome) => outcome.with(acker),
                    Err(panic) => {
                        let text = panic_text(panic.as_ref());
                        delivery::panicked(&shared, &body, attempt, &text)
                            .await
                            .with(acker)
                    }
                };
                if let Some(exit) = handled.exits() {
                    // The envelope is settled (in x-sump, or handed back): then stop.
                    delivery::settle(&shared, handled).await;
                    if exit == Exit::RuntimeTimeout {
                        crash.cancel();
                    }
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
    async fn recv(&mut self) -> Result<Delivery, TransportError> {
        match self {
            Source::Owned(rx) => rx.recv().await,
            Source::Shared(rx) => rx.lock().await.recv().await,
        }
    }
}
