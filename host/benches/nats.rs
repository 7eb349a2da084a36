//! One host hop over NATS JetStream vs the raw JetStream floor, measured in the same run
//! against the same throwaway `nats-server` (free port, temp store, killed at exit).
//! Run: `cargo bench -p asya-host --bench nats` (env: NATS_BENCH_N latency samples, default
//! 2000; NATS_BENCH_TPUT envelopes for throughput, default 20000).
//!
//! Printed:
//! - floor: a raw relay on the same layout, no host — pull one message (`batch(1)`),
//!   publish it to the next subject and await the PubAck, ack it with confirmation;
//! - host hop: the sidecar loop (`asya_host::sidecar::run`, NATS transport, concurrency 1)
//!   with an in-process Rust echo runtime on a Unix socket (hyper);
//!   both measured the same way: publish one envelope to the actor's subject, time until it
//!   arrives on the x-sink subject (a core-NATS subscription), one at a time;
//! - throughput: N envelopes queued up front, drained by one sidecar at `ASYA_CONCURRENCY=16`.

#[path = "support/echo_runtime.rs"]
mod echo_runtime;
#[path = "../tests/support/nats_server.rs"]
mod nats_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull::Config as PullConfig};
use bytes::Bytes;
use futures::StreamExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use asya_host::config::SidecarConfig;
use asya_host::metrics::Metrics;
use asya_host::sidecar::{self, Deps};
use asya_host::transport::nats::{NatsConfig, NatsTransport};
use asya_host::transport::{OutMessage, Transport, TransportKind};
use echo_runtime::serve_echo;
use nats_server::NatsServer;

fn envelope(id: &str) -> Bytes {
    format!(
        r#"{{"id":"{id}","route":{{"prev":[],"curr":"a","next":[]}},"headers":{{"trace_id":"t-{id}"}},"payload":{{"text":"hello world","n":1}}}}"#
    )
    .into()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Lat {
    p50: Duration,
    p90: Duration,
    p99: Duration,
}

/// Publish one envelope to `ns`'s actor `a`, wait for it on `ns`'s x-sink subject; `n` times.
async fn hop_latency(t: &NatsTransport, ns: &str, n: usize, warm: usize) -> Lat {
    let mut sink = t
        .client()
        .subscribe(format!("asya.{ns}.x-sink"))
        .await
        .unwrap();
    let queue = format!("asya-{ns}-a");
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + warm {
        let id = format!("{ns}-{i}");
        let start = Instant::now();
        t.send(OutMessage {
            queue: queue.clone(),
            id: id.clone(),
            body: envelope(&id),
        })
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(10), sink.next())
            .await
            .expect("hop within 10s")
            .unwrap();
        if i >= warm {
            samples.push(start.elapsed());
        }
    }
    samples.sort();
    Lat {
        p50: pct(&samples, 0.5),
        p90: pct(&samples, 0.9),
        p99: pct(&samples, 0.99),
    }
}

/// The floor: fetch one, publish with ack, ack with confirmation. No host.
async fn raw_relay(js: jetstream::Context, ns: String, stop: CancellationToken) {
    let stream = js.get_stream(format!("asya-{ns}")).await.unwrap();
    let consumer = stream.get_consumer::<PullConfig>("a").await.unwrap();
    let out = format!("asya.{ns}.x-sink");
    while !stop.is_cancelled() {
        let mut batch = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        while let Some(Ok(m)) = batch.next().await {
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| format!("{}:0:0", v.as_str()))
                .unwrap_or_default();
            let publish = jetstream::message::PublishMessage::build()
                .payload(m.payload.clone())
                .message_id(id);
            js.send_publish(out.clone(), publish)
                .await
                .unwrap()
                .await
                .unwrap();
            m.double_ack().await.unwrap();
        }
    }
}

/// The host's transport alone: `NatsTransport` receive (prefetch 1) → send → ack, no
/// runtime, no sidecar loop. Separates the transport's cost from the rest of the hop.
async fn transport_relay(t: NatsTransport, ns: String, stop: CancellationToken) {
    let mut rx = t.subscribe(&format!("asya-{ns}-a"), 1).await.unwrap();
    let out = format!("asya-{ns}-x-sink");
    for n in 0u64.. {
        let d = tokio::select! {
            d = rx.recv() => d.unwrap(),
            _ = stop.cancelled() => return,
        };
        t.send(OutMessage {
            queue: out.clone(),
            id: format!("{ns}-{n}:0:0"),
            body: d.body,
        })
        .await
        .unwrap();
        d.acker.ack().await.unwrap();
    }
}

async fn start_sidecar(
    t: &NatsTransport,
    ns: &str,
    dir: &std::path::Path,
    concurrency: usize,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut cfg = SidecarConfig::new("a", ns, dir);
    cfg.transport = TransportKind::Nats;
    cfg.concurrency = concurrency;
    let transport: Arc<dyn Transport> = Arc::new(t.clone());
    let deps = Deps::new(transport, Metrics::new("asya_actor"));
    let stop = CancellationToken::new();
    let s = stop.clone();
    let h = tokio::spawn(async move {
        sidecar::run(cfg, deps, s).await.unwrap();
    });
    (stop, h)
}

fn main() {
    let n: usize = std::env::var("NATS_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let tput: usize = std::env::var("NATS_BENCH_TPUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let server = NatsServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&server, n, tput));
}

async fn run(server: &NatsServer, n: usize, tput: usize) {
    let dir = tempfile::tempdir().unwrap();
    tokio::spawn(serve_echo(
        UnixListener::bind(dir.path().join("asya-runtime.sock")).unwrap(),
    ));
    std::fs::write(dir.path().join("runtime-ready"), "ready").unwrap();
    let cfg = NatsConfig::new(&server.url());
    let connect = |ns: &str| {
        NatsTransport::connect(NatsConfig {
            namespace: ns.into(),
            ..cfg.clone()
        })
    };
    println!(
        "nats bench: nats-server {} on {}, {n} samples per latency run",
        nats_server::server_binary().display(),
        server.url()
    );

    // Alternate floor and host runs; report the median of the per-run p50s.
    let mut floors = Vec::new();
    let mut hosts = Vec::new();
    for round in 0..3 {
        let ns = format!("floor{round}");
        let t = connect(&ns).await.unwrap();
        asya_host::transport::nats::provision(cfg.clone(), &ns, &["a".into()])
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let relay = tokio::spawn(raw_relay(
            jetstream::new(t.client().clone()),
            ns.clone(),
            stop.clone(),
        ));
        let floor = hop_latency(&t, &ns, n, 200).await;
        stop.cancel();
        relay.abort();
        println!(
            "  round {round} floor (fetch 1 + publish/PubAck + ack): p50 {:7.1} us  p90 {:7.1} us  p99 {:7.1} us",
            us(floor.p50), us(floor.p90), us(floor.p99)
        );

        let ns = format!("relay{round}");
        let t = connect(&ns).await.unwrap();
        asya_host::transport::nats::provision(cfg.clone(), &ns, &["a".into()])
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let relay = tokio::spawn(transport_relay(t.clone(), ns.clone(), stop.clone()));
        let trans = hop_latency(&t, &ns, n, 200).await;
        stop.cancel();
        let _ = relay.await;
        println!(
            "  round {round} transport relay (NatsTransport, no host): p50 {:7.1} us  p90 {:7.1} us  p99 {:7.1} us  ratio p50 {:.2}",
            us(trans.p50), us(trans.p90), us(trans.p99),
            us(trans.p50) / us(floor.p50)
        );

        let ns = format!("hop{round}");
        let t = connect(&ns).await.unwrap();
        asya_host::transport::nats::provision(cfg.clone(), &ns, &["a".into()])
            .await
            .unwrap();
        let (stop, h) = start_sidecar(&t, &ns, dir.path(), 1).await;
        let host = hop_latency(&t, &ns, n, 200).await;
        stop.cancel();
        let _ = h.await;
        println!(
            "  round {round} host hop (sidecar, echo runtime):     p50 {:7.1} us  p90 {:7.1} us  p99 {:7.1} us  ratio p50 {:.2}",
            us(host.p50), us(host.p90), us(host.p99),
            us(host.p50) / us(floor.p50)
        );
        floors.push(floor.p50);
        hosts.push(host.p50);
    }
    floors.sort();
    hosts.sort();
    let (f, h) = (floors[1], hosts[1]);
    println!(
        "hop p50: host {:.1} us vs floor {:.1} us -> ratio {:.2} (target <= 1.30)",
        us(h),
        us(f),
        us(h) / us(f)
    );

    // Throughput: queue everything, then drain with one sidecar at concurrency 16.
    let ns = "tput";
    let t = connect(ns).await.unwrap();
    asya_host::transport::nats::provision(cfg.clone(), ns, &["a".into()])
        .await
        .unwrap();
    let mut sink = t
        .client()
        .subscribe(format!("asya.{ns}.x-sink"))
        .await
        .unwrap();
    let queue = format!("asya-{ns}-a");
    for chunk in (0..tput).collect::<Vec<_>>().chunks(1000) {
        let msgs = chunk
            .iter()
            .map(|i| {
                let id = format!("t-{i}");
                OutMessage {
                    queue: queue.clone(),
                    body: envelope(&id),
                    id,
                }
            })
            .collect();
        t.send_all(msgs).await.unwrap();
    }
    let start = Instant::now();
    let (stop, h) = start_sidecar(&t, ns, dir.path(), 16).await;
    for _ in 0..tput {
        tokio::time::timeout(Duration::from_secs(30), sink.next())
            .await
            .expect("throughput run stalled")
            .unwrap();
    }
    let took = start.elapsed();
    stop.cancel();
    let _ = h.await;
    let rate = tput as f64 / took.as_secs_f64();
    println!(
        "throughput: {tput} envelopes through one sidecar (ASYA_CONCURRENCY=16) in {:.2} s -> {:.0} envelopes/s (target >= 5000)",
        took.as_secs_f64(),
        rate
    );
}
