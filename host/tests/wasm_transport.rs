//! `ASYA_TRANSPORT=wasm` against real components: the allow-list sandbox, a runaway and a
//! trapping transport, the conformance suite with `plugins/redis-streams` on a real
//! `redis-server` (started per test on a free port), and the 3-actor kill -9 test.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asya_host::transport::conformance::{self, NamespaceFn, Options};
use asya_host::transport::wasm::{AllowList, WasmConfig, WasmTransport};
use asya_host::transport::{OutMessage, Transport};
use redis_server::{plugin, RedisServer};

fn namespaces(prefix: &'static str) -> NamespaceFn {
    let n = Arc::new(AtomicU64::new(0));
    let run = std::process::id();
    Arc::new(move || format!("{prefix}{run}n{}", n.fetch_add(1, Ordering::Relaxed)))
}

async fn allow(text: &str) -> AllowList {
    AllowList::parse(text).await.unwrap()
}

fn redis_config(server: &RedisServer) -> String {
    serde_json::json!({
        "addr": server.addr(),
        "ack_wait_ms": 1500,
        "dedup_ttl_ms": 120_000,
    })
    .to_string()
}

#[test]
fn plugin_check_sees_transports_and_policies_apart() {
    use asya_host::plugin::{check, World};
    for krate in [
        "redis_streams",
        "test_transport_dial",
        "test_transport_loop",
    ] {
        let r = check(&plugin(krate)).unwrap_or_else(|e| panic!("{krate}: {e}"));
        assert_eq!(r.world, World::Transport, "{krate}");
        assert!(
            r.exports.iter().all(|e| !e.contains("route-policy")),
            "{r:?}"
        );
    }
    // The SDK carries both worlds' bindings; a policy exports only its own.
    let r = check(&plugin("priority_router")).unwrap();
    assert_eq!(r.world, World::RoutePolicy);
    assert!(r.exports.iter().all(|e| !e.contains("transport")), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_transport_dial_outside_the_allow_list_is_denied() {
    let server = RedisServer::start();
    let dial = plugin("test_transport_dial");
    let cfg = serde_json::json!({ "addr": server.addr() }).to_string();

    // Listed: connects.
    let ok = WasmConfig::new(&dial, &cfg, allow(&server.addr()).await);
    WasmTransport::connect(ok)
        .await
        .expect("allowed address connects");

    // Not listed (other port, other address, nothing at all): permission denied.
    for list in [
        format!("127.0.0.1:{}", server.port + 1),
        format!("127.0.0.2:{}", server.port),
        String::new(),
    ] {
        let denied = WasmConfig::new(&dial, &cfg, allow(&list).await);
        let err = match WasmTransport::connect(denied).await {
            Ok(_) => panic!("connected with allow-list {list:?}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.to_lowercase().contains("permission denied")
                || err.to_lowercase().contains("access"),
            "allow-list {list:?}: {err}"
        );
    }

    // Name lookup is off when the list names no host: a name does not resolve.
    let by_name = serde_json::json!({ "addr": format!("localhost:{}", server.port) }).to_string();
    let no_lookup = WasmConfig::new(&dial, &by_name, allow(&server.addr()).await);
    assert!(WasmTransport::connect(no_lookup).await.is_err());
    // ... and on when it does (the resolved address is still checked).
    let lookup = WasmConfig::new(
        &dial,
        &by_name,
        allow(&format!("localhost:{}", server.port)).await,
    );
    WasmTransport::connect(lookup)
        .await
        .expect("listed name resolves and connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_transport_loop_runaway_and_trap_are_cut_off_and_replaced() {
    let mut cfg = WasmConfig::new(plugin("test_transport_loop"), "{}", AllowList::none());
    cfg.wait = Duration::from_millis(50);
    cfg.call_margin = Duration::from_millis(200);
    let t = Arc::new(WasmTransport::connect(cfg).await.unwrap());
    let metrics = asya_host::metrics::Metrics::new("test");
    t.attach_metrics(metrics.clone());

    // A trap (send panics): an error, the instance is replaced, the next call works on a
    // fresh instance (and traps again).
    for i in 1..=2 {
        let started = Instant::now();
        let err = t
            .send(OutMessage {
                queue: "q".into(),
                id: "m".into(),
                body: "x".into(),
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("trapped"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(t.restarts(), i);
    }

    // A runaway receive: cut off at wait + margin, re-instantiated, cut off again; the
    // host keeps running and recv stays cancel-safe.
    let mut rx = t.subscribe("q", 4).await.unwrap();
    let started = Instant::now();
    let before = t.restarts();
    while t.restarts() < before + 2 {
        assert!(
            tokio::time::timeout(Duration::from_millis(100), rx.recv())
                .await
                .is_err(),
            "a runaway transport delivered something"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "runaway receive was not cut off"
        );
    }
    println!(
        "two runaway receives cut off in {:?} (deadline 250 ms each)",
        started.elapsed()
    );
    // Counted: asya_plugin_calls_total{plugin, kind="transport", outcome="trap"|"timeout"}.
    let text = metrics.encode();
    for outcome in ["trap", "timeout"] {
        assert!(
            text.lines().any(|l| l.contains("plugin_calls_total")
                && l.contains("kind=\"transport\"")
                && l.contains(&format!("outcome=\"{outcome}\""))),
            "{outcome} not counted:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_redis_streams() {
    let server = RedisServer::start();
    let cfg = WasmConfig::new(
        plugin("redis_streams"),
        &redis_config(&server),
        allow(&server.addr()).await,
    );
    let t: Arc<dyn Transport> = Arc::new(WasmTransport::connect(cfg).await.unwrap());
    let report = conformance::run(t, namespaces("rs"), &Options::default()).await;
    println!("{report}");
    assert!(report.passed(), "{report}");
}

#[test]
fn plugin_test_cli_runs_the_suite_on_redis_streams() {
    let server = RedisServer::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_asya-host"))
        .args(["plugin", "test"])
        .arg(plugin("redis_streams"))
        .args([
            "--config",
            &redis_config(&server),
            "--allow",
            &server.addr(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("12/12 passed"), "{stdout}");
    // Not allowed to reach the broker: fails, naming the denial.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_asya-host"))
        .args(["plugin", "test"])
        .arg(plugin("redis_streams"))
        .args(["--config", &redis_config(&server)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("permission denied"), "{err}");
}

// ---------------------------------------------------------------------------------------
// End to end: real asya-host sidecars (ASYA_TRANSPORT=wasm, plugins/redis-streams) and
// runtimes, a 3-actor flow, the middle sidecar killed with SIGKILL three times; every
// envelope reaches x-sink exactly once, none reaches x-sump. The same scenario as the
// NATS test in `nats.rs` (its harness lives inside that file's `e2e` module, so the few
// process helpers are repeated here rather than shared).

mod e2e {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use rand::Rng;

    use super::redis_server::{plugin, RedisServer};
    use asya_host::transport::wasm::{AllowList, WasmConfig, WasmTransport};
    use asya_host::transport::{OutMessage, Transport};

    const ENVELOPES: usize = 5_000;
    const ACK_WAIT_MS: u64 = 2_000;

    /// A child process killed (SIGKILL) on drop.
    struct Proc(Child);

    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn start_runtime(dir: &Path) -> Proc {
        let log = std::fs::File::create(dir.join("runtime.log")).unwrap();
        let child = Command::new("python3")
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tests/fixtures/echo_runtime_nats.py"),
            )
            .env("ASYA_SOCKET_DIR", dir.join("sock"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("python3");
        Proc(child)
    }

    struct Env {
        ns: String,
        wasm: PathBuf,
        config: String,
        allow: String,
        cache: PathBuf,
    }

    fn start_sidecar(dir: &Path, actor: &str, env: &Env, generation: usize) -> Proc {
        let log = std::fs::File::create(dir.join(format!("sidecar-{generation}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_asya-host"))
            .arg("sidecar")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ASYA_ACTOR_NAME", actor)
            .env("ASYA_NAMESPACE", &env.ns)
            .env("ASYA_TRANSPORT", "wasm")
            .env("ASYA_TRANSPORT_PLUGIN", &env.wasm)
            .env("ASYA_TRANSPORT_CONFIG", &env.config)
            .env("ASYA_TRANSPORT_ALLOW", &env.allow)
            .env("ASYA_PLUGIN_CACHE_DIR", &env.cache)
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
        fn start(name: &'static str, env: &Env) -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("sock")).unwrap();
            let runtime = start_runtime(dir.path());
            let sidecar = Some(start_sidecar(dir.path(), name, env, 0));
            Actor {
                name,
                dir,
                _runtime: runtime,
                sidecar,
                generation: 0,
            }
        }

        fn kill9_and_restart(&mut self, env: &Env) {
            drop(self.sidecar.take()); // SIGKILL + wait
            self.generation += 1;
            self.sidecar = Some(start_sidecar(
                self.dir.path(),
                self.name,
                env,
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
            out
        }
    }

    /// First deliveries per envelope id on an end queue (a redelivery to this test's own
    /// consumer has attempt > 1 and is not counted; a duplicate publish is a second first
    /// delivery).
    #[derive(Default)]
    struct Seen {
        firsts: HashMap<String, usize>,
    }

    impl Seen {
        fn unique(&self) -> usize {
            self.firsts.len()
        }
        fn duplicates(&self) -> Vec<(&String, &usize)> {
            self.firsts.iter().filter(|(_, n)| **n > 1).collect()
        }
    }

    fn collect(
        t: Arc<WasmTransport>,
        queue: String,
        seen: Arc<Mutex<Seen>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut rx = t.subscribe(&queue, 64).await.expect("subscribe");
            while let Ok(d) = rx.recv().await {
                let id = serde_json::from_slice::<serde_json::Value>(&d.body)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| "unparseable".into());
                if d.attempt == 1 {
                    *seen.lock().unwrap().firsts.entry(id).or_default() += 1;
                }
                let _ = d.acker.ack().await;
            }
        })
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill9_middle_sidecar_redis_streams() {
        let server = RedisServer::start();
        let cache = tempfile::tempdir().unwrap();
        let env = Env {
            ns: format!("k{}", std::process::id()),
            wasm: plugin("redis_streams"),
            config: serde_json::json!({
                "addr": server.addr(),
                "ack_wait_ms": ACK_WAIT_MS,
                "dedup_ttl_ms": 300_000,
            })
            .to_string(),
            allow: server.addr(),
            cache: cache.path().to_owned(),
        };
        let ns = env.ns.clone();
        let started = Instant::now();
        // The test's own client; compiles the component into the shared cache first.
        let mut cfg = WasmConfig::new(
            &env.wasm,
            &env.config,
            AllowList::parse(&env.allow).await.unwrap(),
        );
        cfg.cache_dir = Some(env.cache.clone());
        let t = Arc::new(WasmTransport::connect(cfg).await.unwrap());
        let sink = Arc::new(Mutex::new(Seen::default()));
        let sump = Arc::new(Mutex::new(Seen::default()));
        let collectors = [
            collect(t.clone(), format!("asya-{ns}-x-sink"), sink.clone()),
            collect(t.clone(), format!("asya-{ns}-x-sump"), sump.clone()),
        ];

        let mut actors: Vec<Actor> = ["a", "b", "c"]
            .iter()
            .map(|a| Actor::start(a, &env))
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

        let mut rng = rand::rng();
        let mut kill_at: Vec<usize> = (0..3)
            .map(|_| rng.random_range(300..ENVELOPES - 800))
            .collect();
        kill_at.sort_unstable();
        let deadline = Instant::now() + Duration::from_secs(240);
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
                    "[{ns}] {:>5.1}s  x-sink {n}/{ENVELOPES}  x-sump {sumped}  kills left {}",
                    started.elapsed().as_secs_f64(),
                    kill_at.len(),
                );
                last_print = Instant::now();
            }
            if kill_at.first().is_some_and(|&k| n >= k) {
                // A random moment after the threshold, mid-processing.
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
                kill_at.remove(0);
                actors[1].kill9_and_restart(&env);
                println!(
                    "[{ns}] kill -9 sidecar b at x-sink {n}; restarted (generation {})",
                    actors[1].generation
                );
            }
            if n >= ENVELOPES && kill_at.is_empty() {
                // Keep watching past ack_wait so late duplicates would show.
                let at = *done_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_millis(2 * ACK_WAIT_MS) {
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
                sink.firsts.contains_key(&format!("e-{i}")),
                "e-{i} missing at x-sink"
            );
        }
        assert_eq!(
            sump.unique(),
            0,
            "envelopes in x-sump: {:?}",
            sump.firsts.keys().take(5).collect::<Vec<_>>()
        );
        drop(actors);
    }
}
