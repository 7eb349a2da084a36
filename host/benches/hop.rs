//! One sidecar hop on the memory transport against an in-process Rust echo runtime on a Unix
//! socket (1 KB payloads), beside the raw HTTP-over-UDS echo round trip measured in the same
//! run. Run: `cargo bench -p asya-host --bench hop` (env: HOP_N samples per measurement,
//! default 20000; HOP_RUNS consecutive runs, default 5, each printed with its ratios).
//!
//! Printed:
//! - raw round trip: a hand-written HTTP/1.1 request on one keep-alive Unix-socket
//!   connection to the same echo runtime, response read by Content-Length (the floor);
//! - client round trip: the host's runtime client alone (hyper, pooled connection);
//! - host hop latency: publish one envelope to the actor's queue, receive it from x-sink
//!   (parse, invoke, route, publish, ack), one at a time;
//! - host throughput: N envelopes queued up front, drained by one sidecar at concurrency 1.
//!
//! Targets (ratios, since the machines' wake-up costs differ): host hop p50 ≤ 1.5 × raw p50,
//! throughput ≥ 0.6 × the raw round-trip rate.

// The benches' raw baseline runtime (not a test helper): `benches/echo_runtime/mod.rs`.
mod echo_runtime;

use std::sync::Arc;
use std::time::{Duration, Instant};

use asya_host::config::SidecarConfig;
use asya_host::metrics::Metrics;
use asya_host::queue::QueueName;
use asya_host::runtime::RuntimeClient;
use asya_host::sidecar::{self, Deps};
use asya_host::transport::memory::MemoryTransport;
use asya_host::transport::{OutMessage, Transport};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use echo_runtime::serve_echo;

fn envelope(id: &str, payload: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","route":{{"prev":[],"curr":"a","next":[]}},"headers":{{"trace_id":"t-{id}"}},"payload":{payload}}}"#
    )
    .into_bytes()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Stats {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

fn stats(mut samples: Vec<Duration>, total: Duration) -> Stats {
    samples.sort();
    Stats {
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        per_sec: samples.len() as f64 / total.as_secs_f64(),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Hand-written HTTP/1.1 on one keep-alive connection: the floor for one runtime call.
async fn raw_round_trips(path: &std::path::Path, body: &[u8], n: usize) -> Stats {
    let mut s = UnixStream::connect(path).await.unwrap();
    let mut req = format!(
        "POST /invoke HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\nx-request-id: 0\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let mut buf = vec![0u8; 64 * 1024];
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&req).await.unwrap();
        let mut have = 0;
        loop {
            let k = s.read(&mut buf[have..]).await.unwrap();
            assert!(k > 0, "echo runtime closed the connection");
            have += k;
            if let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..end])
                    .unwrap()
                    .to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap();
                if have >= end + 4 + len {
                    break;
                }
            }
        }
        samples.push(t.elapsed());
    }
    stats(samples, start.elapsed())
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

async fn client_round_trips(client: &RuntimeClient, body: &Bytes, n: usize) -> Stats {
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let r = client
            .invoke(
                body.clone(),
                tokio::time::Instant::now() + Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert!(matches!(r, asya_host::runtime::Reply::Frames(ref f) if f.len() == 1));
        samples.push(t.elapsed());
    }
    stats(samples, start.elapsed())
}

fn main() {
    let n: usize = std::env::var("HOP_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let runs: usize = std::env::var("HOP_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n, runs));
}

async fn run(n: usize, runs: usize) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("asya-runtime.sock");
    tokio::spawn(serve_echo(UnixListener::bind(&sock).unwrap()));
    std::fs::write(dir.path().join("runtime-ready"), "ready").unwrap();

    // ~1 KB payload.
    let payload =
        serde_json::to_string(&serde_json::json!({"text": "x".repeat(1000), "n": 1})).unwrap();
    let body = Bytes::from(envelope("warm", &payload));
    println!(
        "hop benchmark: n={n}, envelope {} bytes, payload {} bytes",
        body.len(),
        payload.len()
    );

    // Warm up and check the echo runtime answers a frame the host can parse.
    let client = RuntimeClient::new(&sock, 64 << 20);
    let _ = client_round_trips(&client, &body, 1000).await;

    // One sidecar, memory transport, concurrency 1.
    let transport = MemoryTransport::new();
    let metrics = Metrics::new("asya_actor");
    let mut cfg = SidecarConfig::new("a", "b", dir.path());
    cfg.socket_path = sock.clone();
    let deps = Deps::new(Arc::new(transport.clone()), metrics);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sidecar::run(cfg.clone(), deps, shutdown.clone()));
    let mut sink = transport
        .subscribe(&QueueName::new("b", "x-sink").unwrap(), 1)
        .await
        .unwrap();
    // Distinct envelope ids per phase: outputs carry deterministic message ids and the
    // memory transport deduplicates them, as a broker would.
    let bodies = |phase: &str| -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(envelope(&format!("{phase}{i}"), &payload)))
            .collect()
    };
    let send = |b: Bytes, _: usize| {
        let t = &transport;
        async move {
            t.send(OutMessage {
                queue: QueueName::new("b", "a").unwrap(),
                id: String::new(),
                body: b,
            })
            .await
            .unwrap()
        }
    };

    // Warm-up.
    for (i, b) in bodies("w").iter().take(1000).enumerate() {
        send(b.clone(), i).await;
        sink.recv().await.unwrap().acker.ack().await.unwrap();
    }
    println!();
    println!(
        "{:<6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}",
        "run",
        "raw p50",
        "cli p50",
        "hop p50",
        "hop p99",
        "raw /s",
        "hop tput/s",
        "hop/raw",
        "tput/raw"
    );
    let mut met = 0;
    for run in 0..runs {
        let raw = raw_round_trips(&sock, &body, n).await;
        let cli = client_round_trips(&client, &body, n).await;
        // Latency: one envelope at a time.
        let mut samples = Vec::with_capacity(n);
        let start = Instant::now();
        for (i, b) in bodies(&format!("l{run}-")).iter().enumerate() {
            let t = Instant::now();
            send(b.clone(), i).await;
            let d = sink.recv().await.unwrap();
            samples.push(t.elapsed());
            d.acker.ack().await.unwrap();
        }
        let hop = stats(samples, start.elapsed());

        // Throughput: queue everything, then drain.
        for (i, b) in bodies(&format!("t{run}-")).iter().enumerate() {
            send(b.clone(), i).await;
        }
        let start = Instant::now();
        for _ in 0..n {
            sink.recv().await.unwrap().acker.ack().await.unwrap();
        }
        let throughput = n as f64 / start.elapsed().as_secs_f64();
        let lat_ratio = us(hop.p50) / us(raw.p50);
        let tput_ratio = throughput / raw.per_sec;
        if lat_ratio <= 1.5 && tput_ratio >= 0.6 {
            met += 1;
        }
        println!(
            "{:<6} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>10.0} {:>8.2}x {:>8.2}x",
            run + 1,
            us(raw.p50),
            us(cli.p50),
            us(hop.p50),
            us(hop.p99),
            raw.per_sec,
            throughput,
            lat_ratio,
            tput_ratio
        );
    }
    shutdown.cancel();
    let _ = task.await;
    println!();
    println!(
        "targets: host hop p50 <= 1.5x raw p50 and throughput (concurrency 1) >= 0.6x the raw round-trip rate: met in {met} of {runs} runs"
    );
}
