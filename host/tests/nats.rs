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

// ---------------------------------------------------------------------------------------
// End to end: real asya-host sidecars and runtimes, a 3-actor flow, kill -9 and a server
// restart; every envelope reaches x-sink exactly once, none reaches x-sump.

mod e2e {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use async_nats::jetstream;
    use rand::Rng;

    use super::nats_server::NatsServer;
    use asya_host::transport::nats::{NatsConfig, NatsTransport};
    use asya_host::transport::{OutMessage, Transport};

    const ENVELOPES: usize = 5_000;
    const ACK_WAIT: &str = "2s";

    /// A child process killed (SIGKILL) on drop.
    struct Proc(Child);

    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    /// The stock runtime (`sdk/python/asya_runtime.py` with a one-line handler) when
    /// `ASYA_E2E_RUNTIME=stock`, else the echo fixture.
    fn start_runtime(dir: &Path) -> Proc {
        let log = std::fs::File::create(dir.join("runtime.log")).unwrap();
        let mut cmd = Command::new("python3");
        if std::env::var("ASYA_E2E_RUNTIME").as_deref() == Ok("stock") {
            std::fs::write(
                dir.join("echo_handler.py"),
                "def echo(payload):\n    return payload\n",
            )
            .unwrap();
            cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/python/asya_runtime.py"))
                .env("ASYA_HANDLER", "echo_handler.echo")
                .env("PYTHONPATH", dir);
        } else {
            cmd.arg(fixture("echo_runtime_nats.py"));
        }
        let child = cmd
            .env("ASYA_SOCKET_DIR", dir.join("sock"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("python3");
        Proc(child)
    }

    fn start_sidecar(dir: &Path, actor: &str, ns: &str, url: &str, generation: usize) -> Proc {
        let log = std::fs::File::create(dir.join(format!("sidecar-{generation}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_asya-host"))
            .arg("sidecar")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ASYA_ACTOR_NAME", actor)
            .env("ASYA_NAMESPACE", ns)
            .env("ASYA_TRANSPORT", "nats")
            .env("ASYA_NATS_URL", url)
            .env("ASYA_NATS_ACK_WAIT", ACK_WAIT)
            .env("ASYA_NATS_DUPLICATE_WINDOW", "2m")
            .env("ASYA_SOCKET_DIR", dir.join("sock"))
            .env("ASYA_METRICS_ADDR", "off")
            .env("ASYA_CONCURRENCY", "16")
            .env("ASYA_RESILIENCY_MAX_ATTEMPTS", "1000")
            .env("ASYA_RESILIENCY_BACKOFF_INITIAL", "100ms")
            .env("ASYA_RESILIENCY_BACKOFF_MAX", "1s")
            .env("ASYA_RUNTIME_READY_TIMEOUT", "30s")
            .env("ASYA_SHUTDOWN_GRACE", "2s")
            .env(
                "ASYA_LOG_LEVEL",
                std::env::var("ASYA_E2E_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("asya-host binary");
        Proc(child)
    }

    struct Actor {
        name: &'static str,
        dir: tempfile::TempDir,
        _runtime: Proc,
        sidecar: Option<Proc>,
        generation: usize,
    }

    impl Actor {
        fn start(name: &'static str, ns: &str, url: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("sock")).unwrap();
            let runtime = start_runtime(dir.path());
            let sidecar = Some(start_sidecar(dir.path(), name, ns, url, 0));
            Actor {
                name,
                dir,
                _runtime: runtime,
                sidecar,
                generation: 0,
            }
        }

        fn kill9_and_restart(&mut self, ns: &str, url: &str) {
            drop(self.sidecar.take()); // SIGKILL + wait
            self.generation += 1;
            self.sidecar = Some(start_sidecar(
                self.dir.path(),
                self.name,
                ns,
                url,
                self.generation,
            ));
        }

        fn logs(&self) -> String {
            let mut out = String::new();
            for g in 0..=self.generation {
                let p = self.dir.path().join(format!("sidecar-{g}.log"));
                let text = std::fs::read_to_string(p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(12).collect();
                out += &format!(
                    "--- {} sidecar {g}\n{}\n",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let rt =
                std::fs::read_to_string(self.dir.path().join("runtime.log")).unwrap_or_default();
            let tail: Vec<&str> = rt.lines().rev().take(6).collect();
            out += &format!(
                "--- {} runtime\n{}\n",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            out
        }
    }

    /// Ids seen on an end queue: envelope id → first deliveries (attempt 1) and
    /// redeliveries. A duplicate publish is a second stream message with the same id, so it
    /// shows as a second first delivery; a redelivery to this test's own consumer does not.
    #[derive(Default)]
    struct Seen {
        by_id: HashMap<String, (usize, usize)>,
    }

    impl Seen {
        fn unique(&self) -> usize {
            self.by_id.len()
        }
        fn duplicates(&self) -> Vec<(&String, &(usize, usize))> {
            self.by_id
                .iter()
                .filter(|(_, (first, _))| *first > 1)
                .collect()
        }
    }

    /// Consume `queue` with the NATS transport into `seen`, acking each message.
    fn collect(
        t: NatsTransport,
        queue: String,
        seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut rx = t.subscribe(&queue, 256).await.expect("subscribe end queue");
            while let Ok(d) = rx.recv().await {
                let id = serde_json::from_slice::<serde_json::Value>(&d.body)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| "unparseable".into());
                {
                    let mut s = seen.lock().unwrap();
                    let e = s.by_id.entry(id).or_default();
                    if d.attempt == 1 {
                        e.0 += 1;
                    } else {
                        e.1 += 1;
                    }
                }
                let _ = d.acker.ack().await;
            }
        })
    }

    /// `consumer:pending/unacked` for every queue of `ns`.
    async fn backlog(js: &jetstream::Context, ns: &str) -> String {
        let Ok(stream) = js.get_stream(format!("asya-{ns}")).await else {
            return "stream unavailable".into();
        };
        let mut out = Vec::new();
        for c in ["a", "b", "c", "x-sink"] {
            match stream.consumer_info(c).await {
                Ok(i) => out.push(format!("{c}:{}/{}", i.num_pending, i.num_ack_pending)),
                Err(_) => out.push(format!("{c}:?")),
            }
        }
        out.join(" ")
    }

    fn envelope(i: usize) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "id": format!("e-{i}"),
            "route": {"prev": [], "curr": "a", "next": ["b", "c"]},
            "headers": {"trace_id": format!("t-{i}")},
            "payload": {"i": i, "text": "hello"},
        }))
        .unwrap()
    }

    /// One run: 5,000 envelopes through a → b → c, the middle sidecar killed `kills` times,
    /// the server restarted once if `restart_server`.
    async fn scenario(server: &mut NatsServer, ns: &str, kills: usize, restart_server: bool) {
        let url = server.url();
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_asya-host"))
            .env("ASYA_NATS_ACK_WAIT", ACK_WAIT)
            .args([
                "provision",
                "--namespace",
                ns,
                "--actors",
                "a,b,c",
                "--nats-url",
                &url,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "provision failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "[{ns}] provisioned:\n{}",
            String::from_utf8_lossy(&out.stdout).trim_end()
        );

        // Same consumer settings as the sidecars: what a server restart strands comes back
        // after one (short) ack wait.
        let t = NatsTransport::connect(NatsConfig {
            namespace: ns.into(),
            ack_wait: Duration::from_secs(2),
            ..NatsConfig::new(&url)
        })
        .await
        .unwrap();
        let js = jetstream::new(t.client().clone());
        let sink = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
        let sump = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
        let collectors = [
            collect(t.clone(), format!("asya-{ns}-x-sink"), sink.clone()),
            collect(t.clone(), format!("asya-{ns}-x-sump"), sump.clone()),
        ];

        let mut actors: Vec<Actor> = ["a", "b", "c"]
            .iter()
            .map(|a| Actor::start(a, ns, &url))
            .collect();

        let queue = format!("asya-{ns}-a");
        for chunk in (0..ENVELOPES).collect::<Vec<_>>().chunks(500) {
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
        println!(
            "[{ns}] published {ENVELOPES} envelopes in {:?}",
            started.elapsed()
        );

        // Kill points: random sink counts, spread over the run.
        let mut rng = rand::rng();
        let mut kill_at: Vec<usize> = (0..kills)
            .map(|_| rng.random_range(300..ENVELOPES - 800))
            .collect();
        kill_at.sort_unstable();
        let restart_at = restart_server.then(|| rng.random_range(1500..3000usize));
        let mut restarted = false;
        let deadline = Instant::now() + Duration::from_secs(150);
        let mut last_print = Instant::now();
        let mut done_at: Option<Instant> = None;
        let mut progress = (0, Instant::now());
        loop {
            let (n, sumped) = (sink.lock().unwrap().unique(), sump.lock().unwrap().unique());
            if n != progress.0 {
                progress = (n, Instant::now());
            }
            if n < ENVELOPES && progress.1.elapsed() > Duration::from_secs(30) {
                let logs: String = actors.iter().map(Actor::logs).collect();
                panic!(
                    "[{ns}] no progress for 30s: x-sink {n}/{ENVELOPES}, x-sump {sumped}\n{logs}"
                );
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                println!(
                    "[{ns}] {:>5.1}s  x-sink {n}/{ENVELOPES}  x-sump {sumped}  kills left {}  {}",
                    started.elapsed().as_secs_f64(),
                    kill_at.len(),
                    backlog(&js, ns).await
                );
                last_print = Instant::now();
            }
            if kill_at.first().is_some_and(|&k| n >= k) {
                // A random moment after the threshold, mid-processing.
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
                kill_at.remove(0);
                actors[1].kill9_and_restart(ns, &url);
                println!(
                    "[{ns}] kill -9 sidecar b at x-sink {n}; restarted (generation {})",
                    actors[1].generation
                );
            }
            if !restarted && restart_at.is_some_and(|r| n >= r) {
                restarted = true;
                let t0 = Instant::now();
                server.restart();
                println!(
                    "[{ns}] nats-server restarted at x-sink {n} (down {:?})",
                    t0.elapsed()
                );
            }
            if n >= ENVELOPES && kill_at.is_empty() && (restarted || !restart_server) {
                // Keep watching past ack_wait so late duplicates would show.
                let at = *done_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_secs(4) {
                    break;
                }
            }
            if Instant::now() > deadline {
                let logs: String = actors.iter().map(Actor::logs).collect();
                panic!("[{ns}] timed out: x-sink {n}/{ENVELOPES}, x-sump {sumped}\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for c in collectors {
            c.abort();
        }
        let sink = sink.lock().unwrap();
        let sump = sump.lock().unwrap();
        let dups = sink.duplicates();
        println!(
            "[{ns}] done in {:?}: x-sink {} unique, {} duplicated; x-sump {}",
            started.elapsed(),
            sink.unique(),
            dups.len(),
            sump.unique()
        );
        assert!(
            dups.is_empty(),
            "duplicates at x-sink: {:?}",
            dups.iter().take(5).collect::<Vec<_>>()
        );
        assert_eq!(sink.unique(), ENVELOPES, "envelopes missing at x-sink");
        for i in 0..ENVELOPES {
            assert!(
                sink.by_id.contains_key(&format!("e-{i}")),
                "e-{i} missing at x-sink"
            );
        }
        assert_eq!(
            sump.unique(),
            0,
            "envelopes in x-sump: {:?}",
            sump.by_id.keys().take(5).collect::<Vec<_>>()
        );
        drop(actors);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill9_middle_sidecar_and_restart_server() {
        let mut server = NatsServer::start();
        scenario(&mut server, "kill", 3, false).await;
        scenario(&mut server, "restart", 0, true).await;
    }
}
