//! The one way to wire a sidecar: its configuration plus its dependencies (transport,
//! metrics, in-flight table, route policies, reporter), used by the standalone binary
//! ([`crate::serve_sidecar`]), the local mesh ([`crate::mesh::up`]) and the tests.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::ReadyCheck;
use crate::config::SidecarConfig;
use crate::metrics::Metrics;
use crate::plugin::RoutePolicy;
use crate::sidecar::{self, Deps, Exit, Inflight, Reporter, SidecarError};
use crate::transport::Transport;

/// Builds a [`Sidecar`]. Unless set: metrics of its own (prefix `metrics_namespace`), an
/// in-flight table of its own, no route policy, no reporter.
pub struct SidecarBuilder {
    cfg: SidecarConfig,
    deps: Deps,
}

impl SidecarBuilder {
    pub fn new(cfg: SidecarConfig, transport: Arc<dyn Transport>) -> SidecarBuilder {
        let metrics = Metrics::new(&cfg.metrics_namespace);
        SidecarBuilder {
            deps: Deps::new(transport, metrics),
            cfg,
        }
    }

    /// Share a metrics registry (one per process).
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.deps.metrics = metrics;
        self
    }

    /// Share an in-flight table (one `/debug/inflight` for several sidecars).
    pub fn inflight(mut self, inflight: Arc<Inflight>) -> Self {
        self.deps.inflight = inflight;
        self
    }

    pub fn policy(mut self, policy: Option<Arc<dyn RoutePolicy>>) -> Self {
        self.deps.policy = policy;
        self
    }

    pub fn reporter(mut self, reporter: Option<Arc<dyn Reporter>>) -> Self {
        self.deps.reporter = reporter;
        self
    }

    /// Canceled task ids this sidecar honours ([`crate::cancel`]).
    pub fn canceled(mut self, canceled: Option<Arc<crate::cancel::Canceled>>) -> Self {
        self.deps.canceled = canceled;
        self
    }

    /// Call this runtime instead of a [`crate::runtime::RuntimeClient`] on the configured
    /// socket (tests script the runtime this way, with no process).
    pub fn runtime(mut self, runtime: Arc<dyn crate::runtime::Runtime>) -> Self {
        self.deps.runtime = Some(runtime);
        self
    }

    pub fn build(self) -> Sidecar {
        Sidecar {
            cfg: self.cfg,
            deps: self.deps,
        }
    }
}

/// A wired sidecar, ready to run.
#[derive(Clone)]
pub struct Sidecar {
    pub cfg: SidecarConfig,
    pub deps: Deps,
}

impl Sidecar {
    /// The `/readyz` check of this sidecar: `runtime:<actor>`, ready once its runtime
    /// answered and it consumes its queue.
    pub fn ready_check(&self) -> ReadyCheck {
        let readiness = self.deps.readiness.clone();
        (
            format!("runtime:{}", self.cfg.actor),
            Arc::new(move || readiness.is_ready()),
        )
    }

    /// The `/healthz` check of this sidecar: `worker:<actor>`, failing once a worker died.
    pub fn live_check(&self) -> ReadyCheck {
        let readiness = self.deps.readiness.clone();
        (
            format!("worker:{}", self.cfg.actor),
            Arc::new(move || readiness.is_live()),
        )
    }

    /// Run until `shutdown` (or a runtime timeout with crash-on-timeout).
    pub async fn run(self, shutdown: CancellationToken) -> Result<Exit, SidecarError> {
        sidecar::run(self.cfg, self.deps, shutdown).await
    }

    /// [`Sidecar::run`] as a task.
    pub fn spawn(self, shutdown: CancellationToken) -> JoinHandle<Result<Exit, SidecarError>> {
        tokio::spawn(self.run(shutdown))
    }
}
