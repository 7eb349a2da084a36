//! Shared harness: real runtime processes on real Unix sockets, in-process sidecars on the
//! memory transport, polling with deadlines (no sleeps as synchronisation).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use asya_host::config::SidecarConfig;
use asya_host::metrics::Metrics;
use asya_host::queue::QueueName;
use asya_host::sidecar::{Deps, Exit, SidecarError};
use asya_host::transport::memory::MemoryTransport;
use asya_host::transport::{OutMessage, Receiver, Transport};
use asya_host::SidecarBuilder;
use bytes::Bytes;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const NS: &str = "t";

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A runtime process serving on `dir/asya-runtime.sock`; killed on drop.
pub struct RuntimeProcess {
    child: Child,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl RuntimeProcess {
    /// `tests/fixtures/scripted_runtime.py` (behaviour chosen by each payload's `op`).
    pub fn scripted() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("invocations.log");
        let child = Command::new("python3")
            .arg(repo_root().join("tests/fixtures/scripted_runtime.py"))
            .env("ASYA_SOCKET_DIR", dir.path())
            .env("SCRIPTED_LOG", &log)
            .stdin(Stdio::null())
            .spawn()
            .expect("python3 starts");
        RuntimeProcess { child, dir, log }
    }

    /// Ids of the envelopes the runtime was invoked with, in order.
    pub fn invocations(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for RuntimeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One in-process sidecar for actor `actor` with a scripted runtime.
pub struct Harness {
    pub runtime: RuntimeProcess,
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
        let runtime = RuntimeProcess::scripted();
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

/// `ASYA_TEST_LOG=debug cargo test ...` shows the host's logs.
pub fn init_logging() {
    if let Ok(level) = std::env::var("ASYA_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_test_writer()
            .try_init();
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

/// Poll `cond` every 10 ms until it holds or `wait` passes.
pub async fn eventually(wait: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of one sample line of the text exposition, e.g.
/// `metric_value(&text, "asya_actor_messages_failed_total", &[("reason", "parse_error")])`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
