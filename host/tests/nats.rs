//! NATS transport tests against a real `nats-server` (started per test on a free port):
//! the conformance suite for `memory` and `nats`, provisioning, and the end-to-end
//! kill -9 test with real `asya-host` sidecar processes.

#[path = "support/nats_server.rs"]
mod nats_server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use asya_host::transport::conformance::{self, NamespaceFn, Options};
use asya_host::transport::memory::MemoryTransport;
use asya_host::transport::nats::{provision, NatsConfig, NatsTransport};
use asya_host::transport::Transport;
use nats_server::NatsServer;

fn namespaces(prefix: &'static str) -> NamespaceFn {
    let n = Arc::new(AtomicU64::new(0));
    let run = std::process::id();
    Arc::new(move || format!("{prefix}{run}n{}", n.fetch_add(1, Ordering::Relaxed)))
}

fn nats_config(server: &NatsServer) -> NatsConfig {
    NatsConfig {
        ack_wait: Duration::from_secs(5),
        duplicate_window: Duration::from_secs(30),
        ..NatsConfig::new(&server.url())
    }
}

#[tokio::test]
async fn conformance_memory() {
    let t: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let report = conformance::run(t, namespaces("mem"), &Options::default()).await;
    println!("{report}");
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_nats() {
    let server = NatsServer::start();
    let t: Arc<dyn Transport> =
        Arc::new(NatsTransport::connect(nats_config(&server)).await.unwrap());
    let report = conformance::run(t, namespaces("ct"), &Options::default()).await;
    println!("{report}");
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_is_idempotent_and_updates() {
    let server = NatsServer::start();
    let actors = vec!["a".to_string(), "b-c".to_string()];
    let locs = provision(nats_config(&server), "prod-eu", &actors)
        .await
        .unwrap();
    let subjects: Vec<&str> = locs.iter().map(|l| l.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "asya.prod-eu.a",
            "asya.prod-eu.b-c",
            "asya.prod-eu.x-sink",
            "asya.prod-eu.x-sump"
        ]
    );
    // Again, with a longer duplicate window: same layout, updated stream.
    let cfg = NatsConfig {
        duplicate_window: Duration::from_secs(300),
        ..nats_config(&server)
    };
    provision(cfg.clone(), "prod-eu", &actors).await.unwrap();
    let t = NatsTransport::connect(NatsConfig {
        namespace: "prod-eu".into(),
        ..cfg
    })
    .await
    .unwrap();
    let js = async_nats::jetstream::new(t.client().clone());
    let mut stream = js.get_stream("asya-prod-eu").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(300));
    assert_eq!(
        info.config.retention,
        async_nats::jetstream::stream::RetentionPolicy::WorkQueue
    );
    let c = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("b-c")
        .await
        .unwrap();
    assert_eq!(c.cached_info().config.max_deliver, -1);
    assert_eq!(c.cached_info().config.filter_subject, "asya.prod-eu.b-c");
}
