//! One host hop over NATS JetStream vs the raw JetStream floor, measured in the same run
//! against the same throwaway `nats-server` (free port, temp store, killed at exit).
//! Run: `cargo bench -p asya-host --bench nats` (env: NATS_BENCH_N latency samples per
//! round, default 2000; NATS_BENCH_TPUT envelopes for throughput, default 20000).
//!
//! Three relays run side by side, each on its own namespace and connection:
//! - floor: a raw relay on the same layout, no host — pull one message (`batch(1)`),
//!   publish it to the next subject and await the PubAck, ack it with confirmation;
//! - transport alone: the same relay through `NatsTransport` (receive, send, ack);
//! - host hop: the sidecar loop (`asya_host::sidecar::run`, NATS transport, concurrency 1)
//!   with an in-process Rust echo runtime on a Unix socket (hyper).
//!
//! All three are measured the same way: publish one envelope to the actor's subject, time
//! until it arrives on the x-sink subject (a core-NATS subscription), one at a time.
//! - back to back (the target): the next envelope goes out as soon as the previous one
//!   arrived; the relays take turns in blocks of 100, so machine drift hits all alike;
//!   three rounds, the result is the median of their host/floor p50 ratios;
//! - isolated (for information): the relays alternate envelope by envelope, so every
//!   envelope finds its relay idle — the cold path of a sparse queue;
//! - fan-out: a fourth relay, the same host hop with the echo runtime answering 10 frames
//!   per envelope (all to x-sink); timed until the 10th arrives, beside the single-frame
//!   host hop of the same rounds (target: ≤ 2× its p50; the outputs of one delivery are
//!   published together and their PubAcks awaited together);
//! - throughput: N envelopes queued up front, drained by one sidecar at `ASYA_CONCURRENCY=16`.

// The benches' raw baseline runtime (not a test helper): `benches/echo_runtime/mod.rs`.
mod echo_runtime;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull::Config as PullConfig};
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use asya_host::config::SidecarConfig;
use asya_host::metrics::Metrics;
use asya_host::queue::{EndActors, QueueName};
use asya_host::sidecar::{self, Deps};
use asya_host::transport::nats::{NatsConfig, NatsTransport};
use asya_host::transport::{OutMessage, Transport, TransportKind};
use asya_test_support::{nats_server, NatsServer};
use echo_runtime::spawn_echo_thread;

fn envelope(id: &str) -> Bytes {
    envelope_with(id, 1)
}

/// An envelope the echo runtime answers with `frames` frames.
fn envelope_with(id: &str, frames: usize) -> Bytes {
    let fanout = if frames > 1 {
        format!(r#","fanout":{frames}"#)
    } else {
        String::new()
    };
    format!(
        r#"{{"id":"{id}","route":{{"prev":[],"curr":"a","next":[]}},"headers":{{"trace_id":"t-{id}"}},"payload":{{"text":"hello world","n":1{fanout}}}}}"#
    )
    .into()
}

/// Frames per envelope of the fan-out relay.
const FANOUT: usize = 10;

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

/// One relay under test: its connection (shared by the relay and the bench's publishes, as
/// a sidecar shares one), its actor queue and its x-sink subscription.
struct Pipeline {
    name: &'static str,
    t: NatsTransport,
    queue: QueueName,
    sink: async_nats::Subscriber,
    samples: Vec<Duration>,
    /// Envelopes sent so far: ids never repeat (the stream would drop a repeated id).
    sent: u64,
    /// Messages that arrive on x-sink per envelope.
    frames: usize,
}

impl Pipeline {
    async fn new(name: &'static str, t: NatsTransport, ns: &str) -> Self {
        let sink = t
            .client()
            .subscribe(format!("asya.{ns}.x-sink"))
            .await
            .unwrap();
        Pipeline {
            name,
            t,
            queue: QueueName::new(ns, "a").unwrap(),
            sink,
            samples: Vec::new(),
            sent: 0,
            frames: if name == "fanout" { FANOUT } else { 1 },
        }
    }

    /// Publish one envelope to actor `a`, time until it arrives on x-sink.
    async fn hop(&mut self) -> Duration {
        self.sent += 1;
        let id = &format!("{}-{}", self.name, self.sent);
        let start = Instant::now();
        self.t
            .send(OutMessage {
                queue: self.queue.clone(),
                id: id.to_owned(),
                body: envelope_with(id, self.frames),
            })
            .await
            .unwrap();
        for _ in 0..self.frames {
            tokio::time::timeout(Duration::from_secs(10), self.sink.next())
                .await
                .expect("hop within 10s")
                .unwrap();
        }
        start.elapsed()
    }

    fn lat(&mut self) -> Lat {
        self.samples.sort();
        Lat {
            p50: pct(&self.samples, 0.5),
            p90: pct(&self.samples, 0.9),
            p99: pct(&self.samples, 0.99),
        }
    }
}

/// `n` envelopes through every pipeline, one at a time, in blocks of `block` back to back;
/// the pipelines take turns block by block (the order rotates), so slow drift of a noisy
/// machine hits every pipeline alike. The first `warm` envelopes of each are not counted.
async fn interleaved(pipes: &mut [Pipeline], n: usize, warm: usize, block: usize) {
    for p in pipes.iter_mut() {
        p.samples.clear();
    }
    let mut sent = 0;
    for b in 0.. {
        if sent >= n + warm {
            break;
        }
        for k in 0..pipes.len() {
            let p = &mut pipes[(b + k) % pipes.len()];
            for i in sent..(sent + block).min(n + warm) {
                let took = p.hop().await;
                if i >= warm {
                    p.samples.push(took);
                }
            }
        }
        sent += block;
    }
}

/// Print one line per pipeline; returns the host's p50 over the floor's and the fan-out
/// hop's p50 over the single-frame host hop's.
fn report(label: &str, pipes: &mut [Pipeline]) -> (f64, f64) {
    let floor = pipes[0].lat().p50;
    let mut host = 0.0;
    let mut host_p50 = Duration::ZERO;
    let mut fanout = Duration::ZERO;
    for p in pipes.iter_mut() {
        let l = p.lat();
        let ratio = us(l.p50) / us(floor);
        println!(
            "  {label:<9} {:<40} p50 {:7.1} us  p90 {:7.1} us  p99 {:7.1} us  {ratio:.2}x floor",
            match p.name {
                "floor" => "floor (fetch 1 + publish/PubAck + ack)",
                "transport" => "transport alone (NatsTransport relay)",
                "fanout" => "host hop, 10 frames (until the 10th)",
                _ => "host hop (sidecar, echo runtime)",
            },
            us(l.p50),
            us(l.p90),
            us(l.p99),
        );
        match p.name {
            "host" => {
                host = ratio;
                host_p50 = l.p50;
            }
            "fanout" => fanout = l.p50,
            _ => {}
        }
    }
    (host, us(fanout) / us(host_p50))
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
    let mut rx = t
        .subscribe(&QueueName::new(&ns, "a").unwrap(), 1)
        .await
        .unwrap();
    let out = QueueName::new(&ns, "x-sink").unwrap();
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

fn start_sidecar(
    t: &NatsTransport,
    ns: &str,
    dir: &std::path::Path,
    concurrency: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut cfg = SidecarConfig::new("a", ns, dir);
    cfg.transport = TransportKind::Nats;
    cfg.concurrency = concurrency;
    let transport: Arc<dyn Transport> = Arc::new(t.clone());
    let deps = Deps::new(transport, Metrics::new("asya_actor"));
    tokio::spawn(async move {
        sidecar::run(cfg, deps, stop).await.unwrap();
    })
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
    // As `asya-host sidecar` runs: one thread (see host/src/main.rs); the echo runtime on a
    // thread of its own, as a handler runtime is a process of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&server, n, tput));
}

async fn run(server: &NatsServer, n: usize, tput: usize) {
    let dir = tempfile::tempdir().unwrap();
    spawn_echo_thread(&dir.path().join("asya-runtime.sock"));
    std::fs::write(dir.path().join("runtime-ready"), "ready").unwrap();
    let cfg = NatsConfig::new(&server.url());
    let connect = |_ns: &str| NatsTransport::connect(cfg.clone());
    println!(
        "nats bench: nats-server {} on {}, {n} samples per latency run",
        nats_server::server_binary().display(),
        server.url()
    );

    // The floor, the transport alone and the host hop, each on its own namespace and
    // connection, running side by side; the envelopes take turns between them.
    let mut pipes = Vec::new();
    let mut stops = Vec::new();
    for name in ["floor", "transport", "host", "fanout"] {
        let ns = format!("lat-{name}");
        let t = connect(&ns).await.unwrap();
        asya_host::transport::nats::provision(
            cfg.clone(),
            &ns,
            &["a".into()],
            &EndActors::default(),
        )
        .await
        .unwrap();
        let stop = CancellationToken::new();
        let task = match name {
            "floor" => tokio::spawn(raw_relay(
                jetstream::new(t.client().clone()),
                ns.clone(),
                stop.clone(),
            )),
            "transport" => tokio::spawn(transport_relay(t.clone(), ns.clone(), stop.clone())),
            _ => start_sidecar(&t, &ns, dir.path(), 1, stop.clone()),
        };
        stops.push((stop, task));
        pipes.push(Pipeline::new(name, t, &ns).await);
    }
    // Back to back (the next envelope is published as soon as the previous one is out), in
    // blocks of 100 per pipeline: three rounds, the median of their p50 ratios is the result.
    let mut ratios = Vec::new();
    let mut fanouts = Vec::new();
    for round in 0..3 {
        interleaved(&mut pipes, n, 100, 100).await;
        let (hop, fanout) = report(&format!("round {round}"), &mut pipes);
        ratios.push(hop);
        fanouts.push(fanout);
    }
    ratios.sort_by(f64::total_cmp);
    fanouts.sort_by(f64::total_cmp);
    println!(
        "hop p50 / floor p50, back to back: {:.2} (median of rounds {:.2}-{:.2}; target <= 1.30)",
        ratios[1], ratios[0], ratios[2]
    );
    println!(
        "10-frame hop p50 / single-frame hop p50, back to back: {:.2} (median of rounds {:.2}-{:.2}; target <= 2.00)",
        fanouts[1], fanouts[0], fanouts[2]
    );
    // Isolated: the pipelines alternate envelope by envelope, so each envelope finds its
    // relay idle (parked threads, pull request waiting): the cold path of a sparse queue.
    interleaved(&mut pipes, n, 100, 1).await;
    let (cold, _) = report("isolated", &mut pipes);
    println!("hop p50 / floor p50, isolated envelopes: {cold:.2} (for information)");
    for (stop, task) in stops {
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }

    // Throughput: queue everything, then drain with one sidecar at concurrency 16.
    let ns = "tput";
    let t = connect(ns).await.unwrap();
    asya_host::transport::nats::provision(cfg.clone(), ns, &["a".into()], &EndActors::default())
        .await
        .unwrap();
    let mut sink = t
        .client()
        .subscribe(format!("asya.{ns}.x-sink"))
        .await
        .unwrap();
    let queue = QueueName::new(ns, "a").unwrap();
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
    let stop = CancellationToken::new();
    let h = start_sidecar(&t, ns, dir.path(), 16, stop.clone());
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
