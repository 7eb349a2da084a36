//! The in-process harnesses of the end-to-end tests: they need `asya-host`'s types, so they
//! live here rather than in `asya-test-support` (which the host's own tests use too).
//!
//! - [`Harness`]: one sidecar for actor `a` with the scripted fixture runtime, on the memory
//!   transport; [`Consumer`] reads a queue.
//! - [`mesh::Mesh`]: stock runtimes and their sidecars plus x-sink / x-sump, for the gateway.

use std::sync::Arc;
use std::time::Duration;

use asya_host::config::SidecarConfig;
use asya_host::metrics::Metrics;
use asya_host::queue::QueueName;
use asya_host::sidecar::{Deps, Exit, SidecarError};
use asya_host::transport::memory::MemoryTransport;
use asya_host::transport::{OutMessage, Receiver, Transport};
use asya_host::SidecarBuilder;
use asya_test_support::{eventually, init_logging, FixtureRuntime};
use bytes::Bytes;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod mesh;

/// The namespace of the harnesses' queues.
pub const NS: &str = "t";

/// One in-process sidecar for actor `actor` with a scripted runtime.
pub struct Harness {
    pub runtime: FixtureRuntime,
    pub transport: MemoryTransport,
    pub metrics: Arc<Metrics>,
    pub deps: Deps,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<Result<Exit, SidecarError>>>,
    pub cfg: SidecarConfig,
}

impl Harness {
    /// Config for actor `a` in namespace `t`, fast retries; `tweak` adjusts it.
    pub fn start(tweak: impl FnOnce(&mut SidecarConfig)) -> Self {
        init_logging();
        let runtime = FixtureRuntime::start();
        let mut cfg = SidecarConfig::new("a", NS, runtime.dir.path());
        cfg.ready_timeout = Duration::from_secs(20);
        cfg.resiliency.max_attempts = 1;
        cfg.resiliency.backoff_initial = Duration::from_millis(10);
        cfg.resiliency.backoff_max = Duration::from_millis(50);
        cfg.resiliency.actor_timeout = Duration::from_secs(10);
        cfg.shutdown_grace = Duration::from_secs(5);
        tweak(&mut cfg);
        let transport = MemoryTransport::new();
        let metrics = Metrics::new("asya_actor");
        let sidecar = SidecarBuilder::new(cfg.clone(), Arc::new(transport.clone()))
            .metrics(metrics.clone())
            .build();
        let deps = sidecar.deps.clone();
        let shutdown = CancellationToken::new();
        let task = sidecar.spawn(shutdown.clone());
        Harness {
            runtime,
            transport,
            metrics,
            deps,
            shutdown,
            task: Some(task),
            cfg,
        }
    }

    /// Wait (at most 20 s) until the sidecar consumes. A test whose envelope carries a near
    /// deadline builds it after this, so its clock does not run while the runtime starts.
    pub async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !self.deps.readiness.is_ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the sidecar is not consuming within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn queue(actor: &str) -> QueueName {
        QueueName::new(NS, actor).expect("valid test actor")
    }

    /// Publish raw bytes to this actor's queue.
    pub async fn send_raw(&self, body: impl Into<Bytes>) {
        self.transport
            .send(OutMessage {
                queue: self.cfg.queue().expect("valid test actor"),
                id: String::new(),
                body: body.into(),
            })
            .await
            .expect("memory send");
    }

    /// Publish an envelope with route `a -> next...` and this payload.
    pub async fn send(&self, id: &str, next: &[&str], payload: Value) {
        let env = serde_json::json!({
            "id": id,
            "route": {"prev": [], "curr": "a", "next": next},
            "headers": {"trace_id": format!("trace-{id}")},
            "payload": payload,
        });
        self.send_raw(serde_json::to_vec(&env).unwrap()).await;
    }

    pub async fn consumer(&self, actor: &str) -> Consumer {
        Consumer(
            self.transport
                .subscribe(&Self::queue(actor), 1000)
                .await
                .expect("subscribe"),
        )
    }

    /// Stop the sidecar and return how it exited.
    pub async fn stop(&mut self) -> Exit {
        self.shutdown.cancel();
        self.join().await
    }

    pub async fn join(&mut self) -> Exit {
        let task = self.task.take().expect("sidecar running");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("sidecar stops in time")
            .expect("sidecar task does not panic")
            .expect("sidecar runs")
    }

    /// The metrics text once no delivery is in flight (a delivery records its metrics
    /// before it leaves the in-flight registry; outputs can arrive before that).
    pub async fn scrape(&self) -> String {
        let inflight = self.deps.inflight.clone();
        assert!(
            eventually(Duration::from_secs(10), || inflight.is_empty()).await,
            "sidecar settles"
        );
        self.metrics.encode()
    }
}

/// Reads one queue.
pub struct Consumer(Box<dyn Receiver>);

impl Consumer {
    /// Next message as JSON (acked), or panic after 10 s.
    pub async fn next(&mut self) -> Value {
        self.next_within(Duration::from_secs(10))
            .await
            .expect("a message arrives within 10 s")
    }

    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let d = tokio::time::timeout(wait, self.0.recv())
            .await
            .ok()?
            .expect("recv");
        let v: Value = serde_json::from_slice(&d.body).expect("queue holds JSON");
        d.acker.ack().await.expect("ack");
        Some(v)
    }
}
