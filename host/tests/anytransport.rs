//! Every part of the mesh on a transport component, through the real binary: `up
//! --transport wasm` runs the README's example pipeline on RabbitMQ (a vhost of its own on
//! the broker `.ci/setup` starts, deleted afterwards) and on Redis Streams (a redis-server
//! of this test); `provision` creates RabbitMQ's layout; and a gateway task goes through
//! separate gateway, sidecar and runtime processes on Redis Streams with no NATS at all.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use asya_test_support::{free_port, http_get, plugin, rabbitmq, repo_root, RedisServer, Vhost};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_asya-host");

/// `asya-host ARGS` with none of the caller's `ASYA_*` variables; any use of NATS would
/// fail at once (nothing listens on port 1).
fn host(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("ASYA_") || k == "RUST_LOG" || k == "PYTHONPATH" {
            c.env_remove(k);
        }
    }
    c.args(args)
        .current_dir(repo_root())
        .env("ASYA_NATS_URL", "nats://127.0.0.1:1")
        .stdin(Stdio::null());
    c
}

/// Run to completion within `limit` (killed otherwise).
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "did not finish within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `up examples/reviews/flow.toml --input ... --transport wasm` with `plugin`, `config`,
/// `allow`; checks the 20 results as `host/tests/mesh.rs` does for the memory transport.
fn run_example_on(plugin_path: &Path, config: &str, allow: &str) {
    plugin("priority-router");
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = host(&[
        "up",
        "examples/reviews/flow.toml",
        "--input",
        "examples/reviews/inputs.jsonl",
        "--transport",
        "wasm",
        "--transport-plugin",
        plugin_path.to_str().unwrap(),
        "--transport-config",
        config,
        "--transport-allow",
        allow,
    ]);
    cmd.env("TMPDIR", tmp.path())
        .env("ASYA_PLUGIN_CACHE_DIR", tmp.path().join("cache"));
    let out = output_within(cmd, Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a result line is JSON"))
        .collect();
    assert_eq!(lines.len(), 20, "{stderr}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["line"], i + 1, "results in input order: {l}");
        assert_eq!(l["status"], "succeeded", "{l}");
    }
    // r02 is angry: the priority-router policy sent it through `escalate`.
    assert!(
        lines[1]["result"].to_string().contains("\"ticket\":\"T-"),
        "{}",
        lines[1]
    );
    assert!(
        stderr.contains("20 tasks: 20 succeeded, 0 failed"),
        "{stderr}"
    );
}

#[test]
fn up_runs_the_example_pipeline_on_rabbitmq() {
    let vhost = Vhost::create("asya-up");
    run_example_on(
        &plugin("rabbitmq"),
        &vhost.config().to_string(),
        &rabbitmq::addr(),
    );
    // The mesh's queues were the broker's: every actor's, x-sink's and x-sump's, all
    // drained (nothing ready, nothing unacked) once the run is over.
    let queues = vhost.queues();
    for actor in [
        "parse",
        "sentiment",
        "escalate",
        "aspects",
        "tally",
        "x-sink",
        "x-sump",
    ] {
        let q = format!("asya-reviews-{actor}");
        let found = queues.iter().find(|(name, ..)| *name == q);
        assert!(
            matches!(found, Some((_, 0, 0))),
            "{q}: {found:?} in {queues:?}"
        );
    }
}

#[test]
fn up_runs_the_example_pipeline_on_redis_streams() {
    let server = RedisServer::start();
    let config = serde_json::json!({ "addr": server.addr() }).to_string();
    run_example_on(&plugin("redis-streams"), &config, &server.addr());
}

/// `rabbitmqctl -q -p VHOST list_X COLUMNS` as rows of words.
fn rabbitmq_list(vhost: &Vhost, what: &str, columns: &[&str]) -> Vec<Vec<String>> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "-p", &vhost.name, what, "--no-table-headers"])
        .args(columns)
        .output()
        .expect("rabbitmqctl");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .filter(|r: &Vec<String>| !r.is_empty())
        .collect()
}

#[test]
fn provision_creates_the_rabbitmq_layout() {
    let vhost = Vhost::create("asya-prov");
    let cache = tempfile::tempdir().unwrap();
    let provision = |config: &Value| {
        let mut cmd = host(&["provision", "--namespace", "shop", "--actors", "a,b-c"]);
        cmd.env("ASYA_TRANSPORT", "wasm")
            .env("ASYA_TRANSPORT_PLUGIN", plugin("rabbitmq"))
            .env("ASYA_TRANSPORT_CONFIG", config.to_string())
            .env("ASYA_TRANSPORT_ALLOW", rabbitmq::addr())
            .env("ASYA_PLUGIN_CACHE_DIR", cache.path());
        output_within(cmd, Duration::from_secs(120))
    };
    // declare: false on an empty vhost only checks: it fails, naming the missing queue.
    let mut passive = vhost.config();
    passive["declare"] = false.into();
    let out = provision(&passive);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("asya-shop-a") && stderr.contains("declare"),
        "{stderr}"
    );
    assert!(vhost.queues().is_empty(), "{:?}", vhost.queues());

    let out = provision(&vhost.config());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = ["a", "b-c", "x-sink", "x-sump"];
    for a in expected {
        assert!(
            stdout.contains(&format!("queue asya-shop-{a}\n")),
            "{stdout}"
        );
    }
    // Upstream's layout: a durable topic exchange `asya`, a durable queue per actor bound
    // to it with the actor as routing key.
    let exchanges = rabbitmq_list(&vhost, "list_exchanges", &["name", "type", "durable"]);
    assert!(
        exchanges.contains(&vec!["asya".into(), "topic".into(), "true".into()]),
        "{exchanges:?}"
    );
    let queues = rabbitmq_list(&vhost, "list_queues", &["name", "durable", "messages"]);
    let mut names: Vec<&str> = queues.iter().map(|r| r[0].as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        expected.map(|a| format!("asya-shop-{a}")).to_vec(),
        "{queues:?}"
    );
    assert!(
        queues.iter().all(|r| r[1] == "true" && r[2] == "0"),
        "{queues:?}"
    );
    let bindings = rabbitmq_list(
        &vhost,
        "list_bindings",
        &["source_name", "destination_name", "routing_key"],
    );
    for a in expected {
        // `b-c`: the routing key is the actor, even with a `-` in it (the namespace is
        // known from the queue name's first part).
        let row = vec!["asya".to_owned(), format!("asya-shop-{a}"), a.to_owned()];
        assert!(bindings.contains(&row), "{row:?} not in {bindings:?}");
    }
    // Again: idempotent; and now declare: false finds every queue.
    let out = provision(&vhost.config());
    assert!(out.status.success(), "{out:?}");
    let out = provision(&passive);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        rabbitmq_list(&vhost, "list_queues", &["name"]).len(),
        4,
        "nothing new"
    );
}

/// Processes killed (and reaped) when the test ends, however it ends.
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn spawn(&mut self, name: &str, mut cmd: Command, logs: &Path) {
        let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        self.0.push((name.to_owned(), child));
    }

    /// Every log, for a failure message.
    fn logs(&self, logs: &Path) -> String {
        self.0
            .iter()
            .map(|(n, _)| {
                let text = std::fs::read_to_string(logs.join(format!("{n}.log")));
                format!("--- {n}\n{}", text.unwrap_or_default())
            })
            .collect()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn gateway_task_round_trip_on_redis_streams_without_nats() {
    let server = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path();
    let port = free_port();
    let examples = repo_root().join("examples/nats");
    let transport = [
        ("ASYA_NAMESPACE", "demo".to_owned()),
        ("ASYA_TRANSPORT", "wasm".to_owned()),
        (
            "ASYA_TRANSPORT_PLUGIN",
            plugin("redis-streams").display().to_string(),
        ),
        (
            "ASYA_TRANSPORT_CONFIG",
            serde_json::json!({ "addr": server.addr() }).to_string(),
        ),
        ("ASYA_TRANSPORT_ALLOW", server.addr()),
        (
            "ASYA_PLUGIN_CACHE_DIR",
            tmp.path().join("cache").display().to_string(),
        ),
        ("ASYA_GATEWAY_URL", format!("http://127.0.0.1:{port}")),
        // No admin servers (they would all want :8080).
        ("ASYA_METRICS_ADDR", "off".to_owned()),
    ];
    let with_env = |mut c: Command| {
        c.envs(transport.iter().map(|(k, v)| (*k, v.as_str())));
        c
    };
    // The queues first (this also compiles the component into the shared cache).
    let out = output_within(
        with_env(host(&["provision", "--actors", "upper,count"])),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        4,
        "{out:?}"
    );

    let mut procs = Procs(Vec::new());
    for a in ["upper", "count"] {
        let sockets = tmp.path().join(a);
        std::fs::create_dir_all(&sockets).unwrap();
        let mut runtime = Command::new("python3");
        runtime
            .arg(repo_root().join("sdk/python/asya_runtime.py"))
            .current_dir(&examples)
            .env("ASYA_HANDLER", format!("handlers.{a}"))
            .env("ASYA_SOCKET_DIR", &sockets)
            .stdin(Stdio::null());
        procs.spawn(&format!("runtime-{a}"), runtime, logs);
        let mut sidecar = with_env(host(&["sidecar"]));
        sidecar
            .env("ASYA_ACTOR_NAME", a)
            .env("ASYA_SOCKET_DIR", &sockets);
        procs.spawn(&format!("sidecar-{a}"), sidecar, logs);
    }
    for a in ["x-sink", "x-sump"] {
        let mut end = with_env(host(&["sidecar"]));
        end.env("ASYA_ACTOR_NAME", a)
            .env("ASYA_IS_END_ACTOR", "true");
        procs.spawn(a, end, logs);
    }
    let mut gateway = with_env(host(&["gateway"]));
    gateway
        .env("ASYA_GATEWAY_FLOWS", examples.join("flows.toml"))
        .env("ASYA_GATEWAY_ADDR", format!("127.0.0.1:{port}"));
    procs.spawn("gateway", gateway, logs);
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the gateway did not listen\n{}",
            procs.logs(logs)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // `send` submits through the gateway, which publishes the first envelope on Redis.
    let send = with_env(host(&[
        "send",
        "shout",
        r#"{"text": "hello mesh"}"#,
        "--wait",
        "--timeout",
        "60s",
    ]));
    let out = output_within(send, Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        procs.logs(logs)
    );
    let view: Value = serde_json::from_str(&stdout).expect("send prints the task");
    let id = view["id"].as_str().expect("task id");
    let (status, body) = http_get(port, &format!("/tasks/{id}")).expect("the gateway answers");
    assert_eq!(status, 200, "{body}");
    let task: Value = serde_json::from_str(&body).expect("GET /tasks/{id} is JSON");
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["result"]["text"], "HELLO MESH", "{task}");
    assert_eq!(task["result"]["length"], 10, "{task}");
    // Nothing of it went through NATS: no process logged a NATS connection attempt.
    let all = procs.logs(logs);
    assert!(!all.to_lowercase().contains("nats"), "{all}");
}
