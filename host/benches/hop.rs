//! One sidecar hop on the memory transport against an in-process Rust echo runtime on a Unix
//! socket (1 KB payloads), beside the raw HTTP-over-UDS echo round trip measured in the same
//! run. Run: `cargo bench -p asya-host --bench hop` (env: HOP_N samples per measurement,
//! default 20000; HOP_RUNS consecutive runs, default 5, each printed with its ratios;
//! HOP_ONE_THREAD=1 runs the echo runtime on the bench's own thread, so that a hop costs its
//! CPU work alone, without any wake-up — a diagnostic of how fast this machine executes).
//!
//! Printed:
//! - raw round trip: a hand-written HTTP/1.1 request on one keep-alive Unix-socket
//!   connection to the same echo runtime, response read by Content-Length (the floor);
//! - client round trip: the host's runtime client alone (hyper, pooled connection);
//! - host hop latency: publish one envelope to the actor's queue, receive it from x-sink
//!   (parse, invoke, route, publish, ack), one at a time;
//! - host throughput: N envelopes queued up front, drained by one sidecar at concurrency 1.
//!
//! The latency samples are interleaved (a raw round trip, a client call, a hop, in turn, the
//! order rotating), so the floor and the hop are measured under the same machine state; the
//! raw rate for the throughput ratio is a separate back-to-back run. Before the table: context
//! switches and CPU time per operation of each kind (Linux `/proc`).
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
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use echo_runtime::{spawn_echo_task, spawn_echo_thread};

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
struct Raw {
    s: UnixStream,
    req: Vec<u8>,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(path: &std::path::Path, body: &[u8]) -> Raw {
        let mut req = format!(
            "POST /invoke HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\nx-request-id: 0\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        Raw {
            s: UnixStream::connect(path).await.unwrap(),
            req,
            buf: vec![0u8; 64 * 1024],
        }
    }

    /// One request and its whole response.
    async fn round_trip(&mut self) {
        self.s.write_all(&self.req).await.unwrap();
        let mut have = 0;
        loop {
            let k = self.s.read(&mut self.buf[have..]).await.unwrap();
            assert!(k > 0, "echo runtime closed the connection");
            have += k;
            if let Some(end) = find(&self.buf[..have], b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])
                    .unwrap()
                    .to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap();
                if have >= end + 4 + len {
                    return;
                }
            }
        }
    }
}

async fn raw_round_trips(raw: &mut Raw, n: usize) -> Stats {
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        raw.round_trip().await;
        samples.push(t.elapsed());
    }
    stats(samples, start.elapsed())
}

/// Context switches (every thread's, voluntary or not) and CPU time (ns, every thread's) of
/// this process so far, from /proc: the scheduler hand-offs and the work an operation costs,
/// which its wall-clock time only hints at. `None` without Linux's `/proc`.
fn sched_counters() -> Option<(u64, u64)> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    let mut switches = 0;
    let mut cpu_ns = 0;
    for t in tasks.flatten() {
        if let Ok(status) = std::fs::read_to_string(t.path().join("status")) {
            switches += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Ok(stat) = std::fs::read_to_string(t.path().join("schedstat")) {
            cpu_ns += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some((switches, cpu_ns))
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// One call through the host's runtime client.
async fn client_call(client: &RuntimeClient, body: &Bytes) {
    let r = client
        .invoke(
            body.clone(),
            tokio::time::Instant::now() + Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(matches!(r, asya_host::runtime::Reply::Frames(ref f) if f.len() == 1));
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
    // As `asya-host sidecar` runs: one thread (see host/src/main.rs). The echo runtime is
    // on a thread of its own, as a handler runtime is a process of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n, runs));
}

async fn run(n: usize, runs: usize) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("asya-runtime.sock");
    if std::env::var_os("HOP_ONE_THREAD").is_some() {
        println!("HOP_ONE_THREAD: the echo runtime runs on the bench's thread (no wake-ups)");
        spawn_echo_task(&sock);
    } else {
        spawn_echo_thread(&sock);
    }
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
    for _ in 0..1000 {
        client_call(&client, &body).await;
    }
    let mut raw = Raw::connect(&sock, &body).await;

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
    // The actor's queue, named once: the harness's own work is not the host's.
    let input_queue = QueueName::new("b", "a").unwrap();
    let send = |b: Bytes, _: usize| {
        let (t, queue) = (&transport, input_queue.clone());
        async move {
            t.send(OutMessage {
                queue,
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
    // Context switches and CPU time per operation, each kind on its own (2,000 each).
    let k = 2000;
    let per_op = |before: Option<(u64, u64)>| {
        let (b, now) = (before?, sched_counters()?);
        Some((
            (now.0 - b.0) as f64 / k as f64,
            (now.1 - b.1) as f64 / 1e3 / k as f64,
        ))
    };
    let c = sched_counters();
    for _ in 0..k {
        raw.round_trip().await;
    }
    let raw_op = per_op(c);
    let c = sched_counters();
    for _ in 0..k {
        client_call(&client, &body).await;
    }
    let cli_op = per_op(c);
    let c = sched_counters();
    for (i, b) in bodies("cs").iter().take(k).enumerate() {
        send(b.clone(), i).await;
        sink.recv().await.unwrap().acker.ack().await.unwrap();
    }
    match (raw_op, cli_op, per_op(c)) {
        (Some(r), Some(c), Some(h)) => println!(
            "per operation (every thread of the process): raw {:.2} context switches, {:.1} us CPU; client {:.2}, {:.1} us; hop {:.2}, {:.1} us",
            r.0, r.1, c.0, c.1, h.0, h.1
        ),
        _ => println!("per operation: no /proc/self/task here (context switches and CPU time not shown)"),
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
        // Latency: one envelope at a time, a raw, a client and a hop sample in turn, so all
        // three see the same machine state. (Taken in separate phases, the raw floor alone
        // swung 25-77 us between phases on one idle VM: the ratio measured the phase.)
        let (mut raw_s, mut cli_s, mut hop_s) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let start = Instant::now();
        for (i, b) in bodies(&format!("l{run}-")).iter().enumerate() {
            // The order rotates: what runs right after another operation finds the threads
            // in a different state (a thread that just went idle wakes faster on these VMs).
            for k in 0..3 {
                let t = Instant::now();
                match (i + k) % 3 {
                    0 => {
                        raw.round_trip().await;
                        raw_s.push(t.elapsed());
                    }
                    1 => {
                        client_call(&client, &body).await;
                        cli_s.push(t.elapsed());
                    }
                    _ => {
                        send(b.clone(), i).await;
                        let d = sink.recv().await.unwrap();
                        hop_s.push(t.elapsed());
                        d.acker.ack().await.unwrap();
                    }
                }
            }
        }
        let took = start.elapsed();
        let (hop, cli) = (stats(hop_s, took), stats(cli_s, took));
        // The raw round-trip rate on its own (the throughput baseline).
        let raw = Stats {
            per_sec: raw_round_trips(&mut raw, n).await.per_sec,
            ..stats(raw_s, took)
        };

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
