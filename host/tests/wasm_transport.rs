//! `ASYA_TRANSPORT=wasm` against real components: the allow-list sandbox, a runaway and a
//! trapping transport, the conformance suite with `plugins/redis-streams` on a real
//! `redis-server` (started per test on a free port), and the 3-actor kill -9 test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asya_host::queue::QueueName;
use asya_host::transport::conformance::{self, NamespaceFn, Options};
use asya_host::transport::wasm::{AllowList, WasmConfig, WasmTransport};
use asya_host::transport::{OutMessage, Transport};
use asya_test_support::{plugin, RedisServer};

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
                queue: QueueName::new("t", "q").unwrap(),
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
    let mut rx = t
        .subscribe(&QueueName::new("t", "q").unwrap(), 4)
        .await
        .unwrap();
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
// NATS test in `nats.rs`; the process helpers are `asya_test_support::kill9`.

mod e2e {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use rand::Rng;

    use asya_host::queue::QueueName;
    use asya_host::transport::wasm::{AllowList, WasmConfig, WasmTransport};

    use asya_test_support::kill9::{self, Actor, Seen, ENVELOPES};
    use asya_test_support::{plugin, RedisServer};

    const ACK_WAIT_MS: u64 = 2_000;

    asya_test_support::kill9_transport_helpers!();

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill9_middle_sidecar_redis_streams() {
        let server = RedisServer::start();
        let cache = tempfile::tempdir().unwrap();
        let ns = format!("k{}", std::process::id());
        let wasm = plugin("redis_streams");
        let config = serde_json::json!({
            "addr": server.addr(),
            "ack_wait_ms": ACK_WAIT_MS,
            "dedup_ttl_ms": 300_000,
        })
        .to_string();
        let env = Arc::new(vec![
            ("ASYA_NAMESPACE".to_owned(), ns.clone()),
            ("ASYA_TRANSPORT".to_owned(), "wasm".to_owned()),
            (
                "ASYA_TRANSPORT_PLUGIN".to_owned(),
                wasm.display().to_string(),
            ),
            ("ASYA_TRANSPORT_CONFIG".to_owned(), config.clone()),
            ("ASYA_TRANSPORT_ALLOW".to_owned(), server.addr()),
            (
                "ASYA_PLUGIN_CACHE_DIR".to_owned(),
                cache.path().display().to_string(),
            ),
        ]);
        let started = Instant::now();
        // The test's own client; compiles the component into the shared cache first.
        let mut cfg = WasmConfig::new(
            &wasm,
            &config,
            AllowList::parse(&server.addr()).await.unwrap(),
        );
        cfg.cache_dir = Some(cache.path().to_owned());
        let t = Arc::new(WasmTransport::connect(cfg).await.unwrap());
        let sink = Arc::new(Mutex::new(Seen::default()));
        let sump = Arc::new(Mutex::new(Seen::default()));
        let collectors = [
            collect(
                t.clone(),
                QueueName::new(&ns, "x-sink").unwrap(),
                sink.clone(),
            ),
            collect(
                t.clone(),
                QueueName::new(&ns, "x-sump").unwrap(),
                sump.clone(),
            ),
        ];

        let mut actors: Vec<Actor> = ["a", "b", "c"]
            .iter()
            .map(|a| Actor::start(env!("CARGO_BIN_EXE_asya-host"), a, env.clone()))
            .collect();

        publish(t.as_ref(), &ns).await;
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
                actors[1].kill9_and_restart();
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
        kill9::assert_exactly_once(
            &ns,
            started.elapsed(),
            &sink.lock().unwrap(),
            &sump.lock().unwrap(),
        );
        drop(actors);
    }
}
