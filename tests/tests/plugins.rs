//! End-to-end tests of the WebAssembly plugin system: every plugin in `plugins/` routes
//! (or fails) through a real sidecar loop, with the memory transport and a real runtime
//! process (the scripted fixture runtime, which echoes these payloads) on a real Unix socket.
//!
//! One test binary for every plugin test (link times). The `.wasm` files come from
//! `plugins/target/wasm32-wasip2/release/`; the helper builds them once per run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asya_host::config::SidecarConfig;
use asya_host::envelope::Envelope;
use asya_host::metrics::Metrics;
use asya_host::plugin::{
    self, Decision, PluginEngine, PluginError, PolicyChain, PolicyOptions, PolicySpec, RoutePolicy,
    World,
};
use asya_host::queue::QueueName;
use asya_host::sidecar::{Exit, SidecarError};
use asya_host::transport::memory::MemoryTransport;
use asya_host::transport::{OutMessage, Receiver, Transport};
use asya_host::SidecarBuilder;
use asya_test_support::{plugin, repo_root, FixtureRuntime};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NS: &str = "t";
const DEADLINE: Duration = Duration::from_millis(50);

/// Plugin folders (crates) under `plugins/`.
fn plugin_folders() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo_root().join("plugins"))
        .expect("plugins/ exists")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("Cargo.toml").is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// One engine per test binary; its compiled-code cache lives in the target dir.
fn engine() -> PluginEngine {
    static ENGINE: std::sync::OnceLock<PluginEngine> = std::sync::OnceLock::new();
    ENGINE
        .get_or_init(|| {
            PluginEngine::new(Some(
                PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("asya-plugin-cache"),
            ))
            .expect("engine")
        })
        .clone()
}

fn opts() -> PolicyOptions {
    PolicyOptions {
        deadline: DEADLINE,
        memory_limit: 16 << 20,
    }
}

fn spec(folder: &str, config: Value) -> PolicySpec {
    PolicySpec {
        path: plugin(folder),
        config,
    }
}

/// A real sidecar loop for actor `a` with a policy chain.
struct Mesh {
    _runtime: FixtureRuntime,
    transport: MemoryTransport,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<Exit, SidecarError>>>,
    cfg: SidecarConfig,
}

impl Mesh {
    async fn start(specs: &[PolicySpec]) -> Mesh {
        let runtime = FixtureRuntime::start();
        let mut cfg = SidecarConfig::new("a", NS, runtime.dir.path());
        cfg.ready_timeout = Duration::from_secs(20);
        cfg.resiliency.max_attempts = 1;
        cfg.resiliency.actor_timeout = Duration::from_secs(10);
        cfg.shutdown_grace = Duration::from_secs(5);
        let transport = MemoryTransport::new();
        let metrics = Metrics::new("asya_actor");
        let chain = PolicyChain::load(&engine(), specs, opts(), Some(metrics.clone()))
            .await
            .expect("policies load");
        let shutdown = CancellationToken::new();
        let task = SidecarBuilder::new(cfg.clone(), Arc::new(transport.clone()))
            .metrics(metrics.clone())
            .policy(Some(Arc::new(chain)))
            .build()
            .spawn(shutdown.clone());
        Mesh {
            _runtime: runtime,
            transport,
            metrics,
            shutdown,
            task: Some(task),
            cfg,
        }
    }

    /// Publish an envelope for actor `a` with `next` and this payload.
    async fn send(&self, id: &str, next: &[&str], payload: Value) {
        let env = json!({
            "id": id,
            "route": {"prev": [], "curr": "a", "next": next},
            "headers": {"trace_id": format!("trace-{id}")},
            "payload": payload,
        });
        self.transport
            .send(OutMessage {
                queue: self.cfg.queue().expect("valid test actor"),
                id: String::new(),
                body: serde_json::to_vec(&env).unwrap().into(),
            })
            .await
            .expect("memory send");
    }

    async fn consumer(&self, actor: &str) -> Consumer {
        Consumer(
            self.transport
                .subscribe(&QueueName::new(NS, actor).unwrap(), 100)
                .await
                .expect("subscribe"),
        )
    }

    fn calls(&self, plugin: &str, outcome: &str) -> f64 {
        metric_value(
            &self.metrics.encode(),
            "asya_plugin_calls_total",
            &[
                ("plugin", plugin),
                ("kind", "route-policy"),
                ("outcome", outcome),
            ],
        )
        .unwrap_or(0.0)
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        let exit = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("sidecar stops in time")
            .expect("no panic")
            .expect("sidecar runs");
        assert_eq!(exit, Exit::Shutdown);
    }
}

struct Consumer(Box<dyn Receiver>);

impl Consumer {
    async fn next(&mut self) -> Value {
        let d = tokio::time::timeout(Duration::from_secs(10), self.0.recv())
            .await
            .expect("a message arrives within 10 s")
            .expect("recv");
        d.acker.ack().await.expect("ack");
        serde_json::from_slice(&d.body).expect("queue holds JSON")
    }

    async fn nothing_within(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.0.recv()).await.is_err()
    }
}

fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn route(v: &Value) -> (Vec<String>, String, Vec<String>) {
    let list = |x: &Value| -> Vec<String> {
        x.as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().unwrap_or("?").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    (
        list(&v["route"]["prev"]),
        v["route"]["curr"].as_str().unwrap_or("?").to_owned(),
        list(&v["route"]["next"]),
    )
}

fn strs(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

fn sump_reason(v: &Value) -> String {
    assert_eq!(v["status"]["reason"], "PolicyRejected", "{v}");
    v["status"]["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

// ---------------------------------------------------------------- shipped plugins

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_router_puts_the_handler_next_for_high_priority() {
    let mut mesh = Mesh::start(&[spec("priority-router", Value::Null)]).await;
    let mut handler = mesh.consumer("priority-handler").await;
    let mut b = mesh.consumer("b").await;
    let mut sink = mesh.consumer("x-sink").await;

    mesh.send("hi", &["b", "c"], json!({"priority": "high", "blob": "x"}))
        .await;
    let out = handler.next().await;
    assert_eq!(out["id"], "hi");
    assert_eq!(
        route(&out),
        (strs(&["a"]), "priority-handler".into(), strs(&["b", "c"]))
    );
    assert_eq!(out["payload"]["blob"], "x");

    mesh.send("lo", &["b", "c"], json!({"priority": "low"}))
        .await;
    let out = b.next().await;
    assert_eq!(route(&out), (strs(&["a"]), "b".into(), strs(&["c"])));

    mesh.send("none", &["b"], json!([1, 2, 3])).await;
    assert_eq!(b.next().await["id"], "none");

    // at the end of the route the handler still runs (instead of x-sink)
    mesh.send("end", &[], json!({"priority": "high"})).await;
    let out = handler.next().await;
    assert_eq!(
        route(&out),
        (strs(&["a"]), "priority-handler".into(), vec![])
    );
    assert!(sink.nothing_within(Duration::from_millis(100)).await);
    assert_eq!(mesh.calls("priority_router", "ok"), 4.0);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_router_honours_its_config() {
    let cfg = json!({"actor": "vip", "field": "customer.tier", "value": "gold"});
    let mut mesh = Mesh::start(&[spec("priority-router", cfg)]).await;
    let mut vip = mesh.consumer("vip").await;
    let mut b = mesh.consumer("b").await;
    mesh.send("g", &["b"], json!({"customer": {"tier": "gold"}}))
        .await;
    assert_eq!(
        route(&vip.next().await),
        (strs(&["a"]), "vip".into(), strs(&["b"]))
    );
    // already next: unchanged
    mesh.send("v", &["vip", "b"], json!({"customer": {"tier": "gold"}}))
        .await;
    assert_eq!(
        route(&vip.next().await),
        (strs(&["a"]), "vip".into(), strs(&["b"]))
    );
    mesh.send(
        "s",
        &["b"],
        json!({"customer": {"tier": "silver"}, "priority": "high"}),
    )
    .await;
    assert_eq!(b.next().await["id"], "s");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_allowlist_rejects_routes_naming_other_actors() {
    let cfg = json!({"allow": ["a", "b", "c"]});
    let mut mesh = Mesh::start(&[spec("route-allowlist", cfg)]).await;
    let mut b = mesh.consumer("b").await;
    let mut sump = mesh.consumer("x-sump").await;
    let mut sink = mesh.consumer("x-sink").await;

    mesh.send("ok", &["b", "c"], json!({})).await;
    assert_eq!(b.next().await["id"], "ok");

    mesh.send("bad", &["b", "evil"], json!({"k": 1})).await;
    let out = sump.next().await;
    assert_eq!(out["id"], "bad");
    assert!(sump_reason(&out).contains("\"evil\""), "{out}");
    assert_eq!(out["payload"]["original_payload"]["k"], 1);

    // end of route: x-sink is always allowed
    mesh.send("done", &[], json!({})).await;
    assert_eq!(sink.next().await["id"], "done");
    let failed = metric_value(
        &mesh.metrics.encode(),
        "asya_actor_messages_failed_total",
        &[("reason", "policy_rejected")],
    );
    assert_eq!(failed, Some(1.0));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_router_then_route_allowlist_sees_the_updated_route() {
    let mut mesh = Mesh::start(&[
        spec("priority-router", Value::Null),
        spec("route-allowlist", json!({"allow": ["a", "b"]})),
    ])
    .await;
    let mut b = mesh.consumer("b").await;
    let mut sump = mesh.consumer("x-sump").await;
    mesh.send("lo", &["b"], json!({"priority": "low"})).await;
    assert_eq!(b.next().await["id"], "lo");
    // the router adds priority-handler, which the allow-list (second) does not allow
    mesh.send("hi", &["b"], json!({"priority": "high"})).await;
    let out = sump.next().await;
    assert_eq!(out["id"], "hi");
    assert!(sump_reason(&out).contains("priority-handler"), "{out}");
    mesh.stop().await;
}

// ---------------------------------------------------------------- misbehaving plugins

/// Send a misbehaving envelope, then a normal one: the first ends in x-sump with a reason,
/// the second is routed normally (a fresh instance), and the failure is counted.
async fn misbehaves_once(folder: &str, payload: Value, outcome: &str, reason_has: &str) {
    let plugin = folder.replace('-', "_");
    let mut mesh = Mesh::start(&[spec(folder, Value::Null)]).await;
    let mut b = mesh.consumer("b").await;
    let mut sump = mesh.consumer("x-sump").await;
    mesh.send("bad", &["b"], payload).await;
    let out = sump.next().await;
    assert_eq!(out["id"], "bad");
    let why = sump_reason(&out);
    assert!(why.contains(reason_has), "{folder}: reason {why:?}");
    assert!(
        why.contains(&plugin),
        "{folder}: reason names the plugin: {why:?}"
    );
    for i in 0..3 {
        let id = format!("good-{i}");
        mesh.send(&id, &["b"], json!({"mode": "calm"})).await;
        assert_eq!(b.next().await["id"], id.as_str());
    }
    assert_eq!(
        mesh.calls(&plugin, outcome),
        1.0,
        "{}",
        mesh.metrics.encode()
    );
    assert_eq!(mesh.calls(&plugin, "ok"), 3.0);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_infinite_loop_is_cut_off_at_its_deadline() {
    misbehaves_once(
        "test-infinite-loop",
        json!({"mode": "loop"}),
        "timeout",
        "deadline",
    )
    .await;

    // the cut-off, measured on the chain the sidecar calls
    let chain = PolicyChain::load(
        &engine(),
        &[spec("test-infinite-loop", Value::Null)],
        opts(),
        None,
    )
    .await
    .unwrap();
    let input =
        Envelope::parse(br#"{"id":"x","route":{"curr":"a","next":["b"]},"payload":{}}"#).unwrap();
    let frame = Envelope::parse(
        br#"{"id":"x","route":{"prev":["a"],"curr":"b"},"payload":{"mode":"loop"}}"#,
    )
    .unwrap();
    for _ in 0..3 {
        let start = Instant::now();
        let err = chain.decide(&input, &frame).await.unwrap_err();
        let took = start.elapsed();
        eprintln!("infinite loop cut off after {took:?} (deadline {DEADLINE:?})");
        assert!(err.message.contains("deadline"), "{err}");
        assert!(took >= DEADLINE - Duration::from_millis(2), "{took:?}");
        assert!(took < DEADLINE + Duration::from_millis(100), "{took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_policy_sleep_is_cut_off_at_its_deadline_in_wall_clock_time() {
    // Through a real sidecar: the blocked frame goes to x-sump within a bound (the policy
    // would sleep 60 s), counted as `timeout`; the next envelopes route normally.
    let started = Instant::now();
    misbehaves_once(
        "test-policy-sleep",
        json!({"mode": "sleep"}),
        "timeout",
        "deadline",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );

    // The cut-off in wall-clock time, measured on the chain the sidecar calls.
    let chain = PolicyChain::load(
        &engine(),
        &[spec("test-policy-sleep", Value::Null)],
        opts(),
        None,
    )
    .await
    .unwrap();
    let input =
        Envelope::parse(br#"{"id":"x","route":{"curr":"a","next":["b"]},"payload":{}}"#).unwrap();
    let frame = Envelope::parse(
        br#"{"id":"x","route":{"prev":["a"],"curr":"b"},"payload":{"mode":"sleep","sleep_ms":"5000"}}"#,
    )
    .unwrap();
    for _ in 0..3 {
        let start = Instant::now();
        let err = chain.decide(&input, &frame).await.unwrap_err();
        let took = start.elapsed();
        eprintln!("sleeping policy cut off after {took:?} (deadline {DEADLINE:?})");
        assert!(err.message.contains("deadline"), "{err}");
        assert!(took >= DEADLINE - Duration::from_millis(2), "{took:?}");
        assert!(took < DEADLINE + Duration::from_millis(400), "{took:?}");
    }
    // A short sleep within the deadline is fine.
    let calm = Envelope::parse(
        br#"{"id":"x","route":{"prev":["a"],"curr":"b"},"payload":{"mode":"sleep","sleep_ms":"1"}}"#,
    )
    .unwrap();
    assert_eq!(chain.decide(&input, &calm).await.unwrap(), Decision::Keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_memory_bomb_is_stopped_by_the_memory_limit() {
    misbehaves_once(
        "test-memory-bomb",
        json!({"mode": "bomb"}),
        "memory-limit",
        "memory limit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_trap_fails_only_its_message() {
    misbehaves_once("test-trap", json!({"mode": "trap"}), "trap", "trapped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_open_file_gets_no_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "s3cr3t").unwrap();
    let payload = json!({"mode": "open-file", "path": secret.to_str().unwrap()});
    misbehaves_once("test-open-file", payload, "error", "open failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_open_socket_gets_no_network() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    misbehaves_once(
        "test-open-socket",
        json!({"mode": "open-socket", "addr": addr}),
        "error",
        "connect failed",
    )
    .await;
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the plugin reached the listener: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_wrong_world_is_refused_at_load_and_by_check() {
    let path = plugin("test-wrong-world");
    let err = PolicyChain::load(
        &engine(),
        &[spec("test-wrong-world", Value::Null)],
        opts(),
        None,
    )
    .await
    .err()
    .expect("a component of another world does not load");
    assert!(matches!(err, PluginError::Exports { .. }), "{err}");
    assert!(err.to_string().contains("test_wrong_world.wasm"), "{err}");
    let err = plugin::check(&path).unwrap_err();
    assert!(matches!(err, PluginError::WrongWorld { .. }), "{err}");
    assert!(err.to_string().contains("greet"), "{err}");
}

// ---------------------------------------------------------------- engine and tools

#[test]
fn check_reports_the_world_of_every_policy_and_refuses_non_components() {
    for folder in ["priority-router", "route-allowlist", "test-trap"] {
        let r = plugin::check(&plugin(folder)).unwrap_or_else(|e| panic!("{folder}: {e}"));
        assert_eq!(r.world, World::RoutePolicy);
        assert!(r.to_string().contains("ok, implements route-policy"), "{r}");
    }
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let e = plugin::check(&core).unwrap_err();
    assert!(matches!(e, PluginError::NotComponent { .. }), "{e}");
    assert!(e.to_string().contains("core WebAssembly module"), "{e}");
    let e = plugin::check(&dir.path().join("missing.wasm")).unwrap_err();
    assert!(e.to_string().contains("missing.wasm"), "{e}");
}

#[test]
fn check_errors_are_one_line() {
    for e in [
        plugin::check(&plugin("test-wrong-world")).unwrap_err(),
        plugin::check(Path::new("/nonexistent/p.wasm")).unwrap_err(),
    ] {
        assert!(!e.to_string().contains('\n'), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_code_cache_is_written_reused_and_survives_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let engine = PluginEngine::new(Some(dir.path().to_owned())).unwrap();
    let path = plugin("priority-router");
    engine.load(&path).unwrap();
    let entries: Vec<PathBuf> = walk(dir.path());
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].extension().is_some_and(|e| e == "cwasm"));
    // a second engine (a restart) loads from the cache, much faster than compiling
    let again = PluginEngine::new(Some(dir.path().to_owned())).unwrap();
    let start = Instant::now();
    again.load(&path).unwrap();
    eprintln!("load from cache: {:?}", start.elapsed());
    // an unusable entry: warn, compile, rewrite
    std::fs::write(&entries[0], b"garbage").unwrap();
    let chain = PolicyChain::load(
        &again,
        &[spec("priority-router", Value::Null)],
        opts(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(chain.names(), vec!["priority_router"]);
    assert!(std::fs::read(&entries[0]).unwrap().len() > 1000);
    // an unusable cache directory: compile without it
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    PluginEngine::new(Some(file)).unwrap().load(&path).unwrap();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_that_rewrites_history_is_rejected_by_the_host() {
    // A policy only sends `curr` and `next` back; the host keeps the frame's `prev` and
    // checks the result against the input after every policy, so a frame whose history is
    // wrong is rejected (the sidecar checks it too, before the chain runs).
    let chain = PolicyChain::load(
        &engine(),
        &[spec("priority-router", Value::Null)],
        opts(),
        None,
    )
    .await
    .unwrap();
    let input = Envelope::parse(
        br#"{"id":"x","route":{"prev":["z"],"curr":"a","next":["b"]},"payload":{}}"#,
    )
    .unwrap();
    // the frame's prev is wrong: the router replaces the route, the host's check fails
    let frame = Envelope::parse(
        br#"{"id":"x","route":{"prev":["q","a"],"curr":"b"},"payload":{"priority":"high"}}"#,
    )
    .unwrap();
    match chain.decide(&input, &frame).await.unwrap() {
        Decision::Reject(why) => assert!(why.contains("history"), "{why}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn route_policies_variable_errors_name_the_variable() {
    let e = PolicySpec::from_source(&[("ASYA_ROUTE_POLICIES", "[{\"path\": 3}]")]).unwrap_err();
    assert!(e.to_string().starts_with("ASYA_ROUTE_POLICIES:"), "{e}");
    let s = PolicySpec::from_source(&[(
        "ASYA_ROUTE_POLICIES",
        "/p/priority-router.wasm,/p/route-allowlist.wasm",
    )])
    .unwrap();
    assert_eq!(s.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_that_fails_to_configure_is_a_startup_error_naming_the_file() {
    let err = PolicyChain::load(
        &engine(),
        &[spec("route-allowlist", json!({}))],
        opts(),
        None,
    )
    .await
    .err()
    .expect("allow is required");
    assert!(matches!(err, PluginError::Configure { .. }), "{err}");
    assert!(err.to_string().contains("route_allowlist.wasm"), "{err}");
    assert!(err.to_string().contains("allow"), "{err}");
}

/// Every folder in `plugins/` has an end-to-end test: a test function whose name contains
/// the folder's name (`-` as `_`), here or in the other end-to-end test files
/// (`tests/tests/*.rs`, `host/tests/*.rs`; route policies live in this file).
#[test]
fn every_plugin_folder_has_an_end_to_end_test() {
    let root = repo_root();
    let mut test_fns = Vec::new();
    for dir in ["tests/tests", "host/tests"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                test_fns.extend(
                    text.lines()
                        .filter_map(|l| l.split("fn ").nth(1))
                        .filter_map(|rest| rest.split('(').next())
                        .map(str::to_owned),
                );
            }
        }
    }
    let folders = plugin_folders();
    assert!(folders.len() >= 8, "{folders:?}");
    let missing: Vec<&String> = folders
        .iter()
        .filter(|f| {
            let name = f.replace('-', "_");
            !test_fns.iter().any(|t| t.contains(&name))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "plugin folders without an end-to-end test named after them: {missing:?}"
    );
    for f in &folders {
        let readme = root.join("plugins").join(f).join("README.md");
        assert!(readme.is_file(), "{} missing", readme.display());
    }
}
