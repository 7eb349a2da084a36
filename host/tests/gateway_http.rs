//! `asya-host gateway` through the real binary over HTTP (with a real nats-server): the
//! secure default and the two credentials, slow clients, the bounded task store, and
//! input that must get a 400 naming the field instead of a panic.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use asya_host::gateway::task::FinalUpdate;
use asya_host::gateway::WireReport;
use asya_host::queue::EndActors;
use asya_host::transport::nats::{provision, NatsConfig};
use asya_test_support::{free_port, FixtureRuntime, NatsServer, Proc};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_asya-host");

/// `asya-host gateway` with only `env` (and PATH) set; run to completion.
fn gateway_exit(env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("gateway")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gateway did not exit within 20 s (env {env:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running gateway on a free loopback port over a real nats-server; killed on drop.
struct Gateway {
    child: Child,
    addr: String,
    ns: String,
    _dir: tempfile::TempDir,
    _nats: NatsServer,
}

impl Gateway {
    fn start(env: &[(&str, &str)]) -> Gateway {
        let nats = NatsServer::start();
        let ns = format!("gwh{}n{}", std::process::id(), free_port());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(provision(
            NatsConfig::new(&nats.url()),
            &ns,
            &["a".to_owned()],
            &EndActors::default(),
        ))
        .expect("provision");
        let dir = tempfile::tempdir().unwrap();
        let flows = dir.path().join("flows.toml");
        std::fs::write(&flows, "[flows]\nf = [\"a\"]\n").unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("gateway")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ASYA_NATS_URL", nats.url())
            .env("ASYA_NAMESPACE", &ns)
            .env("ASYA_GATEWAY_ADDR", &addr)
            .env("ASYA_GATEWAY_FLOWS", &flows)
            .env("ASYA_LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("gateway starts");
        let mut gw = Gateway {
            child,
            addr,
            ns,
            _dir: dir,
            _nats: nats,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = gw.child.try_wait() {
                panic!("gateway exited early ({s}): {}", gw.log());
            }
            if let Ok((200, _)) = gw.try_call("GET", "/healthz", None, None) {
                return gw;
            }
            assert!(Instant::now() < deadline, "gateway not ready: {}", gw.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// One request on its own connection (`Connection: close`).
    fn try_call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = body.unwrap_or("");
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        s.write_all(req.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("no HTTP answer: {out:?}"),
                )
            })?;
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.to_owned()))
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        self.try_call(method, path, token, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; gateway log:\n{}", self.log()))
    }

    /// Submit a task of flow `f`; returns (id, trace id).
    fn submit(&self, token: Option<&str>) -> (String, String) {
        let (s, b) = self.call(
            "POST",
            "/tasks",
            token,
            Some(r#"{"flow": "f", "payload": {"n": 1}}"#),
        );
        assert_eq!(s, 201, "{b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        (
            v["id"].as_str().unwrap().to_owned(),
            v["trace_id"].as_str().unwrap().to_owned(),
        )
    }

    /// What a sidecar's x-sink sends when the task's only branch succeeded.
    fn final_report(id: &str, trace_id: &str) -> String {
        let r = WireReport::Final {
            trace_id: trace_id.to_owned(),
            fin: FinalUpdate {
                actor: "x-sink".into(),
                envelope_id: id.to_owned(),
                parent_id: None,
                phase: Some(asya_host::envelope::Phase::Succeeded),
                reason: None,
                error: None,
                payload: json!({"done": true}),
                actors_completed: 1,
                total_actors: 1,
                status_actor: None,
                received_at: "2026-01-01T00:00:00Z".into(),
                to_sump: false,
            },
        };
        serde_json::to_string(&r).unwrap()
    }

    /// Poll `GET /tasks/{id}` until `want(status, body)` or 20 s.
    fn wait_for(&self, id: &str, token: Option<&str>, want: impl Fn(u16, &str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (s, b) = self.call("GET", &format!("/tasks/{id}"), token, None);
            if want(s, &b) {
                return b;
            }
            assert!(
                Instant::now() < deadline,
                "task {id}: last answer {s} {b}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ auth

#[test]
fn gateway_refuses_a_non_loopback_address_without_a_token() {
    // Nothing listens on the NATS port: the check comes before the broker is contacted.
    let nats = ("ASYA_NATS_URL", "nats://127.0.0.1:1");
    let port = format!("0.0.0.0:{}", free_port());
    for env in [
        vec![nats],                               // the default address :8090
        vec![nats, ("ASYA_GATEWAY_ADDR", &port)], // explicit
        vec![
            nats,
            ("ASYA_GATEWAY_ADDR", &port),
            ("ASYA_GATEWAY_REPORT_TOKEN", "r"),
        ],
    ] {
        let (code, err) = gateway_exit(&env);
        assert_eq!(code, 1, "{env:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("ASYA_GATEWAY_TOKEN"), "{err}");
        assert!(err.contains("ASYA_GATEWAY_AUTH=none"), "{err}");
        assert!(err.contains("not loopback"), "{err}");
    }
    // A token, or the explicit opt-out, passes the check (and fails later on the broker).
    for extra in [("ASYA_GATEWAY_TOKEN", "t"), ("ASYA_GATEWAY_AUTH", "none")] {
        let (code, err) = gateway_exit(&[nats, ("ASYA_GATEWAY_ADDR", &port), extra]);
        assert_eq!(code, 1, "{err}");
        assert!(!err.contains("not loopback"), "{extra:?}: {err}");
    }
    // The opt-out with a token set is a contradiction, said in one line.
    let (code, err) = gateway_exit(&[
        nats,
        ("ASYA_GATEWAY_AUTH", "none"),
        ("ASYA_GATEWAY_TOKEN", "t"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("ASYA_GATEWAY_AUTH"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn gateway_client_token_cannot_forge_reports() {
    let gw = Gateway::start(&[
        ("ASYA_GATEWAY_TOKEN", "client-secret"),
        ("ASYA_GATEWAY_REPORT_TOKEN", "report-secret"),
    ]);
    let (s, _) = gw.call("GET", "/tasks", None, None);
    assert_eq!(s, 401);
    let (id, trace) = gw.submit(Some("client-secret"));
    let report = Gateway::final_report(&id, &trace);
    // The client credential does not open the report route, nor does no credential.
    for token in [Some("client-secret"), None] {
        let (s, b) = gw.call("POST", "/reports", token, Some(&report));
        assert_eq!(s, 401, "{token:?}: {b}");
        assert!(b.contains("ASYA_GATEWAY_REPORT_TOKEN"), "{b}");
    }
    // The sidecars' credential does not open the task API.
    let (s, _) = gw.call("GET", &format!("/tasks/{id}"), Some("report-secret"), None);
    assert_eq!(s, 401);
    let (s, b) = gw.call("GET", &format!("/tasks/{id}"), Some("client-secret"), None);
    assert_eq!(s, 200);
    assert!(
        b.contains("\"pending\""),
        "the forged report was not applied: {b}"
    );
    // The report credential is accepted on its route and the report is applied.
    let (s, b) = gw.call("POST", "/reports", Some("report-secret"), Some(&report));
    assert_eq!(s, 202, "{b}");
    gw.wait_for(&id, Some("client-secret"), |s, b| {
        s == 200 && b.contains("\"succeeded\"")
    });
}

#[test]
fn gateway_report_token_falls_back_to_the_client_token() {
    let gw = Gateway::start(&[("ASYA_GATEWAY_TOKEN", "one")]);
    let (id, trace) = gw.submit(Some("one"));
    let report = Gateway::final_report(&id, &trace);
    let (s, _) = gw.call("POST", "/reports", None, Some(&report));
    assert_eq!(s, 401);
    let (s, b) = gw.call("POST", "/reports", Some("one"), Some(&report));
    assert_eq!(s, 202, "{b}");
    gw.wait_for(&id, Some("one"), |s, b| {
        s == 200 && b.contains("\"succeeded\"")
    });
}

// ------------------------------------------------------------------ slow clients

/// Time from `start` until the server closes `s` (reads until EOF), or `None` when still
/// open `limit` after `start`; and what it answered.
fn closed_after(mut s: TcpStream, start: Instant, limit: Duration) -> (Option<Duration>, String) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (Some(start.elapsed()), String::from_utf8_lossy(&got).into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (Some(start.elapsed()), String::from_utf8_lossy(&got).into()),
        }
    }
    (None, String::from_utf8_lossy(&got).into())
}

#[test]
fn gateway_closes_half_sent_requests_after_the_read_timeout() {
    let gw = Gateway::start(&[("ASYA_GATEWAY_READ_TIMEOUT", "1s")]);
    let limit = Duration::from_secs(6);
    let open = || TcpStream::connect(&gw.addr).unwrap();
    let start = Instant::now();

    // Half a request head.
    let mut head = open();
    head.write_all(b"POST /tasks HTTP/1.1\r\nHost: gw\r\nContent-Le")
        .unwrap();
    // A full head, half the body it announced.
    let mut body = open();
    body.write_all(
        b"POST /tasks HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"flow\": ",
    )
    .unwrap();
    // Nothing at all.
    let idle = open();

    for (what, s) in [("half head", head), ("half body", body), ("idle", idle)] {
        let (after, got) = closed_after(s, start, limit);
        let after = after.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        println!("{what}: closed after {after:?}: {got:?}");
        assert!(after >= Duration::from_millis(700), "{what}: {after:?}");
        if what == "half body" {
            assert!(got.starts_with("HTTP/1.1 408"), "{what}: {got:?}");
            assert!(got.contains("ASYA_GATEWAY_READ_TIMEOUT"), "{got}");
        }
    }
    // The gateway still serves.
    assert_eq!(gw.call("GET", "/healthz", None, None).0, 200);
}

#[test]
fn gateway_bounds_concurrent_connections() {
    let gw = Gateway::start(&[
        ("ASYA_GATEWAY_MAX_CONNECTIONS", "3"),
        ("ASYA_GATEWAY_READ_TIMEOUT", "30s"),
    ]);
    let held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(&gw.addr).unwrap();
            s.write_all(b"GET /tasks HTTP/1.1\r\nHost: gw\r\n").unwrap();
            s
        })
        .collect();
    // Each held connection is accepted before the next one; the fourth is refused at once
    // (poll: the accept loop runs concurrently with us).
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let (s, b) = gw.call("GET", "/healthz", None, None);
        if s == 503 {
            break b;
        }
        assert!(Instant::now() < deadline, "never refused: {s} {b}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(answer.contains("ASYA_GATEWAY_MAX_CONNECTIONS"), "{answer}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.call("GET", "/healthz", None, None).0 != 200 {
        assert!(Instant::now() < deadline, "slots not released");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------ bounded store

#[test]
fn gateway_forgets_finished_tasks_after_the_retention() {
    let gw = Gateway::start(&[("ASYA_GATEWAY_RETENTION", "1s")]);
    let (id, trace) = gw.submit(None);
    let (s, b) = gw.call(
        "POST",
        "/reports",
        None,
        Some(&Gateway::final_report(&id, &trace)),
    );
    assert_eq!(s, 202, "{b}");
    gw.wait_for(&id, None, |s, b| s == 200 && b.contains("\"succeeded\""));
    let finished = Instant::now();
    let gone = gw.wait_for(&id, None, |s, _| s == 404);
    assert!(finished.elapsed() >= Duration::from_millis(800));
    assert!(gone.contains("ASYA_GATEWAY_RETENTION"), "{gone}");
    assert!(gone.contains(&id), "{gone}");
    // The list forgets it too.
    let (_, list) = gw.call("GET", "/tasks", None, None);
    assert!(!list.contains(&id), "{list}");
}

#[test]
fn gateway_memory_store_drops_the_oldest_finished_task_first() {
    let gw = Gateway::start(&[("ASYA_GATEWAY_MAX_TASKS", "3")]);
    let a = gw.submit(None);
    let b = gw.submit(None);
    let c = gw.submit(None);
    let (s, _) = gw.call(
        "POST",
        "/reports",
        None,
        Some(&Gateway::final_report(&b.0, &b.1)),
    );
    assert_eq!(s, 202);
    gw.wait_for(&b.0, None, |s, body| {
        s == 200 && body.contains("\"succeeded\"")
    });
    // Over the cap: the finished task goes, though it is not the oldest.
    let d = gw.submit(None);
    let status = |id: &str| gw.call("GET", &format!("/tasks/{id}"), None, None).0;
    assert_eq!(status(&b.0), 404);
    for t in [&a, &c, &d] {
        assert_eq!(status(&t.0), 200);
    }
    // None finished: the oldest goes.
    let e = gw.submit(None);
    assert_eq!(status(&a.0), 404);
    for t in [&c, &d, &e] {
        assert_eq!(status(&t.0), 200);
    }
}

#[test]
fn gateway_nats_store_expires_tasks_after_the_retention() {
    let gw = Gateway::start(&[
        ("ASYA_GATEWAY_STORE", "nats"),
        ("ASYA_GATEWAY_RETENTION", "2s"),
    ]);
    let (id, trace) = gw.submit(None);
    let (s, _) = gw.call(
        "POST",
        "/reports",
        None,
        Some(&Gateway::final_report(&id, &trace)),
    );
    assert_eq!(s, 202);
    gw.wait_for(&id, None, |s, b| s == 200 && b.contains("\"succeeded\""));
    let gone = gw.wait_for(&id, None, |s, _| s == 404);
    assert!(gone.contains("ASYA_GATEWAY_RETENTION"), "{gone}");
    println!("bucket of namespace {} expired the task", gw.ns);
}

// ------------------------------------------------------------------ input

#[test]
fn gateway_answers_out_of_range_fields_with_400_naming_them() {
    let gw = Gateway::start(&[]);
    let long_route: Vec<String> = (0..2000).map(|i| format!("a{i}")).collect();
    let long_route = json!({"route": long_route, "payload": 1}).to_string();
    for (body, field) in [
        (
            r#"{"flow": "f", "payload": 1, "timeout": 1e300}"#,
            "timeout",
        ),
        (r#"{"flow": "f", "payload": 1, "timeout": 1e13}"#, "timeout"),
        (r#"{"flow": "f", "payload": 1, "timeout": -5}"#, "timeout"),
        (r#"{"flow": "f", "payload": 1, "timeout": 0}"#, "timeout"),
        (
            r#"{"flow": "f", "payload": 1, "timeout": "100000000000h"}"#,
            "timeout",
        ),
        (
            r#"{"flow": "f", "payload": 1, "timeout": "soon"}"#,
            "timeout",
        ),
        (long_route.as_str(), "route"),
        (r#"{"route": ["a", "no spaces"], "payload": 1}"#, "route"),
    ] {
        let (s, b) = gw.call("POST", "/tasks", None, Some(body));
        assert_eq!(s, 400, "{}: {b}", &body[..body.len().min(80)]);
        assert!(b.contains(field), "{field}: {b}");
    }
    let (s, b) = gw.call("GET", "/tasks?limit=-1", None, None);
    assert_eq!(s, 400);
    assert!(b.contains("limit"), "{b}");
    // A report whose counts would overflow the task's arithmetic.
    let (id, trace) = gw.submit(None);
    let hop = json!({
        "kind": "hop",
        "trace_id": trace,
        "hop": {
            "entry": {"actor": "a", "envelope_id": id, "received_at": "2026-01-01T00:00:00Z",
                      "duration_ms": 1.0},
            "sent": 9223372036854775808u64,
            "next_actor": null,
            "actors_completed": 1,
            "total_actors": 1
        }
    });
    let (s, b) = gw.call("POST", "/reports", None, Some(&hop.to_string()));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("hop.sent"), "{b}");
    // A day-long timeout is fine, and the gateway (and its report applier) still works.
    let (s, b) = gw.call(
        "POST",
        "/tasks",
        None,
        Some(r#"{"flow": "f", "payload": 1, "timeout": 86400}"#),
    );
    assert_eq!(s, 201, "{b}");
    let (s, _) = gw.call(
        "POST",
        "/reports",
        None,
        Some(&Gateway::final_report(&id, &trace)),
    );
    assert_eq!(s, 202);
    gw.wait_for(&id, None, |s, b| s == 200 && b.contains("\"succeeded\""));
}

// ------------------------------------------------------------------ cancel

/// Issue #19: `POST /tasks/{id}/cancel` on the gateway binary reaches standalone sidecar
/// binaries on NATS (the `asya-<ns>-canceled` KV bucket): a 3-actor flow of 2 s calls,
/// canceled after the first hop, costs at most one more runtime call.
#[test]
fn cancel_reaches_standalone_sidecars_through_the_nats_bucket() {
    let gw = Gateway::start(&[("ASYA_GATEWAY_STORE", "nats")]);
    let url = format!("http://{}", gw.addr);
    let mut runtimes = Vec::new();
    let mut sidecars = Vec::new();
    for a in ["s1", "s2", "s3"] {
        let rt = FixtureRuntime::start();
        let log = std::fs::File::create(rt.dir.path().join("sidecar.log")).unwrap();
        let child = Command::new(BIN)
            .arg("sidecar")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ASYA_ACTOR_NAME", a)
            .env("ASYA_NAMESPACE", &gw.ns)
            .env("ASYA_NATS_URL", gw._nats.url())
            .env("ASYA_SOCKET_DIR", rt.dir.path())
            .env("ASYA_GATEWAY_URL", &url)
            .env("ASYA_METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("ASYA_LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("sidecar starts");
        sidecars.push(Proc(child));
        runtimes.push(rt);
    }
    let (s, b) = gw.call(
        "POST",
        "/tasks",
        None,
        Some(r#"{"route": ["s1", "s2", "s3"], "payload": {"op": "sleep", "s": 2}}"#),
    );
    assert_eq!(s, 201, "{b}");
    let id = serde_json::from_str::<Value>(&b).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.wait_for(&id, None, |s, b| {
        s == 200 && serde_json::from_str::<Value>(b).unwrap()["actors_completed"] == 1
    });
    let calls = || -> usize { runtimes.iter().map(|r| r.invocations().len()).sum() };
    let at_cancel = calls();
    assert!(at_cancel >= 1, "s1 was called");
    let (s, b) = gw.call("POST", &format!("/tasks/{id}/cancel"), None, None);
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"canceled\""), "{b}");
    // Time for two more 2 s calls, had the flow gone on.
    std::thread::sleep(Duration::from_secs(6));
    let total = calls();
    let logs: String = runtimes
        .iter()
        .map(|r| std::fs::read_to_string(r.dir.path().join("sidecar.log")).unwrap_or_default())
        .collect();
    assert!(
        total <= at_cancel + 1 && total <= 2,
        "runtime calls: {at_cancel} at the cancel, {total} in all\n{logs}"
    );
    assert!(logs.contains("task canceled"), "{logs}");
    drop(sidecars);
}
