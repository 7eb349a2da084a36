//! NATS transport tests against a real `nats-server` (started per test on a free port):
//! the conformance suite for `memory` and `nats`, provisioning, the example pipeline through
//! `asya-host up --transport nats`, and the end-to-end kill -9 test with real `asya-host`
//! sidecar processes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use asya_host::queue::EndActors;
use asya_host::transport::conformance::{self, NamespaceFn, Options};
use asya_host::transport::memory::MemoryTransport;
use asya_host::transport::nats::{provision, NatsConfig, NatsTransport};
use asya_host::transport::Transport;
use asya_test_support::{plugin, NatsServer};

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
    let locs = provision(
        nats_config(&server),
        "prod-eu",
        &actors,
        &EndActors::default(),
    )
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
    provision(cfg.clone(), "prod-eu", &actors, &EndActors::default())
        .await
        .unwrap();
    let t = NatsTransport::connect(cfg).await.unwrap();
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

/// `asya-host provision` creates the consumers of the end actors named by
/// `ASYA_ACTOR_SINK` / `ASYA_ACTOR_SUMP`, and none for the default names.
#[test]
fn provision_creates_the_end_actors_named_by_the_variables() {
    let server = NatsServer::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_asya-host"))
        .args(["provision", "--namespace", "ends", "--actors", "a"])
        .args(["--nats-url", &server.url()])
        .env("ASYA_ACTOR_SINK", "done")
        .env("ASYA_ACTOR_SUMP", "dead")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let consumers: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.rsplit_once("consumer ").map(|(_, c)| c.trim()))
        .collect();
    assert_eq!(consumers, ["a", "done", "dead"], "{stdout}");
}

/// The README's NATS command for the local mesh (`bash examples/run.sh --transport nats
/// --nats-url URL`): the example pipeline runs through the broker with the same results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_pipeline_runs_on_nats() {
    plugin("priority-router");
    let server = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = tokio::process::Command::new("bash");
    cmd.args(["examples/run.sh", "--transport", "nats", "--nats-url"])
        .arg(server.url())
        .current_dir(&root)
        .env("ASYA_HOST_BIN", env!("CARGO_BIN_EXE_asya-host"))
        .env("TMPDIR", tmp.path())
        .env_remove("ASYA_LOG_LEVEL")
        .env_remove("RUST_LOG")
        .env_remove("ASYA_PYTHONEXECUTABLE")
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("the example finishes within 300s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 20, "{stderr}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["line"], i + 1, "results in input order: {l}");
        assert_eq!(l["status"], "succeeded", "{l}");
    }
    // r02 went through `escalate` (the route policy) on NATS too.
    assert!(lines[1]["result"].to_string().contains("\"ticket\":\"T-"));
    assert!(
        stderr.contains("20 tasks: 20 succeeded, 0 failed"),
        "{stderr}"
    );

    // The envelopes really went through the broker: the first actor's, the last actor's
    // and x-sink's durable consumers took their messages and acked them, and the work-queue
    // stream is empty (every message of every actor acked).
    let t = NatsTransport::connect(NatsConfig::new(&server.url()))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(t.client().clone());
    let mut stream = js.get_stream("asya-reviews").await.unwrap();
    for (consumer, at_least) in [("parse", 20), ("tally", 20), ("x-sink", 20)] {
        let info = stream.consumer_info(consumer).await.unwrap();
        assert!(
            info.delivered.consumer_sequence >= at_least,
            "{consumer}: {info:?}"
        );
        assert_eq!(info.num_ack_pending, 0, "{consumer}: {info:?}");
        assert_eq!(info.num_pending, 0, "{consumer}: {info:?}");
    }
    let left = stream.info().await.unwrap().state.messages;
    assert_eq!(
        left, 0,
        "a work-queue stream is empty once every message is acked"
    );
}

// ---------------------------------------------------------------------------------------
// End to end: real asya-host sidecars and runtimes, a 3-actor flow, kill -9 and a server
// restart; every envelope reaches x-sink exactly once, none reaches x-sump.

mod e2e {
    use std::process::Command;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use async_nats::jetstream;
    use rand::Rng;

    use asya_host::queue::QueueName;
    use asya_host::transport::nats::{NatsConfig, NatsTransport};

    use asya_test_support::kill9::{self, Actor, Seen, ENVELOPES};
    use asya_test_support::NatsServer;

    const ACK_WAIT: &str = "2s";

    asya_test_support::kill9_transport_helpers!();

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
        let t = Arc::new(
            NatsTransport::connect(NatsConfig {
                ack_wait: Duration::from_secs(2),
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
            ("ASYA_NATS_ACK_WAIT".to_owned(), ACK_WAIT.to_owned()),
            ("ASYA_NATS_DUPLICATE_WINDOW".to_owned(), "2m".to_owned()),
        ]);
        let mut actors: Vec<Actor> = ["a", "b", "c"]
            .iter()
            .map(|a| Actor::start(env!("CARGO_BIN_EXE_asya-host"), a, env.clone()))
            .collect();

        publish(t.as_ref(), ns).await;
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
                actors[1].kill9_and_restart();
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
        kill9::assert_exactly_once(
            ns,
            started.elapsed(),
            &sink.lock().unwrap(),
            &sump.lock().unwrap(),
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

/// `asya-host sump replay` over NATS: `--dry-run` shows and keeps, a run republishes the
/// original envelope (unwrapped, `x-asya-replays: 1`) to its actor's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sump_replay_command_republishes_the_original_envelope() {
    use asya_host::transport::{OutMessage, QueueName};
    let server = NatsServer::start();
    let cfg = nats_config(&server);
    let ns = format!("rpl{}", std::process::id());
    provision(cfg.clone(), &ns, &["a".to_owned()], &EndActors::default())
        .await
        .unwrap();
    let t = NatsTransport::connect(cfg).await.unwrap();
    let body = r#"{"id":"e1","route":{"prev":[],"curr":"a","next":[]},"headers":{"trace_id":"t"},"payload":{"error":"processing_error","details":null,"original_payload":{"k":1}},"status":{"phase":"failed","reason":"RuntimeError","actor":"a"}}"#;
    t.send(OutMessage {
        queue: QueueName::new(&ns, "x-sump").unwrap(),
        id: "s1".into(),
        body: body.into(),
    })
    .await
    .unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_asya-host"))
            .args(["sump", "replay", "--namespace", &ns])
            .args(extra)
            .env("ASYA_TRANSPORT", "nats")
            .env("ASYA_NATS_URL", server.url())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let dry = run(&["--dry-run", "--idle", "1s"]);
    assert!(
        dry.contains("would replay e1 -> a (reason RuntimeError/processing_error, replay 1)"),
        "{dry}"
    );
    assert!(dry.contains("dry run: replayed 1"), "{dry}");
    // Handed back 3 s after the run (past the run's last pull request).
    let other = run(&["--actor", "b", "--idle", "5s"]);
    assert!(
        other.contains("replayed 0") && other.contains("not matching 1"),
        "{other}"
    );
    let out = run(&["--idle", "5s"]);
    assert!(out.contains("replayed e1 -> a"), "{out}");
    let mut rx = t
        .subscribe(&QueueName::new(&ns, "a").unwrap(), 1)
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let env: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    assert_eq!(env["payload"], serde_json::json!({"k": 1}));
    assert_eq!(env["headers"]["x-asya-replays"], 1);
    assert_eq!(env["status"]["phase"], "pending");
}
