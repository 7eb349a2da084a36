//! Failure behaviour (issue #12, README "Failure behaviour"): poison envelopes, reused ids,
//! outputs the broker cannot take, a dead runtime and a deadline that cuts a call — each
//! through the real `asya-host sidecar` binary, the stock Python runtime and a real
//! nats-server. One bad message costs exactly one message; a fault is never counted as a
//! handler failure; the health checks tell the truth.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asya_host::queue::QueueName;
use asya_host::transport::nats::{NatsConfig, NatsTransport};
use asya_host::transport::{OutMessage, Receiver, Transport};
use asya_test_support::{free_port, http_get, metric_value, repo_root, NatsServer, Proc};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_asya-host");

/// One handler for every case, chosen by the payload.
const HANDLER: &str = r#"
import time

def handle(p):
    if isinstance(p, dict):
        if "fan" in p:
            return [{"i": i} for i in range(p["fan"])]
        if "sleep" in p:
            time.sleep(p["sleep"])
        if "double" in p:
            return {"text": p["text"] * 2}
    return p
"#;

/// The value of `name{labels…}` in a Prometheus text exposition (0 when absent).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(text, name, labels).unwrap_or(0.0)
}

/// Poll `f` until it returns `Some` or `within` passes.
fn poll<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop.
/// Actor `a` of namespace `ns`: the stock runtime with [`HANDLER`] and the sidecar binary.
struct Pair {
    dir: tempfile::TempDir,
    runtime: Option<Proc>,
    sidecar: Proc,
    admin: u16,
    ns: String,
    t: Arc<NatsTransport>,
}

impl Pair {
    async fn start(server: &NatsServer, ns: &str, env: &[(&str, &str)]) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sock")).unwrap();
        std::fs::write(dir.path().join("handlers.py"), HANDLER).unwrap();
        let admin = free_port();
        let runtime = Some(start_runtime(dir.path()));
        let log = std::fs::File::create(dir.path().join("sidecar.log")).unwrap();
        let sidecar = Command::new(BIN)
            .arg("sidecar")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ASYA_ACTOR_NAME", "a")
            .env("ASYA_NAMESPACE", ns)
            .env("ASYA_NATS_URL", server.url())
            .env("ASYA_SOCKET_DIR", dir.path().join("sock"))
            .env("ASYA_METRICS_ADDR", format!("127.0.0.1:{admin}"))
            .env("ASYA_RESILIENCY_BACKOFF_INITIAL", "200ms")
            .env("ASYA_LOG_LEVEL", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("asya-host");
        let mut cfg = NatsConfig::new(&server.url());
        cfg.connect_timeout = Duration::from_secs(5);
        let t = Arc::new(NatsTransport::connect(cfg).await.unwrap());
        let p = Pair {
            dir,
            runtime,
            sidecar: Proc(sidecar),
            admin,
            ns: ns.to_owned(),
            t,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.status("/readyz") != 200 {
            assert!(
                Instant::now() < deadline,
                "sidecar not ready within 30 s:\n{}\nruntime:\n{}",
                p.log(),
                std::fs::read_to_string(p.dir.path().join("runtime.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    fn status(&self, path: &str) -> u16 {
        http_get(self.admin, path).map(|r| r.0).unwrap_or(0)
    }

    fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").unwrap().1
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sidecar.log")).unwrap_or_default()
    }

    fn queue(&self, actor: &str) -> QueueName {
        QueueName::new(&self.ns, actor).unwrap()
    }

    /// Publish raw bytes to actor `a` (each under a fresh message id: distinct inputs).
    async fn send_raw(&self, body: Vec<u8>) {
        self.t
            .send(OutMessage {
                queue: self.queue("a"),
                id: uuid::Uuid::new_v4().to_string(),
                body: body.into(),
            })
            .await
            .unwrap();
    }

    async fn send(&self, env: Value) {
        self.send_raw(serde_json::to_vec(&env).unwrap()).await;
    }

    /// Exactly `n` messages of `actor`'s queue within `within` (acked), then nothing more
    /// for 300 ms.
    async fn take(&self, actor: &str, n: usize, within: Duration) -> Vec<Value> {
        self.take_text(actor, n, within)
            .await
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect()
    }

    /// [`Pair::take`], as the bytes arrived (a `Value` would round big integers).
    async fn take_text(&self, actor: &str, n: usize, within: Duration) -> Vec<String> {
        let mut rx = self.t.subscribe(&self.queue(actor), 16).await.unwrap();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while out.len() < n {
            let d = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{actor}: {} of {n} within {within:?}: {out:?}\n{}\ninflight: {:?}",
                        out.len(),
                        self.log(),
                        http_get(self.admin, "/debug/inflight")
                    )
                })
                .unwrap();
            out.push(String::from_utf8(d.body.to_vec()).unwrap());
            d.acker.ack().await.unwrap();
        }
        assert_nothing_more(&mut rx, actor).await;
        out
    }

    fn exit_status(&mut self, within: Duration) -> ExitStatus {
        poll("sidecar exits", within, || {
            self.sidecar.0.try_wait().unwrap()
        })
    }

    fn kill_runtime(&mut self) {
        drop(self.runtime.take());
    }

    fn restart_runtime(&mut self) {
        self.runtime = Some(start_runtime(self.dir.path()));
    }
}

async fn assert_nothing_more(rx: &mut Box<dyn Receiver>, actor: &str) {
    if let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        panic!("{actor}: unexpected {}", String::from_utf8_lossy(&d.body));
    }
}

fn start_runtime(dir: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("runtime.log"))
        .unwrap();
    let child = Command::new("python3")
        .arg(repo_root().join("sdk/python/asya_runtime.py"))
        .env("ASYA_HANDLER", "handlers.handle")
        .env("PYTHONPATH", dir)
        .env("ASYA_SOCKET_DIR", dir.join("sock"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("python3");
    Proc(child)
}

fn envelope(id: &str, payload: Value) -> Value {
    json!({"id": id, "route": {"prev": [], "curr": "a", "next": []}, "payload": payload})
}

fn reason(v: &Value) -> &str {
    v["status"]["reason"].as_str().unwrap_or("")
}

fn error_message(v: &Value) -> &str {
    v["status"]["error"]["message"].as_str().unwrap_or("")
}

/// Item 1: each poison envelope goes to x-sump at once (`validation_error`, a message saying
/// what is wrong, no retries), the actor keeps working and its health checks are true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_envelopes_cost_one_message_each() {
    let server = NatsServer::start();
    let p = Pair::start(&server, "poison", &[]).await;
    let long_id = "x".repeat(2000);
    let poison = [
        // the id becomes a NATS header value: CR/LF used to panic the worker
        envelope("bad\r\nid", json!(1)),
        envelope(&long_id, json!(2)),
        json!({"id": "bad-next", "route": {"prev": [], "curr": "a", "next": [">"]}, "payload": 3}),
        json!({"id": "bad-dot", "route": {"prev": [], "curr": "a", "next": ["b.c"]}, "payload": 4}),
        json!({"id": "bad-empty", "route": {"prev": [], "curr": "a", "next": ["b", ""]}, "payload": 5}),
        json!({"id": "bad-deadline", "route": {"prev": [], "curr": "a", "next": []}, "payload": 6,
               "status": {"deadline_at": "tomorrow"}}),
        json!({"id": "too-many-hops", "route": {"prev": vec!["a"; 300], "curr": "a", "next": []}, "payload": 7}),
        envelope("too-many-frames", json!({"fan": 2000})),
    ];
    for env in &poison {
        p.send(env.clone()).await;
    }
    // Integers beyond 64 bits in headers, status and unknown fields come back exactly.
    p.send_raw(
        br#"{"id":"ok-1","route":{"prev":[],"curr":"a","next":[]},"headers":{"n":123456789012345678901235},"payload":{"fan":3},"status":{"big":123456789012345678901234},"top":-123456789012345678901234}"#
            .to_vec(),
    )
    .await;
    let sump = p
        .take("x-sump", poison.len(), Duration::from_secs(20))
        .await;
    let sink = p.take_text("x-sink", 3, Duration::from_secs(10)).await;
    for text in &sink {
        let v: Value = serde_json::from_str(text).unwrap();
        assert!(v["parent_id"] == "ok-1" || v["id"] == "ok-1", "{text}");
        assert!(text.contains(r#""big":123456789012345678901234"#), "{text}");
        assert!(text.contains(r#""n":123456789012345678901235"#), "{text}");
        assert!(
            text.contains(r#""top":-123456789012345678901234"#),
            "{text}"
        );
    }

    let by_reason: Vec<(&str, &str)> = sump.iter().map(|v| (reason(v), error_message(v))).collect();
    let text: String = by_reason
        .iter()
        .map(|(r, m)| format!("{r}: {m}\n"))
        .collect();
    for says in [
        "control character",
        "more than 1024",
        "route.next[0]",
        "route.next[1]",
        "deadline_at \"tomorrow\"",
        "ASYA_MAX_HOPS (256)",
        "ASYA_MAX_FRAMES (1024)",
    ] {
        assert!(
            text.contains(says),
            "no x-sump message says {says:?}: {text}"
        );
    }
    let validation = by_reason
        .iter()
        .filter(|(r, _)| *r == "ValidationError")
        .count();
    assert_eq!(validation, poison.len() - 1, "{text}");
    // The CR/LF id is not used as a message id: its x-sump copy has an id of its own.
    assert!(sump
        .iter()
        .all(|v| !v["id"].as_str().unwrap().contains('\r')));

    let m = p.metrics();
    let q = [("queue", "asya-poison-a")];
    let failed = |r: &str| {
        metric(
            &m,
            "asya_actor_messages_failed_total",
            &[q[0], ("reason", r)],
        )
    };
    assert_eq!(failed("validation_error"), 7.0, "{m}");
    assert_eq!(failed("runtime_error"), 1.0, "too many frames: {m}");
    assert_eq!(
        failed("max_retries_exhausted"),
        0.0,
        "no pointless retries: {m}"
    );
    assert_eq!(metric(&m, "asya_actor_worker_panics_total", &q), 0.0);
    assert_eq!(p.status("/healthz"), 200);
    assert_eq!(p.status("/readyz"), 200);
}

/// Item 2: three different envelopes reusing one id all arrive; a redelivered (identical)
/// message is still deduplicated, and the suppression is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_ids_do_not_lose_data_and_duplicates_are_counted() {
    let server = NatsServer::start();
    let p = Pair::start(&server, "reuse", &[]).await;
    for n in 1..=3 {
        p.send(envelope("order-42", json!({ "n": n }))).await;
    }
    let sink = p.take("x-sink", 3, Duration::from_secs(15)).await;
    let ns: BTreeSet<i64> = sink
        .iter()
        .map(|v| v["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, BTreeSet::from([1, 2, 3]));

    // The same bytes twice (as a redelivery would): one output, one suppression.
    let same = serde_json::to_vec(&envelope("order-43", json!({"n": 4}))).unwrap();
    p.send_raw(same.clone()).await;
    p.send_raw(same).await;
    let sink = p.take("x-sink", 1, Duration::from_secs(15)).await;
    assert_eq!(sink[0]["id"], "order-43");
    let m = poll("duplicate counted", Duration::from_secs(10), || {
        let m = p.metrics();
        (metric(
            &m,
            "asya_actor_messages_processed_total",
            &[("queue", "asya-reuse-a"), ("status", "success")],
        ) == 5.0)
            .then_some(m)
    });
    assert_eq!(
        metric(
            &m,
            "asya_actor_duplicates_suppressed_total",
            &[("queue", "asya-reuse-a")]
        ),
        1.0,
        "{m}"
    );
}

/// Item 3: an output over the broker's limit sends its input to x-sump at once
/// (`transport_error`, naming the limit), cut to fit when the copy would not fit either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_the_broker_cannot_take_sends_the_input_to_sump_at_once() {
    let server = NatsServer::start();
    let p = Pair::start(&server, "large", &[]).await;
    let started = Instant::now();
    // 1,046,000 bytes fit NATS's 1 MiB; the doubled output does not, and neither does the
    // input with an x-sump status added.
    let mut env = envelope("big-1", json!({"double": true, "text": ""}));
    let overhead = serde_json::to_vec(&env).unwrap().len();
    env["payload"]["text"] = json!("y".repeat(1_046_000 - overhead));
    let body = serde_json::to_vec(&env).unwrap();
    assert_eq!(body.len(), 1_046_000);
    p.send_raw(body).await;
    p.send(envelope("small-1", json!({"double": true, "text": "ab"})))
        .await;
    let sump = p.take("x-sump", 1, Duration::from_secs(15)).await;
    let sink = p.take("x-sink", 1, Duration::from_secs(10)).await;
    assert_eq!(sink[0]["payload"]["text"], "abab");
    let s = &sump[0];
    assert_eq!(s["id"], "big-1");
    let msg = error_message(s);
    assert!(
        msg.contains("max payload") || msg.contains("max_payload"),
        "{msg}"
    );
    assert!(msg.contains("payload cut from"), "{msg}");
    assert_eq!(s["payload"]["error"], "transport_error");
    assert!(
        s["payload"]["original_payload"].is_string(),
        "the payload became its cut text"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "at once, not after retries"
    );
    let m = p.metrics();
    let q = ("queue", "asya-large-a");
    let failed = |r: &str| metric(&m, "asya_actor_messages_failed_total", &[q, ("reason", r)]);
    assert_eq!(failed("transport_error"), 1.0, "{m}");
    assert_eq!(failed("max_retries_exhausted"), 0.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "asya_actor_messages_processed_total",
            &[q, ("status", "retry")]
        ),
        0.0
    );
}

/// Item 4: a dead runtime is noticed at once (WARN, /readyz 503), the envelope sent
/// meanwhile waits, uncounted, and is processed normally once the runtime is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_runtime_pauses_the_actor_and_is_not_a_handler_failure() {
    let server = NatsServer::start();
    let mut p = Pair::start(&server, "dead", &[]).await;
    p.send(envelope("before", json!(1))).await;
    p.take("x-sink", 1, Duration::from_secs(10)).await;

    p.kill_runtime();
    poll("/readyz fails", Duration::from_secs(5), || {
        (p.status("/readyz") == 503).then_some(())
    });
    assert!(p.log().contains("runtime unreachable"), "{}", p.log());
    assert_eq!(p.status("/healthz"), 200, "alive, waiting for its runtime");
    p.send(envelope("during", json!(2))).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    p.restart_runtime();
    poll("/readyz again", Duration::from_secs(20), || {
        (p.status("/readyz") == 200).then_some(())
    });
    let sink = p.take("x-sink", 1, Duration::from_secs(15)).await;
    assert_eq!(sink[0]["id"], "during");
    assert_eq!(sink[0]["status"]["phase"], "succeeded");
    let m = p.metrics();
    let q = ("queue", "asya-dead-a");
    let failed = |r: &str| metric(&m, "asya_actor_messages_failed_total", &[q, ("reason", r)]);
    assert_eq!(failed("runtime_error"), 0.0, "{m}");
    assert_eq!(failed("max_retries_exhausted"), 0.0, "{m}");
    assert_eq!(
        metric(&m, "asya_actor_runtime_outages_total", &[q]),
        1.0,
        "{m}"
    );
    let warns = p
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("runtime unreachable"))
        .count();
    assert_eq!(warns, 1, "once per outage: {}", p.log());
}

/// Item 4, bounded: a runtime that does not come back within ASYA_RUNTIME_READY_TIMEOUT
/// makes the sidecar hand its delivery back and exit 4 (nothing in x-sump).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_stays_away_makes_the_sidecar_exit_4() {
    let server = NatsServer::start();
    // A short ack wait: a delivery the pull loop had buffered comes back soon after the exit.
    let ack = ("ASYA_NATS_ACK_WAIT", "3s");
    let mut p = Pair::start(
        &server,
        "gone",
        &[("ASYA_RUNTIME_READY_TIMEOUT", "2s"), ack],
    )
    .await;
    p.kill_runtime();
    p.send(envelope("held", json!(1))).await;
    let status = p.exit_status(Duration::from_secs(15));
    assert_eq!(status.code(), Some(4), "{}", p.log());
    // The envelope is still there for the next sidecar.
    let mut rx = p.t.subscribe(&p.queue("x-sump"), 4).await.unwrap();
    assert_nothing_more(&mut rx, "x-sump").await;
    let again = Pair::start(&server, "gone", &[ack]).await;
    let sink = again.take("x-sink", 1, Duration::from_secs(20)).await;
    assert_eq!(sink[0]["id"], "held");
}

/// Item 5: a deadline that cuts a running call is a runtime timeout (x-sump, `Timeout`, the
/// deadline named, then exit 3 so the busy runtime is restarted); an envelope already past
/// its deadline goes to x-sink `failed/Timeout` without a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_cuts_a_call_is_a_runtime_timeout() {
    let server = NatsServer::start();
    let mut p = Pair::start(&server, "cut", &[]).await;
    let past = (chrono::Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    let mut expired = envelope("expired", json!({"sleep": 60}));
    expired["status"] = json!({ "deadline_at": past });
    p.send(expired).await;
    let sink = p.take("x-sink", 1, Duration::from_secs(10)).await;
    assert_eq!(sink[0]["status"]["phase"], "failed");
    assert_eq!(reason(&sink[0]), "Timeout");
    let m = p.metrics();
    assert_eq!(
        metric(
            &m,
            "asya_actor_runtime_execution_duration_seconds_count",
            &[("queue", "asya-cut-a")]
        ),
        0.0,
        "no runtime call for an expired envelope: {m}"
    );

    let deadline = (chrono::Utc::now() + chrono::Duration::seconds(3))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut slow = envelope("slow", json!({"sleep": 60}));
    slow["status"] = json!({ "deadline_at": deadline });
    p.send(slow).await;
    let started = Instant::now();
    let status = p.exit_status(Duration::from_secs(20));
    assert_eq!(status.code(), Some(3), "{}", p.log());
    assert!(started.elapsed() < Duration::from_secs(15));
    let sump = p.take("x-sump", 1, Duration::from_secs(10)).await;
    assert_eq!(sump[0]["id"], "slow");
    assert_eq!(reason(&sump[0]), "Timeout");
    assert!(error_message(&sump[0]).contains(&deadline), "{}", sump[0]);
    // Acked before the exit: not redelivered to the next sidecar.
    let mut rx = p.t.subscribe(&p.queue("a"), 4).await.unwrap();
    assert_nothing_more(&mut rx, "a").await;
}
