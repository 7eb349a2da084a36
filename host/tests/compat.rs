//! Upstream Asya compatibility of the sidecar (issue #15), end to end: sidecars (the
//! library's sidecar loop, as `asya-host sidecar` runs it) on a real `nats-server`, each
//! paired with a real Python runtime process running a small handler file.
//!
//! The runtime is the stock `sdk/python/asya_runtime.py`; with
//! `ASYA_UPSTREAM_RUNTIME=/path/to/asya_runtime.py` every test runs the same handlers with
//! upstream Asya's runtime file instead (the host depends on the runtime protocol only).
//! Handlers use only what both runtimes offer (payload mode, the `GET`/`SET` ABI).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asya_host::config::SidecarConfig;
use asya_host::config::TransportKind;
use asya_host::metrics::Metrics;
use asya_host::queue::QueueName;
use asya_host::sidecar::{self, Deps, Report, Reporter};
use asya_host::transport::nats::{NatsConfig, NatsTransport};
use asya_host::transport::{OutMessage, Receiver, Transport};
use asya_test_support::{repo_root, NatsServer, Proc};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// The runtime file the tests run: upstream's when `ASYA_UPSTREAM_RUNTIME` is set.
fn runtime_file() -> PathBuf {
    match std::env::var_os("ASYA_UPSTREAM_RUNTIME") {
        Some(p) => {
            println!("runtime: upstream's {}", Path::new(&p).display());
            PathBuf::from(p)
        }
        None => {
            println!(
                "runtime: the stock sdk/python/asya_runtime.py (set ASYA_UPSTREAM_RUNTIME=/path/to/asya_runtime.py to run these tests with upstream Asya's runtime)"
            );
            repo_root().join("sdk/python/asya_runtime.py")
        }
    }
}

/// What the gateway would have been told, per envelope.
#[derive(Debug, Clone)]
struct Seen {
    kind: &'static str,
    envelope_id: String,
    paused: Option<Value>,
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Seen>>);

impl Reporter for Recorder {
    fn report(&self, report: Report) {
        let seen = match report {
            Report::Hop(h) => Seen {
                kind: "hop",
                envelope_id: h.envelope_id,
                paused: h.paused,
            },
            Report::Final { envelope, .. } => Seen {
                kind: "final",
                envelope_id: envelope.id,
                paused: None,
            },
            Report::Upstream { envelope_id, .. } => Seen {
                kind: "upstream",
                envelope_id,
                paused: None,
            },
        };
        self.0.lock().unwrap().push(seen);
    }
}

impl Recorder {
    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

/// One actor: its runtime process and its sidecar task.
struct Actor {
    stop: CancellationToken,
    task: JoinHandle<()>,
    _runtime: Proc,
    dir: tempfile::TempDir,
}

/// A namespace on a fresh nats-server with the actors of one test.
struct Mesh {
    _server: NatsServer,
    ns: String,
    t: Arc<NatsTransport>,
    reports: Arc<Recorder>,
    actors: Vec<Actor>,
}

impl Mesh {
    async fn new(ns: &str) -> Mesh {
        let server = NatsServer::start();
        let t = NatsTransport::connect(NatsConfig {
            ack_wait: Duration::from_secs(5),
            ..NatsConfig::new(&server.url())
        })
        .await
        .expect("connect to nats-server");
        Mesh {
            _server: server,
            ns: ns.to_owned(),
            t: Arc::new(t),
            reports: Arc::new(Recorder::default()),
            actors: Vec::new(),
        }
    }

    fn queue(&self, actor: &str) -> QueueName {
        QueueName::new(&self.ns, actor).unwrap()
    }

    /// Start actor `name` running `handler` (the body of `handler.py`, entry point
    /// `handler.handler`); `tune` adjusts its sidecar configuration.
    async fn actor(&mut self, name: &str, handler: &str, tune: impl FnOnce(&mut SidecarConfig)) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        std::fs::write(dir.path().join("handler.py"), handler).unwrap();
        let log = std::fs::File::create(dir.path().join("runtime.log")).unwrap();
        let runtime = Command::new("python3")
            .arg(runtime_file())
            .env("ASYA_HANDLER", "handler.handler")
            .env("ASYA_SOCKET_DIR", &sock)
            .env("PYTHONPATH", dir.path())
            .env("ASYA_LOG_LEVEL", "WARNING")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("python3");
        let mut cfg = SidecarConfig::new(name, &self.ns, &sock);
        cfg.transport = TransportKind::Nats;
        cfg.ready_timeout = Duration::from_secs(30);
        cfg.shutdown_grace = Duration::from_secs(1);
        cfg.resiliency.backoff_initial = Duration::from_millis(50);
        cfg.resiliency.backoff_max = Duration::from_millis(200);
        tune(&mut cfg);
        let t: Arc<dyn Transport> = self.t.clone();
        let mut deps = Deps::new(t, Metrics::new("asya_actor"));
        deps.reporter = Some(self.reports.clone());
        let stop = CancellationToken::new();
        let readiness = deps.readiness.clone();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            sidecar::run(cfg, deps, token).await.expect("sidecar runs");
        });
        let actor = Actor {
            stop,
            task,
            _runtime: Proc(runtime),
            dir,
        };
        let started = Instant::now();
        while !readiness.is_ready() {
            assert!(
                started.elapsed() < WAIT,
                "sidecar {name} not ready; runtime log:\n{}",
                std::fs::read_to_string(actor.dir.path().join("runtime.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.actors.push(actor);
    }

    async fn send(&self, env: Value) {
        let q = self.queue(env["route"]["curr"].as_str().unwrap());
        self.t
            .ensure_queues(std::slice::from_ref(&q))
            .await
            .unwrap();
        self.t
            .send(OutMessage {
                id: format!("in-{}", env["id"].as_str().unwrap()),
                queue: q,
                body: serde_json::to_vec(&env).unwrap().into(),
            })
            .await
            .unwrap();
    }

    async fn consumer(&self, actor: &str) -> Consumer {
        Consumer(self.t.subscribe(&self.queue(actor), 16).await.unwrap())
    }

    /// Every runtime's log (for failure messages).
    fn logs(&self) -> String {
        self.actors
            .iter()
            .map(|a| std::fs::read_to_string(a.dir.path().join("runtime.log")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    async fn stop(self) {
        for a in &self.actors {
            a.stop.cancel();
        }
        for a in self.actors {
            let _ = tokio::time::timeout(WAIT, a.task).await;
        }
    }
}

struct Consumer(Box<dyn Receiver>);

impl Consumer {
    /// The next message (acked), parsed.
    async fn next(&mut self, what: &str) -> Value {
        let d = tokio::time::timeout(WAIT, self.0.recv())
            .await
            .unwrap_or_else(|_| panic!("no message on {what} within {WAIT:?}"))
            .unwrap();
        d.acker.ack().await.unwrap();
        serde_json::from_slice(&d.body).unwrap()
    }

    /// Nothing arrives within `window` (used only once the hop that could have sent it has
    /// settled and reported, so a late message cannot be in flight).
    async fn nothing(&mut self, window: Duration) -> Option<Value> {
        match tokio::time::timeout(window, self.0.recv()).await {
            Ok(Ok(d)) => Some(serde_json::from_slice(&d.body).unwrap()),
            _ => None,
        }
    }
}

fn envelope(id: &str, actors: &[&str], headers: Value, payload: Value) -> Value {
    json!({
        "id": id,
        "route": {"prev": [], "curr": actors[0], "next": actors[1..]},
        "headers": headers,
        "payload": payload,
    })
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A handler that fails twice sees attempts 1, 2, 3 in its status (phase processing, this
/// actor, max_attempts), and the envelope reaches x-sink with the attempt it succeeded on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_sees_the_attempt_it_is_on() {
    let mut m = Mesh::new("attempt").await;
    m.actor(
        "a",
        r#"
SEEN = []

def handler(payload):
    st = yield "GET", ".status"
    SEEN.append(st["attempt"])
    assert st["phase"] == "processing", st
    assert st["actor"] == "a", st
    assert st["max_attempts"] == 3, st
    assert st["created_at"] <= st["updated_at"], st
    if st["attempt"] < 3:
        raise RuntimeError("attempt %d fails" % st["attempt"])
    yield {"seen": list(SEEN)}
"#,
        |c| c.resiliency.max_attempts = 3,
    )
    .await;
    let mut sink = m.consumer("x-sink").await;
    m.send(envelope("e1", &["a"], json!({}), json!({"x": 1})))
        .await;
    let out = sink.next("x-sink").await;
    assert_eq!(out["payload"], json!({"seen": [1, 2, 3]}), "{}", m.logs());
    assert_eq!(out["id"], "e1");
    let st = &out["status"];
    assert_eq!(st["phase"], "succeeded");
    assert_eq!(
        (st["attempt"].clone(), st["max_attempts"].clone()),
        (json!(3), json!(3))
    );
    let (created, updated) = (
        st["created_at"].as_str().unwrap(),
        st["updated_at"].as_str().unwrap(),
    );
    assert!(created <= updated, "{created} <= {updated}");
    m.stop().await;
}

/// `x-asya-route-override: {"b": "b2"}`: a's output for `b` goes to b2's queue, b2 accepts
/// it (its `curr` is `b`), and the audit header says who resolved it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_override_reaches_the_physical_actor_with_the_audit_header() {
    let mut m = Mesh::new("override").await;
    let echo = "def handler(payload):\n    return payload\n";
    m.actor("a", echo, |_| {}).await;
    m.actor(
        "b2",
        "def handler(payload):\n    return dict(payload, by='b2')\n",
        |_| {},
    )
    .await;
    let mut sink = m.consumer("x-sink").await;
    m.send(envelope(
        "e1",
        &["a", "b"],
        json!({"x-asya-route-override": {"b": "b2"}}),
        json!({"k": 1}),
    ))
    .await;
    let out = sink.next("x-sink").await;
    assert_eq!(out["payload"], json!({"k": 1, "by": "b2"}), "{}", m.logs());
    assert_eq!(
        out["route"]["prev"],
        json!(["a", "b"]),
        "the route keeps the logical name"
    );
    assert_eq!(
        out["headers"]["x-asya-route-resolved"],
        json!({"b": {"target": "b2", "by": "a"}})
    );
    assert_eq!(out["status"]["actor"], "b2");
    m.stop().await;
}

/// `_on_error: "fix"`: a failure that would go to x-sump goes to `fix`, which sees the error
/// in `status.error`, the original payload, and a route whose `curr` is itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_hands_a_failure_to_the_error_handler_actor() {
    let mut m = Mesh::new("onerror").await;
    m.actor(
        "a",
        "def handler(payload):\n    raise ValueError('bad input %r' % (payload,))\n",
        |c| c.resiliency.max_attempts = 1,
    )
    .await;
    m.actor(
        "fix",
        r#"
def handler(payload):
    err = yield "GET", ".status.error"
    curr = yield "GET", ".route.curr"
    yield {"handled": err["type"], "message": err["message"], "curr": curr, "original": payload}
"#,
        |_| {},
    )
    .await;
    let mut sink = m.consumer("x-sink").await;
    m.send(envelope(
        "e1",
        &["a", "b"],
        json!({"_on_error": "fix"}),
        json!({"n": 7}),
    ))
    .await;
    let out = sink.next("x-sink").await;
    assert_eq!(
        out["payload"],
        json!({"handled": "ValueError", "message": "bad input {'n': 7}", "curr": "fix", "original": {"n": 7}}),
        "{}",
        m.logs()
    );
    assert_eq!(out["route"]["prev"], json!(["a", "fix"]));
    assert!(out["headers"].get("_on_error").is_none());
    m.stop().await;
}

/// `ASYA_RESILIENCY_NON_RETRYABLE_ERRORS=Exception` and a `MemoryError`: matched through the
/// runtime's `mro`, so x-sump at attempt 1 with `NonRetryableFailure`; the x-sump payload
/// has upstream's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_matches_the_mro_and_sump_has_upstreams_shape() {
    let mut m = Mesh::new("mro").await;
    m.actor(
        "a",
        "def handler(payload):\n    raise MemoryError('out of it')\n",
        |c| {
            c.resiliency.max_attempts = 3;
            c.resiliency.non_retryable = vec!["Exception".into()];
        },
    )
    .await;
    let mut sump = m.consumer("x-sump").await;
    m.send(envelope(
        "e1",
        &["a", "b"],
        json!({}),
        json!({"doc": [1, 2]}),
    ))
    .await;
    let out = sump.next("x-sump").await;
    let st = &out["status"];
    assert_eq!(st["reason"], "NonRetryableFailure", "{out}\n{}", m.logs());
    assert_eq!(
        (st["attempt"].clone(), st["max_attempts"].clone()),
        (json!(1), json!(3))
    );
    assert_eq!(st["error"]["type"], "MemoryError");
    let p = &out["payload"];
    assert_eq!(p["error"], "processing_error");
    assert_eq!(p["details"]["type"], "MemoryError");
    assert_eq!(p["details"]["message"], "out of it");
    assert!(p["details"]["mro"]
        .as_array()
        .unwrap()
        .contains(&json!("Exception")));
    assert!(p["details"]["traceback"]
        .as_str()
        .unwrap()
        .contains("MemoryError"));
    assert_eq!(p["original_payload"], json!({"doc": [1, 2]}));
    assert_eq!(out["id"], "e1");
    m.stop().await;
}

/// A generator that yields once keeps the input's id; with two yields the second frame is a
/// child (own id, `parent_id` = the input). `x-asya-mesh-status: off` sends no reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_yield_keeps_the_id_and_later_frames_are_children() {
    let mut m = Mesh::new("ids").await;
    m.actor(
        "a",
        r#"
def handler(payload):
    for i in range(payload["n"]):
        yield {"i": i}
"#,
        |_| {},
    )
    .await;
    let mut sink = m.consumer("x-sink").await;
    m.send(envelope(
        "quiet",
        &["a"],
        json!({"x-asya-mesh-status": "off"}),
        json!({"n": 1}),
    ))
    .await;
    let out = sink.next("x-sink").await;
    assert_eq!(out["id"], "quiet", "{}", m.logs());
    m.send(envelope("one", &["a"], json!({}), json!({"n": 1})))
        .await;
    let out = sink.next("x-sink").await;
    assert_eq!(out["id"], "one");
    assert!(out.get("parent_id").is_none(), "{out}");
    assert_eq!(out["payload"], json!({"i": 0}));

    m.send(envelope("two", &["a"], json!({}), json!({"n": 2})))
        .await;
    let mut outs = [sink.next("x-sink").await, sink.next("x-sink").await];
    outs.sort_by_key(|o| o["payload"]["i"].as_u64());
    assert_eq!(outs[0]["id"], "two");
    assert!(outs[0].get("parent_id").is_none());
    assert_ne!(outs[1]["id"], "two");
    assert_eq!(outs[1]["parent_id"], "two");

    // Reports: the hops of "one" and "two", none of "quiet" (settled before "one").
    let reports = eventually("the hop reports", || {
        let r = m.reports.all();
        (r.iter().filter(|s| s.kind == "hop").count() >= 2).then_some(r)
    })
    .await;
    assert!(
        reports.iter().all(|s| s.envelope_id != "quiet"),
        "{reports:?}"
    );
    m.stop().await;
}

/// A frame carrying `x-asya-pause` is not routed: it is parked on the `x-pause` queue with
/// status `paused`, and the hop reports the pause with the header's metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_frame_is_parked_and_reported_not_routed() {
    let mut m = Mesh::new("pause").await;
    m.actor(
        "a",
        r#"
def handler(payload):
    yield "SET", '.headers["x-asya-pause"]', {"prompt": "approve?", "fields": ["ok"]}
    yield dict(payload, drafted=True)
"#,
        |_| {},
    )
    .await;
    let mut b = m.consumer("b").await;
    m.send(envelope("e1", &["a", "b"], json!({}), json!({"k": 1})))
        .await;
    let hop = eventually("the hop report", || {
        m.reports
            .all()
            .into_iter()
            .find(|s| s.kind == "hop" && s.envelope_id == "e1")
    })
    .await;
    assert_eq!(
        hop.paused,
        Some(json!({"prompt": "approve?", "fields": ["ok"]})),
        "{}",
        m.logs()
    );
    let mut parked = m.consumer("x-pause").await;
    let out = parked.next("x-pause").await;
    assert_eq!(out["id"], "e1");
    assert_eq!(out["payload"], json!({"k": 1, "drafted": true}));
    assert_eq!(out["route"]["curr"], "b", "kept for the resume");
    assert_eq!(out["status"]["phase"], "paused");
    // The hop has settled and reported: nothing was routed to b.
    assert_eq!(b.nothing(Duration::from_millis(300)).await, None);
    m.stop().await;
}
