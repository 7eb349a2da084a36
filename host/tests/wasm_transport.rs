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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_outside_the_allow_list_is_denied() {
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
async fn runaway_and_trapping_transport_are_cut_off_and_replaced() {
    let mut cfg = WasmConfig::new(plugin("test_transport_loop"), "{}", AllowList::none());
    cfg.wait = Duration::from_millis(50);
    cfg.call_margin = Duration::from_millis(200);
    let t = Arc::new(WasmTransport::connect(cfg).await.unwrap());

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
