//! Gateway end-to-end tests: real stock Python runtimes, in-process sidecars and end actors,
//! the gateway library and its HTTP API, over the memory transport and a real nats-server.

use std::sync::Arc;
use std::time::Duration;

use asya_host::gateway::client::{call, Endpoint};
use asya_host::gateway::otlp::OtlpReporter;
use asya_host::gateway::reporter::Tee;
use asya_host::gateway::{
    self, Flows, Gateway, HttpReporter, KvStore, MemoryStore, SubmitRequest, TaskStatus, TaskStore,
    TaskView,
};
use asya_host::queue::EndActors;
use asya_host::sidecar::Reporter;
use asya_host::transport::memory::MemoryTransport;
use asya_host::transport::nats::{provision, NatsConfig, NatsTransport};
use asya_host::transport::Transport;
use asya_test_support::NatsServer;
use asya_tests::mesh::Mesh;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

const NS: &str = "gw";
const WAIT: Duration = Duration::from_secs(30);

fn flows() -> Flows {
    gateway::parse_flows(
        r#"
namespace = "ignored"
[actors.tokenize]
handler = "x"
[flows]
pipeline = ["tokenize", "count", "summarize"]
failing = ["tokenize", "boom"]
slow = ["slow"]
fanout = ["split", "square"]
progress = ["progress", "count"]
"#,
    )
    .expect("flows parse")
}

const ACTORS: &[(&str, &str)] = &[
    ("tokenize", "gw_handlers.tokenize"),
    ("count", "gw_handlers.count"),
    ("summarize", "gw_handlers.summarize"),
    ("boom", "gw_handlers.boom"),
    ("slow", "gw_handlers.slow"),
    ("split", "gw_handlers.split"),
    ("square", "gw_handlers.square"),
    ("progress", "gw_handlers.progress"),
];

fn req(flow: &str, payload: Value, timeout: Option<Duration>) -> SubmitRequest {
    SubmitRequest {
        flow: Some(flow.into()),
        route: None,
        payload,
        timeout,
    }
}

/// A memory-transport mesh of every test actor reporting in process, and its gateway.
fn memory_mesh(extra: Option<Arc<dyn Reporter>>) -> (Arc<Gateway>, Mesh) {
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let gw = Gateway::new(
        Arc::new(MemoryStore::new()),
        transport.clone(),
        NS.into(),
        flows(),
        "x-sink".into(),
        "x-sump".into(),
    );
    let reporter = match extra {
        Some(r) => Arc::new(Tee(vec![gw.reporter(), r])) as Arc<dyn Reporter>,
        None => gw.reporter(),
    };
    let mesh = Mesh::start(transport, NS, ACTORS, reporter, |_| {});
    (gw, mesh)
}

async fn serve(gw: Arc<Gateway>, token: Option<&str>) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(gateway::serve(
        listener,
        gw,
        token.map(str::to_owned),
        stop.clone(),
    ));
    (url, stop)
}

async fn final_view(gw: &Gateway, id: &str) -> TaskView {
    let v = gw.wait_final(id, WAIT).await.expect("task exists");
    assert!(v.status.is_final(), "task not final in time: {v:?}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_three_actors_succeed_and_trace_shows_every_hop() {
    let (gw, mesh) = memory_mesh(None);
    let (url, stop) = serve(gw.clone(), None).await;
    let sub = gw
        .submit(req("pipeline", json!({"text": "a b c"}), None))
        .await
        .unwrap();
    assert_eq!(sub.status, TaskStatus::Pending);
    assert_eq!(sub.total_actors, 3);
    assert_eq!(sub.current_actor_name.as_deref(), Some("tokenize"));
    assert_eq!(sub.trace_id.len(), 32);
    let v = final_view(&gw, &sub.id).await;
    assert_eq!(v.status, TaskStatus::Succeeded, "{v:?}");
    assert_eq!((v.actors_completed, v.total_actors), (3, 3));
    assert_eq!(v.result, Some(json!({"summary": "3 words", "first": "a"})));

    // Over HTTP: the SPEC §9 fields.
    let ep = Endpoint::parse(&url).unwrap();
    let (s, b) = call(
        &ep,
        Method::GET,
        &format!("/tasks/{}", sub.id),
        None,
        None,
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::OK);
    let body: Value = serde_json::from_slice(&b).unwrap();
    for k in [
        "id",
        "status",
        "current_actor_name",
        "actors_completed",
        "total_actors",
        "result",
        "created_at",
        "updated_at",
        "trace_id",
    ] {
        assert!(body.get(k).is_some(), "missing {k} in {body}");
    }

    // The timeline: all three hops have durations (every hop report may trail the final).
    let mut table = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        table = gateway::cli::trace(&url, None, &sub.id).await.unwrap();
        if ["tokenize", "count", "summarize", "x-sink"]
            .iter()
            .all(|a| table.contains(a))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{table}");
    let hop_lines: Vec<&str> = table
        .lines()
        .filter(|l| {
            ["tokenize", "count", "summarize"]
                .iter()
                .any(|a| l.split_whitespace().nth(1) == Some(a))
        })
        .collect();
    assert_eq!(hop_lines.len(), 3, "{table}");
    for l in hop_lines {
        assert!(l.matches("ms").count() >= 3, "durations missing: {l}");
    }

    // The list endpoint with filters.
    let (_, b) = call(
        &ep,
        Method::GET,
        "/tasks?status=succeeded&flow=pipeline",
        None,
        None,
        WAIT,
    )
    .await
    .unwrap();
    let list: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1, "{list}");
    let (_, b) = call(&ep, Method::GET, "/tasks?status=failed", None, None, WAIT)
        .await
        .unwrap();
    let list: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 0, "{list}");
    stop.cancel();
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_failures_and_timeouts_and_fan_out() {
    let (gw, mesh) = memory_mesh(None);
    let failing = gw
        .submit(req("failing", json!({"text": "x y"}), None))
        .await
        .unwrap();
    let slow = gw
        .submit(req(
            "slow",
            json!({"slow": 5}),
            Some(Duration::from_millis(500)),
        ))
        .await
        .unwrap();
    let fan = gw
        .submit(req("fanout", json!({"n": 3}), None))
        .await
        .unwrap();

    let v = final_view(&gw, &failing.id).await;
    assert_eq!(v.status, TaskStatus::Failed, "{v:?}");
    let err = v.error.expect("error");
    assert_eq!(err.kind, "ValueError");
    assert!(err.message.contains("boom"), "{err:?}");
    assert!(
        err.traceback.as_deref().unwrap_or("").contains("boom"),
        "{err:?}"
    );

    let v = final_view(&gw, &slow.id).await;
    assert_eq!(v.status, TaskStatus::Failed, "{v:?}");
    assert_eq!(v.error.expect("error").kind, "Timeout");

    let v = final_view(&gw, &fan.id).await;
    assert_eq!(v.status, TaskStatus::Succeeded, "{v:?}");
    let mut squares: Vec<i64> = v
        .result
        .expect("result")
        .as_array()
        .expect("a list for fan-out")
        .iter()
        .map(|r| r["square"].as_i64().unwrap())
        .collect();
    squares.sort();
    assert_eq!(squares, [0, 1, 4]);
    assert_eq!((v.actors_completed, v.total_actors), (2, 2));

    // A final state is never overwritten: cancel is refused, the status stays.
    let c = gw.cancel(&fan.id).await.unwrap();
    assert_eq!(c.status, TaskStatus::Succeeded);
    mesh.stop().await;
}

/// Read SSE events from `GET path` until a `final` event.
async fn read_sse(addr: &str, path: &str) -> Vec<(String, Value)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut lines = BufReader::new(s).lines();
    let mut events = Vec::new();
    let mut kind = String::new();
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            let line = line.trim();
            if let Some(k) = line.strip_prefix("event: ") {
                kind = k.to_owned();
            } else if let Some(d) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(d).unwrap();
                events.push((kind.clone(), v));
                if kind == "final" {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("stream ends with final");
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_sse_stream_delivers_updates_in_order() {
    let (gw, mesh) = memory_mesh(None);
    let (url, stop) = serve(gw.clone(), None).await;
    let addr = url.trim_start_matches("http://").to_owned();
    let sub = gw
        .submit(req("progress", json!({"text": "a b", "sleep": 0.2}), None))
        .await
        .unwrap();
    let events = read_sse(&addr, &format!("/tasks/{}/stream", sub.id)).await;
    println!("{events:#?}");
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.last(), Some(&"final"));
    let steps: Vec<i64> = events
        .iter()
        .filter(|(k, _)| k == "upstream")
        .map(|(_, v)| v["payload"]["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2], "upstream events in order: {kinds:?}");
    let completed: Vec<u64> = events
        .iter()
        .filter(|(k, _)| k != "upstream")
        .map(|(_, v)| v["actors_completed"].as_u64().unwrap())
        .collect();
    assert!(completed.windows(2).all(|w| w[0] <= w[1]), "{completed:?}");
    let last = &events.last().unwrap().1;
    assert_eq!(last["status"], "succeeded");
    assert_eq!(last["result"]["progressed"], true);
    assert_eq!(last["result"]["count"], 2);
    stop.cancel();
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bad_input_gets_clear_4xx() {
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let gw = Gateway::new(
        Arc::new(MemoryStore::new()),
        transport,
        NS.into(),
        flows(),
        "x-sink".into(),
        "x-sump".into(),
    );
    gw.set_max_payload_bytes(1000);
    let (url, stop) = serve(gw, Some("s3cret")).await;
    let ep = Endpoint::parse(&url).unwrap();
    let post = |body: &'static str, token: Option<&'static str>| {
        let ep = ep.clone();
        async move {
            let (s, b) = call(
                &ep,
                Method::POST,
                "/tasks",
                token,
                Some(Bytes::from(body)),
                WAIT,
            )
            .await
            .unwrap();
            (s, String::from_utf8_lossy(&b).into_owned())
        }
    };
    let (s, b) = post(r#"{"flow":"pipeline","payload":{}}"#, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let (s, _) = post(r#"{"flow":"pipeline","payload":{}}"#, Some("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, b) = post(r#"{"flow": "pipeline", "payl"#, Some("s3cret")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b.contains("invalid_json"), "{b}");
    let (s, b) = post(r#"{"flow":"nope","payload":{}}"#, Some("s3cret")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b.contains("unknown flow"), "{b}");
    let big: &'static str = Box::leak(
        format!(r#"{{"flow":"pipeline","payload":"{}"}}"#, "x".repeat(5000)).into_boxed_str(),
    );
    let (s, b) = post(big, Some("s3cret")).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    let (s, _) = post(r#"{"route":[],"payload":1}"#, Some("s3cret")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, b) = post(
        r#"{"flow":"pipeline","payload":{"text":"a"}}"#,
        Some("s3cret"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, _) = call(
        &ep,
        Method::GET,
        "/tasks/missing",
        Some("s3cret"),
        None,
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::NOT_FOUND);
    stop.cancel();
}

/// A tiny OTLP/HTTP collector: every request body on a channel.
async fn collector() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                let mut len = 0usize;
                let mut path = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if path.is_empty() {
                        path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    }
                    let l = line.to_ascii_lowercase();
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).await.unwrap();
                assert_eq!(path, "/v1/traces");
                let _ = tx.send(serde_json::from_slice(&body).unwrap());
                let _ = r
                    .into_inner()
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    .await;
            });
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_spans_carry_the_task_trace_id() {
    let (url, mut rx) = collector().await;
    let otlp: Arc<dyn Reporter> = Arc::new(OtlpReporter::new(&url, "asya-test").unwrap());
    let (gw, mesh) = memory_mesh(Some(otlp));
    let sub = gw
        .submit(req("pipeline", json!({"text": "a b c"}), None))
        .await
        .unwrap();
    assert_eq!(final_view(&gw, &sub.id).await.status, TaskStatus::Succeeded);
    let mut names = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while names.len() < 3 {
        let body = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("spans arrive")
            .unwrap();
        for span in body["resourceSpans"][0]["scopeSpans"][0]["spans"]
            .as_array()
            .unwrap()
        {
            assert_eq!(span["traceId"], sub.trace_id.as_str(), "{span}");
            assert_eq!(span["spanId"].as_str().unwrap().len(), 16);
            names.push(span["name"].as_str().unwrap().to_owned());
        }
    }
    names.sort();
    assert_eq!(names, ["hop count", "hop summarize", "hop tokenize"]);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_kv_gateway_restart_mid_task_tracks_to_the_end() {
    let server = NatsServer::start();
    let ns = format!("gwn{}", std::process::id());
    let cfg = NatsConfig {
        ack_wait: Duration::from_secs(10),
        ..NatsConfig::new(&server.url())
    };
    let actors: Vec<String> = ACTORS.iter().map(|(a, _)| a.to_string()).collect();
    provision(cfg.clone(), &ns, &actors, &EndActors::default())
        .await
        .unwrap();
    let nats = Arc::new(NatsTransport::connect(cfg.clone()).await.unwrap());
    let client = nats.client().clone();
    let transport: Arc<dyn Transport> = nats;
    let bucket = format!("{ns}-tasks");

    let open_gateway = || async {
        let store: Arc<dyn TaskStore> =
            Arc::new(KvStore::open(client.clone(), &bucket).await.unwrap());
        Gateway::new(
            store,
            transport.clone(),
            ns.clone(),
            flows(),
            "x-sink".into(),
            "x-sump".into(),
        )
    };
    let gw1 = open_gateway().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("http://{addr}");
    let stop1 = CancellationToken::new();
    let served1 = tokio::spawn(gateway::serve(
        listener,
        gw1.clone(),
        Some("tok".into()),
        stop1.clone(),
    ));
    // Sidecars report over HTTP, as standalone sidecars do.
    let reporter: Arc<dyn Reporter> =
        Arc::new(HttpReporter::new(&url, Some("tok".into()), "x-sump").unwrap());
    let mesh = Mesh::start(transport.clone(), &ns, ACTORS, reporter, |c| {
        c.transport = asya_host::transport::TransportKind::Nats;
    });

    // A quick task first, to check the plain path over NATS.
    let quick = gw1
        .submit(req("pipeline", json!({"text": "n a t s"}), None))
        .await
        .unwrap();
    let v = final_view(&gw1, &quick.id).await;
    assert_eq!(v.status, TaskStatus::Succeeded, "{v:?}");
    assert_eq!((v.actors_completed, v.total_actors), (3, 3));
    assert_eq!(v.result.as_ref().unwrap()["summary"], "4 words");
    let failing = gw1
        .submit(req("failing", json!({"text": "x"}), None))
        .await
        .unwrap();
    let v = final_view(&gw1, &failing.id).await;
    assert_eq!(v.status, TaskStatus::Failed);
    assert_eq!(v.error.unwrap().kind, "ValueError");

    // Each actor sleeps 0.7 s; restart the gateway once the first hop is in.
    let slow = gw1
        .submit(req("pipeline", json!({"text": "a b", "sleep": 0.7}), None))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = gw1.get(&slow.id).await.unwrap();
        assert!(!v.status.is_final(), "finished before the restart: {v:?}");
        if v.actors_completed >= 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop1.cancel();
    served1.await.unwrap();
    drop(gw1);

    let gw2 = open_gateway().await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stop2 = CancellationToken::new();
    tokio::spawn(gateway::serve(
        listener,
        gw2.clone(),
        Some("tok".into()),
        stop2.clone(),
    ));
    let v = final_view(&gw2, &slow.id).await;
    assert_eq!(v.status, TaskStatus::Succeeded, "{v:?}");
    assert_eq!((v.actors_completed, v.total_actors), (3, 3));
    assert_eq!(v.result.unwrap()["summary"], "2 words");
    stop2.cancel();
    mesh.stop().await;
}
