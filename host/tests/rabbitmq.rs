//! `plugins/rabbitmq` against a real `rabbitmq-server` (`.ci/setup` installs and starts
//! one on 127.0.0.1:5672; every test makes a vhost of its own and deletes it): the
//! conformance suite through `asya-host plugin test`, the 3-actor kill -9 run, the broker
//! closing every connection mid-run, and interop with a plain AMQP client (Python `pika`).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asya_host::queue::QueueName;
use asya_host::transport::wasm::{AllowList, WasmConfig, WasmTransport};
use asya_host::transport::{OutMessage, Transport};
use asya_test_support::kill9::{self, Actor, Seen, ENVELOPES};
use asya_test_support::{plugin, rabbitmq, Vhost};

const BIN: &str = env!("CARGO_BIN_EXE_asya-host");

#[test]
fn plugin_test_cli_runs_the_suite_on_rabbitmq() {
    let vhost = Vhost::create("asya-ct");
    let config = vhost.config().to_string();
    let out = Command::new(BIN)
        .args(["plugin", "test"])
        .arg(plugin("rabbitmq"))
        .args(["--config", &config, "--allow", &rabbitmq::addr()])
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
    // Every case's queue is durable and bound to the topic exchange by its actor, with a
    // delay queue beside the one that was nacked with a delay.
    let queues = vhost.queues();
    assert!(
        queues.iter().any(|(q, ..)| q.ends_with("-a.delay")),
        "{queues:?}"
    );
    // Not allowed to reach the broker: fails, naming the denial.
    let out = Command::new(BIN)
        .args(["plugin", "test"])
        .arg(plugin("rabbitmq"))
        .args(["--config", &config])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("permission denied"), "{err}");
}

/// The sidecar settings of a run on `vhost` in namespace `ns`.
fn sidecar_env(vhost: &Vhost, ns: &str, cache: &std::path::Path) -> Arc<Vec<(String, String)>> {
    Arc::new(vec![
        ("ASYA_NAMESPACE".to_owned(), ns.to_owned()),
        ("ASYA_TRANSPORT".to_owned(), "wasm".to_owned()),
        (
            "ASYA_TRANSPORT_PLUGIN".to_owned(),
            plugin("rabbitmq").display().to_string(),
        ),
        (
            "ASYA_TRANSPORT_CONFIG".to_owned(),
            vhost.config().to_string(),
        ),
        ("ASYA_TRANSPORT_ALLOW".to_owned(), rabbitmq::addr()),
        (
            "ASYA_PLUGIN_CACHE_DIR".to_owned(),
            cache.display().to_string(),
        ),
        // The component logs each duplicate it drops at DEBUG: counted below.
        (
            "RUST_LOG".to_owned(),
            "warn,asya_host::plugin::bindings=debug".to_owned(),
        ),
    ])
}

/// The test's own client (compiles the component into the shared cache first).
async fn client(vhost: &Vhost, cache: &std::path::Path) -> Arc<WasmTransport> {
    let mut cfg = WasmConfig::new(
        plugin("rabbitmq"),
        &vhost.config().to_string(),
        AllowList::parse(&rabbitmq::addr()).await.unwrap(),
    );
    cfg.cache_dir = Some(cache.to_owned());
    Arc::new(WasmTransport::connect(cfg).await.unwrap())
}

asya_test_support::kill9_transport_helpers!();

/// What disturbs a 3-actor run.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL the middle sidecar (and start a new one).
    KillSidecar,
    /// The broker closes every connection of the vhost (as on a broker restart).
    CloseConnections,
}

/// `ENVELOPES` envelopes a → b → c, three faults at random moments; every envelope at
/// x-sink exactly once, none at x-sump.
async fn three_actor_run(fault: Fault) {
    use rand::Rng;
    let vhost = Vhost::create("asya-k9");
    let cache = tempfile::tempdir().unwrap();
    let ns = format!("k{}", std::process::id());
    let env = sidecar_env(&vhost, &ns, cache.path());
    let started = Instant::now();
    let t = client(&vhost, cache.path()).await;
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
        .map(|a| Actor::start(BIN, a, env.clone()))
        .collect();
    publish(t.as_ref(), &ns).await;
    println!(
        "[{ns}] published {ENVELOPES} envelopes in {:?}",
        started.elapsed()
    );

    let mut rng = rand::rng();
    let mut fault_at: Vec<usize> = (0..3)
        .map(|_| rng.random_range(300..ENVELOPES - 800))
        .collect();
    fault_at.sort_unstable();
    let deadline = Instant::now() + Duration::from_secs(300);
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
            panic!("[{ns}] no progress for 30s: x-sink {n}/{ENVELOPES}, x-sump {sumped}\n{logs}");
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            println!(
                "[{ns}] {:>5.1}s  x-sink {n}/{ENVELOPES}  x-sump {sumped}  faults left {}",
                started.elapsed().as_secs_f64(),
                fault_at.len(),
            );
            last_print = Instant::now();
        }
        if fault_at.first().is_some_and(|&k| n >= k) {
            // A random moment after the threshold, mid-processing.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
            fault_at.remove(0);
            match fault {
                Fault::KillSidecar => {
                    actors[1].kill9_and_restart();
                    println!(
                        "[{ns}] kill -9 sidecar b at x-sink {n}; restarted (generation {})",
                        actors[1].generation
                    );
                }
                Fault::CloseConnections => {
                    vhost.close_connections();
                    println!("[{ns}] broker closed every connection at x-sink {n}");
                }
            }
        }
        if n >= ENVELOPES && fault_at.is_empty() {
            // Keep watching a while so late duplicates would show.
            let at = *done_at.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_secs(3) {
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
    let redelivered = sink
        .lock()
        .unwrap()
        .by_id
        .values()
        .filter(|(_, again)| *again > 0)
        .count();
    // Duplicates: a redelivered input processed again publishes the same output ids; the
    // next actor's consumer drops them by message id (plugins/rabbitmq/README.md).
    let dropped: Vec<usize> = actors
        .iter()
        .map(|a| a.sidecar_logs().matches("duplicate message id").count())
        .collect();
    println!(
        "[{ns}] {fault:?}: duplicates dropped by message id at the inputs of a, b, c: {dropped:?}; \
         x-sink messages redelivered to the test's consumer (counted once): {redelivered}"
    );
    kill9::assert_exactly_once(
        &ns,
        started.elapsed(),
        &sink.lock().unwrap(),
        &sump.lock().unwrap(),
    );
    drop(actors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_middle_sidecar_rabbitmq() {
    three_actor_run(Fault::KillSidecar).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closing_every_connection_loses_nothing() {
    three_actor_run(Fault::CloseConnections).await;
}

/// A plain AMQP client publishes an envelope the way an upstream Asya sidecar does (topic
/// exchange `asya`, routing key = actor, persistent, no message id); our sidecar processes
/// it and the result lands in `asya-<ns>-x-sink`, where the plain client reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_plain_amqp_client_to_our_sidecar_to_x_sink() {
    const SCRIPT: &str = r#"
import json, sys, time
import pika
addr, vhost, ns = sys.argv[1:4]
host, port = addr.rsplit(":", 1)
conn = pika.BlockingConnection(pika.ConnectionParameters(
    host=host, port=int(port), virtual_host=vhost,
    credentials=pika.PlainCredentials("guest", "guest")))
ch = conn.channel()
ch.confirm_delivery()
ch.exchange_declare("asya", "topic", durable=True)
sink = "asya-%s-x-sink" % ns
ch.queue_declare(sink, durable=True)
body = json.dumps({"id": "pika-1", "route": {"prev": [], "curr": "a", "next": []},
                   "headers": {"trace_id": "t-pika"}, "payload": {"hello": "rabbit"}})
deadline = time.time() + 60
while True:
    try:
        # mandatory: unroutable until the sidecar has bound its queue; then published.
        ch.basic_publish("asya", "a", body, pika.BasicProperties(
            content_type="application/json", delivery_mode=2), mandatory=True)
        break
    except pika.exceptions.UnroutableError:
        if time.time() > deadline:
            sys.exit("queue of actor a never bound to exchange asya")
        time.sleep(0.05)
while True:
    method, props, got = ch.basic_get(sink, auto_ack=True)
    if method:
        print(json.dumps({"body": json.loads(got), "delivery_mode": props.delivery_mode,
                          "content_type": props.content_type, "message_id": props.message_id,
                          "routing_key": method.routing_key}))
        break
    if time.time() > deadline:
        sys.exit("nothing arrived at " + sink)
    time.sleep(0.05)
conn.close()
"#;
    let vhost = Vhost::create("asya-interop");
    let cache = tempfile::tempdir().unwrap();
    let ns = format!("i{}", std::process::id());
    let _a = Actor::start(BIN, "a", sidecar_env(&vhost, &ns, cache.path()));
    let out = tokio::task::spawn_blocking({
        let (name, ns) = (vhost.name.clone(), ns.clone());
        move || {
            Command::new("python3")
                .args(["-c", SCRIPT, &rabbitmq::addr(), &name, &ns])
                .output()
                .expect("python3")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pika client failed (pika comes from .ci/setup): {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        _a.logs()
    );
    let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("{got}");
    let body = &got["body"];
    assert_eq!(body["id"], "pika-1");
    assert_eq!(body["payload"], serde_json::json!({"hello": "rabbit"}));
    assert_eq!(body["route"]["prev"], serde_json::json!(["a"]));
    assert_eq!(body["route"]["curr"], "");
    assert_eq!(body["status"]["phase"], "succeeded");
    assert_eq!(body["headers"]["trace_id"], "t-pika");
    assert_eq!(got["delivery_mode"], 2, "persistent");
    assert_eq!(got["content_type"], "application/json");
    assert!(got["message_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(got["routing_key"], format!("asya-{ns}-x-sink"));
}

/// `declare: false` (queues created by an operator, as upstream's manual mode): a queue
/// that does not exist fails the send with a message saying so, and nothing is created;
/// once the queue exists the same connection publishes and consumes through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_false_only_uses_existing_queues() {
    let vhost = Vhost::create("asya-passive");
    let cache = tempfile::tempdir().unwrap();
    let allow = AllowList::parse(&rabbitmq::addr()).await.unwrap();
    let mut passive = vhost.config();
    passive["declare"] = false.into();
    let mut cfg = WasmConfig::new(plugin("rabbitmq"), &passive.to_string(), allow.clone());
    cfg.cache_dir = Some(cache.path().to_owned());
    let t = WasmTransport::connect(cfg).await.unwrap();
    let msg = |body: &'static str| OutMessage {
        queue: QueueName::new("p", "a").unwrap(),
        id: body.into(),
        body: body.into(),
    };
    let err = t.send(msg("early")).await.unwrap_err().to_string();
    assert!(err.contains("declare is false"), "{err}");
    assert!(vhost.queues().is_empty(), "{:?}", vhost.queues());
    // The "operator" (here: the component with declare on) creates the layout.
    let mut cfg = WasmConfig::new(plugin("rabbitmq"), &vhost.config().to_string(), allow);
    cfg.cache_dir = Some(cache.path().to_owned());
    let operator = WasmTransport::connect(cfg).await.unwrap();
    operator.send(msg("first")).await.unwrap();
    t.send(msg("second")).await.unwrap();
    let mut rx = t
        .subscribe(&QueueName::new("p", "a").unwrap(), 4)
        .await
        .unwrap();
    for want in ["first", "second"] {
        let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("delivery within 10s")
            .unwrap();
        assert_eq!(d.body.as_ref(), want.as_bytes());
        d.acker.ack().await.unwrap();
    }
}
