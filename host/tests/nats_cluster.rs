//! A three-server JetStream cluster losing its stream leader (issue #12 item 6): three
//! `nats-server`s on loopback (free ports, temp storage), streams and consumers replicated
//! three times, real `asya-host` sidecars with Python runtimes on a → b → c. Mid-run the
//! stream leader is killed with SIGKILL and, during the election that follows, sidecar `b`
//! is killed and started again. Every envelope must reach x-sink exactly once, none x-sump,
//! and no sidecar may exit (a sidecar starting during the election waits for the new leader,
//! bounded by `ASYA_NATS_STARTUP_TIMEOUT`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asya_host::queue::QueueName;
use asya_host::transport::nats::{NatsConfig, NatsTransport};
use asya_host::transport::{OutMessage, Transport};
use asya_test_support::kill9::{Actor, Seen};
use asya_test_support::{free_port, nats_server};
use async_nats::jetstream;

/// Envelopes per run (kept small: the test joins CI).
const ENVELOPES: usize = 1_500;
const ACK_WAIT: &str = "4s";

asya_test_support::kill9_transport_helpers!();

/// One server of the cluster.
struct Node {
    name: String,
    port: u16,
    monitor: u16,
    child: Option<Child>,
}

impl Node {
    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.monitor)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Three clustered servers with JetStream.
struct Cluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A free port can be taken by another test's process between `free_port` and a
    /// server's bind: that server exits at once, and the cluster starts again on new ports
    /// (as `nats_server::NatsServer::start` does for one server).
    fn start() -> Self {
        for _ in 0..5 {
            match Cluster::try_start() {
                Ok(c) => return c,
                Err(logs) if logs.contains("address already in use") => continue,
                Err(logs) => panic!("the cluster did not start:\n{logs}"),
            }
        }
        panic!("the cluster found its ports taken five times");
    }

    /// Start three servers and wait until every one is healthy; `Err` with their logs when
    /// one exits.
    fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let bin = nats_server::server_binary();
        let mut nodes = Vec::new();
        for (i, cport) in cluster_ports.iter().enumerate() {
            let name = format!("n{i}");
            let (port, monitor) = (free_port(), free_port());
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            let child = Command::new(&bin)
                .args(["-js", "-a", "127.0.0.1", "--server_name", &name])
                .args(["--cluster_name", "asya", "--routes", &routes])
                .arg("-p")
                .arg(port.to_string())
                .arg("-m")
                .arg(monitor.to_string())
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{cport}"))
                .arg("-sd")
                .arg(dir.path().join(&name))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            nodes.push(Node {
                name,
                port,
                monitor,
                child: Some(child),
            });
        }
        let mut c = Cluster { nodes, dir };
        // Every server answers /healthz 200 once JetStream has a meta leader.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.nodes.iter().all(Node::healthy) {
            let exited = c.nodes.iter_mut().any(|n| {
                n.child
                    .as_mut()
                    .is_some_and(|ch| matches!(ch.try_wait(), Ok(Some(_))))
            });
            if exited {
                return Err(c.logs());
            }
            assert!(
                Instant::now() < deadline,
                "cluster not healthy within 30s:\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(c)
    }

    /// Every server's log (the temp dir is gone once a failed test unwinds).
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", n.name)))
                    .unwrap_or_default();
                format!("== {}\n{log}", n.name)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Envelope `e-<i>` routed a → b → c.
fn envelope(i: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": format!("e-{i}"),
        "route": {"prev": [], "curr": "a", "next": ["b", "c"]},
        "payload": {"i": i},
    }))
    .unwrap()
}

/// The server name leading `stream`, if it has a leader now.
async fn stream_leader(js: &jetstream::Context, stream: &str) -> Option<String> {
    let mut s = js.get_stream(stream).await.ok()?;
    s.info().await.ok()?.cluster.as_ref()?.leader.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_killed_and_sidecar_restarted_during_election() {
    let mut cluster = Cluster::start();
    let url = cluster.url();
    let ns = "clu";
    let started = Instant::now();

    // Provision right after the cluster came up (its stream placement may still be settling).
    let out = Command::new(env!("CARGO_BIN_EXE_asya-host"))
        .env("ASYA_NATS_REPLICAS", "3")
        .env("ASYA_NATS_ACK_WAIT", ACK_WAIT)
        .args(["provision", "--namespace", ns, "--actors", "a,b,c"])
        .args(["--nats-url", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "provision failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t = Arc::new(
        NatsTransport::connect(NatsConfig {
            replicas: 3,
            ack_wait: Duration::from_secs(4),
            ..NatsConfig::new(&url)
        })
        .await
        .unwrap(),
    );
    let js = jetstream::new(t.client().clone());
    let sink = Arc::new(Mutex::new(Seen::default()));
    let sump = Arc::new(Mutex::new(Seen::default()));
    let collectors = [
        collect(
            t.clone(),
            QueueName::new(ns, "x-sink").unwrap(),
            sink.clone(),
        ),
        collect(
            t.clone(),
            QueueName::new(ns, "x-sump").unwrap(),
            sump.clone(),
        ),
    ];
    let env = Arc::new(vec![
        ("ASYA_NAMESPACE".to_owned(), ns.to_owned()),
        ("ASYA_TRANSPORT".to_owned(), "nats".to_owned()),
        ("ASYA_NATS_URL".to_owned(), url.clone()),
        ("ASYA_NATS_REPLICAS".to_owned(), "3".to_owned()),
        ("ASYA_NATS_ACK_WAIT".to_owned(), ACK_WAIT.to_owned()),
        ("ASYA_NATS_DUPLICATE_WINDOW".to_owned(), "2m".to_owned()),
        ("ASYA_NATS_STARTUP_TIMEOUT".to_owned(), "45s".to_owned()),
    ]);
    let mut actors: Vec<Actor> = ["a", "b", "c"]
        .iter()
        .map(|a| Actor::start(env!("CARGO_BIN_EXE_asya-host"), a, env.clone()))
        .collect();

    let queue = QueueName::new(ns, "a").unwrap();
    for chunk in (0..ENVELOPES).collect::<Vec<_>>().chunks(250) {
        let msgs = chunk
            .iter()
            .map(|&i| OutMessage {
                queue: queue.clone(),
                id: format!("in-{i}"),
                body: envelope(i).into(),
            })
            .collect();
        t.send_all(msgs).await.unwrap();
    }
    println!("published {ENVELOPES} in {:?}", started.elapsed());

    let stream = format!("asya-{ns}");
    let deadline = Instant::now() + Duration::from_secs(75);
    let mut killed_at: Option<Instant> = None;
    let mut last_print = Instant::now();
    let mut done_at: Option<Instant> = None;
    // After the kill: when the stream had a new leader, when x-sink moved again.
    let mut killed_leader = String::new();
    let mut elected: Option<Duration> = None;
    let mut last_sink = (0, Instant::now());
    let mut longest_stall = Duration::ZERO;
    loop {
        let (n, sumped) = (sink.lock().unwrap().unique(), sump.lock().unwrap().unique());
        if n != last_sink.0 {
            last_sink = (n, Instant::now());
        }
        if let Some(k) = killed_at {
            if n < ENVELOPES {
                longest_stall = longest_stall.max(last_sink.1.elapsed().min(k.elapsed()));
            }
            if elected.is_none() {
                let probe =
                    tokio::time::timeout(Duration::from_millis(300), stream_leader(&js, &stream));
                if let Ok(Some(l)) = probe.await {
                    if l != killed_leader {
                        elected = Some(k.elapsed());
                    }
                }
            }
        }
        let exited: Vec<String> = actors
            .iter_mut()
            .filter_map(|a| a.sidecar_exited().map(|s| format!("{} ({s})", a.name)))
            .collect();
        if !exited.is_empty() {
            let logs: String = actors.iter().map(Actor::logs).collect();
            panic!(
                "sidecar {exited:?} exited at x-sink {n}/{ENVELOPES}, {:?} after the leader was killed\n{logs}",
                killed_at.map(|k| k.elapsed())
            );
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            println!(
                "{:>5.1}s  x-sink {n}/{ENVELOPES}  x-sump {sumped}",
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        if killed_at.is_none() && n >= ENVELOPES / 4 {
            let leader = stream_leader(&js, &stream)
                .await
                .expect("the stream has a leader before the kill");
            let node = cluster
                .nodes
                .iter_mut()
                .find(|nd| nd.name == leader)
                .expect("leader is one of ours");
            node.kill9();
            killed_at = Some(Instant::now());
            killed_leader = leader.clone();
            actors[1].kill9_and_restart();
            println!("kill -9 stream leader {leader} at x-sink {n}; sidecar b restarted");
        }
        if n >= ENVELOPES {
            // Keep watching past ack_wait so late duplicates would show.
            let at = *done_at.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        if Instant::now() > deadline {
            let logs: String = actors.iter().map(Actor::logs).collect();
            panic!("timed out: x-sink {n}/{ENVELOPES}, x-sump {sumped}\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in collectors {
        c.abort();
    }
    println!(
        "stream leader elected {elected:?} after the kill; longest x-sink stall after it {longest_stall:?}"
    );
    let sink = sink.lock().unwrap();
    let sump = sump.lock().unwrap();
    let dups = sink.duplicates();
    println!(
        "done in {:?}: x-sink {} unique, {} duplicated; x-sump {}",
        started.elapsed(),
        sink.unique(),
        dups.len(),
        sump.unique()
    );
    assert!(
        dups.is_empty(),
        "duplicates at x-sink: {:?}",
        &dups[..dups.len().min(5)]
    );
    assert_eq!(sink.unique(), ENVELOPES, "envelopes missing at x-sink");
    for i in 0..ENVELOPES {
        assert!(sink.by_id.contains_key(&format!("e-{i}")), "e-{i} missing");
    }
    assert_eq!(sump.unique(), 0, "envelopes in x-sump");
    for a in actors.iter_mut() {
        assert!(a.sidecar_exited().is_none(), "sidecar {} exited", a.name);
    }
}
