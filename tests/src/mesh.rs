//! A small in-process mesh for gateway tests: one stock Python runtime per actor
//! (`sdk/python/asya_runtime.py`, handlers from `tests/fixtures/handlers/`), every sidecar
//! and the x-sink / x-sump end actors in this process on one shared transport.

use std::sync::Arc;
use std::time::Duration;

use asya_host::config::SidecarConfig;
use asya_host::metrics::Metrics;
use asya_host::sidecar::{Exit, Reporter, SidecarError};
use asya_host::transport::Transport;
use asya_host::SidecarBuilder;
use asya_test_support::{init_logging, StockRuntime};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Actors (name, `module.function`) plus x-sink and x-sump, reporting to `reporter`.
pub struct Mesh {
    _runtimes: Vec<StockRuntime>,
    tasks: Vec<JoinHandle<Result<Exit, SidecarError>>>,
    pub shutdown: CancellationToken,
}

impl Mesh {
    pub fn start(
        transport: Arc<dyn Transport>,
        namespace: &str,
        actors: &[(&str, &str)],
        reporter: Arc<dyn Reporter>,
        tweak: impl Fn(&mut SidecarConfig),
    ) -> Mesh {
        Mesh::start_with(transport, namespace, actors, reporter, None, tweak)
    }

    /// [`Mesh::start`] with every sidecar honouring the canceled task ids of `canceled`
    /// (the gateway's [`asya_host::gateway::Gateway::canceled`]).
    pub fn start_with(
        transport: Arc<dyn Transport>,
        namespace: &str,
        actors: &[(&str, &str)],
        reporter: Arc<dyn Reporter>,
        canceled: Option<Arc<asya_host::cancel::Canceled>>,
        tweak: impl Fn(&mut SidecarConfig),
    ) -> Mesh {
        init_logging();
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new("asya_actor");
        let mut runtimes = Vec::new();
        let mut tasks = Vec::new();
        let spawn = |cfg: SidecarConfig, tasks: &mut Vec<_>| {
            let sidecar = SidecarBuilder::new(cfg, transport.clone())
                .metrics(metrics.clone())
                .reporter(Some(reporter.clone()))
                .canceled(canceled.clone())
                .build();
            tasks.push(sidecar.spawn(shutdown.clone()));
        };
        for (name, handler) in actors {
            let rt = StockRuntime::start(handler);
            let mut cfg = SidecarConfig::new(name, namespace, rt.dir.path());
            cfg.ready_timeout = Duration::from_secs(20);
            cfg.resiliency.max_attempts = 1;
            cfg.resiliency.actor_timeout = Duration::from_secs(20);
            cfg.resiliency.crash_on_timeout = false;
            cfg.shutdown_grace = Duration::from_secs(2);
            tweak(&mut cfg);
            spawn(cfg, &mut tasks);
            runtimes.push(rt);
        }
        for end in ["x-sink", "x-sump"] {
            let mut cfg = SidecarConfig::new(end, namespace, std::env::temp_dir());
            cfg.is_end_actor = true;
            cfg.shutdown_grace = Duration::from_secs(2);
            spawn(cfg, &mut tasks);
        }
        Mesh {
            _runtimes: runtimes,
            tasks,
            shutdown,
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
