//! The task control plane of issue #19 end to end: a cancel that reaches the actors, x-sump
//! replay, pause and resume (real nats-server, stock Python runtimes, in-process sidecars and gateway).

use std::sync::Arc;
use std::time::Duration;

use asya_host::cancel::{self, Canceled};
use asya_host::config::SidecarConfig;
use asya_host::gateway::client::{call, Endpoint};
use asya_host::gateway::{
    self, Gateway, KvStore, MemoryStore, SubmitRequest, TaskStatus, TaskStore,
};
use asya_host::queue::{EndActors, QueueName};
use asya_host::replay::{replay, ReplayOptions, ReplaySummary};
use asya_host::sidecar::Reporter;
use asya_host::transport::nats::{provision, NatsConfig, NatsTransport};
use asya_host::transport::Transport;
use asya_host::SidecarBuilder;
use asya_test_support::runtime::stock_command;
use asya_test_support::{eventually, eventually_async, repo_root, NatsServer, Proc};
use asya_tests::mesh::Mesh;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn calls(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

async fn nats(ns: &str, actors: &[String]) -> (NatsServer, NatsConfig, Arc<NatsTransport>) {
    let server = NatsServer::start();
    let cfg = NatsConfig {
        ack_wait: Duration::from_secs(10),
        ..NatsConfig::new(&server.url())
    };
    provision(cfg.clone(), ns, actors, &EndActors::default())
        .await
        .unwrap();
    let t = Arc::new(NatsTransport::connect(cfg.clone()).await.unwrap());
    (server, cfg, t)
}

/// Acceptance (issue #19, cancel): a 5-actor flow with 2 s handlers, canceled after the first
/// hop: at most one more runtime call for that task (the call already running), the task is
/// `canceled`, and its envelope ends in x-sink instead of reaching the next runtimes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_the_first_hop_stops_the_flow_over_nats() {
    let ns = format!("ctlc{}", std::process::id());
    let names: Vec<String> = (1..=5).map(|i| format!("s{i}")).collect();
    let (_server, _cfg, nats) = nats(&ns, &names).await;
    let transport: Arc<dyn Transport> = nats;
    let gw = Gateway::new(
        Arc::new(MemoryStore::new()),
        transport.clone(),
        ns.clone(),
        Default::default(),
        "x-sink".into(),
        "x-sump".into(),
    );
    let actors: Vec<(&str, &str)> = names
        .iter()
        .map(|n| (n.as_str(), "gw_handlers.step"))
        .collect();
    let reporter: Arc<dyn Reporter> = gw.reporter();
    let mesh = Mesh::start_with(
        transport.clone(),
        &ns,
        &actors,
        reporter,
        Some(gw.canceled()),
        |c| c.transport = asya_host::transport::TransportKind::Nats,
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let sub = gw
        .submit(SubmitRequest {
            route: Some(names.clone()),
            payload: json!({"log": log, "sleep": 2}),
            ..Default::default()
        })
        .await
        .unwrap();
    // After the first hop is reported (s1 done), cancel.
    let first_hop = eventually_async(WAIT, || async {
        gw.get(&sub.id)
            .await
            .is_some_and(|v| v.actors_completed >= 1)
    })
    .await;
    assert!(first_hop, "the first hop never finished");
    let at_cancel = calls(&log);
    let v = gw.cancel(&sub.id).await.unwrap();
    assert_eq!(v.status, TaskStatus::Canceled);
    // The envelope reaches x-sink as canceled (the final report lands in the timeline).
    let sunk = eventually_async(WAIT, || async {
        gw.get_task(&sub.id)
            .await
            .is_some_and(|t| t.timeline.iter().any(|e| e.actor == "x-sink"))
    })
    .await;
    assert!(sunk, "the canceled envelope never reached x-sink");
    // Long enough for two more 2 s calls, had the flow gone on.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let total = calls(&log);
    assert!(
        total <= at_cancel + 1 && total <= 2,
        "runtime calls: {at_cancel} at the cancel, {total} in all (at most one more allowed)"
    );
    let v = gw.get(&sub.id).await.unwrap();
    assert_eq!(v.status, TaskStatus::Canceled, "{v:?}");

    // Another task of the same actors is not affected.
    let other = gw
        .submit(SubmitRequest {
            route: Some(names.clone()),
            payload: json!({"log": dir.path().join("other.log"), "sleep": 0}),
            ..Default::default()
        })
        .await
        .unwrap();
    let v = gw.wait_final(&other.id, WAIT).await.unwrap();
    assert_eq!(v.status, TaskStatus::Succeeded, "{v:?}");
    assert_eq!(v.result.unwrap()["steps"], 5);
    mesh.stop().await;
}

/// Standalone sidecars on NATS learn canceled ids from the namespace's KV bucket: the
/// gateway announces, a watcher started before sees it, a watcher started after (a restarted
/// sidecar) sees it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceled_ids_travel_through_the_nats_kv_bucket() {
    let ns = format!("ctlk{}", std::process::id());
    let (_server, _cfg, nats) = nats(&ns, &["a".to_owned()]).await;
    let client = nats.client().clone();
    let transport: Arc<dyn Transport> = nats;
    let gw = Gateway::new(
        Arc::new(MemoryStore::new()),
        transport,
        ns.clone(),
        Default::default(),
        "x-sink".into(),
        "x-sump".into(),
    );
    gw.set_cancel_bucket(cancel::open_bucket(client.clone(), &ns).await.unwrap());
    let stop = CancellationToken::new();
    let before = Canceled::new();
    cancel::watch(
        cancel::open_bucket(client.clone(), &ns).await.unwrap(),
        before.clone(),
        stop.clone(),
    );
    let sub = gw
        .submit(SubmitRequest {
            route: Some(vec!["a".into()]),
            payload: json!({}),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!before.contains(&sub.id));
    gw.cancel(&sub.id).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || before.contains(&sub.id)).await,
        "the running watcher never saw the cancel"
    );
    let after = Canceled::new();
    cancel::watch(
        cancel::open_bucket(client, &ns).await.unwrap(),
        after.clone(),
        stop.clone(),
    );
    assert!(
        eventually(Duration::from_secs(10), || after.contains(&sub.id)).await,
        "a watcher started later never learned the cancel"
    );
    assert_eq!(after.len(), 1);
    stop.cancel();
}

/// The stock runtime serving `gw_handlers.fragile` in `dir`, fixed or not.
fn fragile_runtime(dir: &std::path::Path, fixed: bool) -> Proc {
    let mut cmd = stock_command(
        dir,
        "gw_handlers.fragile",
        &repo_root().join("tests/fixtures/handlers"),
    );
    cmd.env("ASYA_LOG_LEVEL", "WARNING");
    if fixed {
        cmd.env("GW_FIXED", "1");
    }
    Proc(cmd.spawn().expect("python3 starts"))
}

async fn depth(t: &dyn Transport, ns: &str, actor: &str) -> u64 {
    t.queue_depth(&QueueName::new(ns, actor).unwrap())
        .await
        .unwrap()
        .unwrap_or(0)
}

/// Acceptance (issue #19, replay): a failing handler sends 20 tasks to x-sump; its runtime
/// is restarted fixed; a replay sends the 20 back and they succeed; an envelope that still
/// fails is replayed `max_replays` times, then stays in x-sump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_the_fix_succeeds_and_a_still_failing_envelope_stops() {
    let ns = format!("ctlr{}", std::process::id());
    let (_server, _cfg, nats) = nats(&ns, &["fragile".to_owned()]).await;
    let transport: Arc<dyn Transport> = nats;
    let gw = Gateway::new(
        Arc::new(MemoryStore::new()),
        transport.clone(),
        ns.clone(),
        Default::default(),
        "x-sink".into(),
        "x-sump".into(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut runtime = fragile_runtime(dir.path(), false);
    let stop = CancellationToken::new();
    let mut cfg = SidecarConfig::new("fragile", &ns, dir.path());
    cfg.transport = asya_host::transport::TransportKind::Nats;
    cfg.ready_timeout = Duration::from_secs(20);
    // Two attempts: after the runtime restart, the first call can land on a pooled
    // connection to the killed runtime ("lost"), which one attempt would send to x-sump.
    cfg.resiliency.max_attempts = 2;
    cfg.resiliency.backoff_initial = Duration::from_millis(50);
    cfg.shutdown_grace = Duration::from_secs(2);
    let sidecar = SidecarBuilder::new(cfg, transport.clone())
        .reporter(Some(gw.reporter()))
        .build()
        .spawn(stop.clone());
    // x-sink records results; no x-sump end actor, so failures wait in x-sump for replay.
    let mut sink = SidecarConfig::new("x-sink", &ns, std::env::temp_dir());
    sink.is_end_actor = true;
    sink.transport = asya_host::transport::TransportKind::Nats;
    let sink = SidecarBuilder::new(sink, transport.clone())
        .reporter(Some(gw.reporter()))
        .build()
        .spawn(stop.clone());

    let route = || Some(vec!["fragile".to_owned()]);
    let mut ids = Vec::new();
    for i in 0..20 {
        let sub = gw
            .submit(SubmitRequest {
                route: route(),
                payload: json!({"i": i}),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(sub.id);
    }
    let stubborn = gw
        .submit(SubmitRequest {
            route: route(),
            payload: json!({"always": true}),
            ..Default::default()
        })
        .await
        .unwrap();
    let t = &*transport;
    assert!(
        eventually_async(WAIT, || async { depth(t, &ns, "x-sump").await == 21 }).await,
        "the failures never reached x-sump: depth {}",
        depth(t, &ns, "x-sump").await
    );

    // Fix the handler: restart its runtime with the flag.
    drop(runtime);
    runtime = fragile_runtime(dir.path(), true);

    let mut opts = ReplayOptions::new(&ns);
    opts.idle = Duration::from_secs(1);
    // A dry run shows all 21 and changes nothing.
    opts.dry_run = true;
    let mut lines = Vec::new();
    let s = replay(t, &opts, |l| lines.push(l.to_string()))
        .await
        .unwrap();
    assert_eq!(s.replayed, 21, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.starts_with("would replay")),
        "{lines:?}"
    );
    assert!(eventually_async(WAIT, || async { depth(t, &ns, "x-sump").await == 21 }).await);
    opts.dry_run = false;
    // The dry run handed everything back 3 s after it ended.
    opts.idle = Duration::from_secs(4);
    let s = replay(t, &opts, |_| {}).await.unwrap();
    assert_eq!(s.replayed, 21, "{s:?}");
    for id in &ids {
        let v = gw.wait_final(id, WAIT).await.unwrap();
        assert_eq!(v.status, TaskStatus::Succeeded, "{v:?}");
        assert_eq!(v.result.as_ref().unwrap()["fixed"], true);
    }
    // The stubborn one fails again: replays 2 and 3, then it stays. (A run sees it once it
    // is back in x-sump; one handed back right after a run can wait for NATS' ack_wait.)
    for n in 2..=4u32 {
        let deadline = tokio::time::Instant::now() + WAIT;
        let (s, lines) = loop {
            let mut lines = Vec::new();
            let s = replay(t, &opts, |l| lines.push(l.to_string()))
                .await
                .unwrap();
            if s != ReplaySummary::default() || tokio::time::Instant::now() > deadline {
                break (s, lines);
            }
        };
        if n <= opts.max_replays {
            // (Back within this run after its last allowed replay: already stopped.)
            assert_eq!(s.replayed, 1, "replay {n}: {lines:?}");
            assert!(s.stopped <= usize::from(n == opts.max_replays), "{lines:?}");
            assert!(lines[0].contains(&format!("replay {n})")), "{lines:?}");
        } else {
            assert_eq!((s.replayed, s.stopped), (0, 1), "replay {n}: {lines:?}");
            assert!(lines[0].contains("replayed 3 times"), "{lines:?}");
        }
    }
    assert!(eventually_async(WAIT, || async { depth(t, &ns, "x-sump").await == 1 }).await);
    let v = gw.get(&stubborn.id).await.unwrap();
    assert_ne!(v.status, TaskStatus::Succeeded, "{v:?}");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), sidecar).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), sink).await;
    drop(runtime);
}

/// A gateway on the KV bucket `bucket`, parking paused frames, served over HTTP at `addr`
/// (a free port when `None`); stopped with the returned token.
async fn kv_gateway(
    nats: &NatsTransport,
    transport: &Arc<dyn Transport>,
    ns: &str,
    bucket: &str,
    addr: Option<std::net::SocketAddr>,
) -> (Arc<Gateway>, String, CancellationToken) {
    let client = nats.client().clone();
    let store: Arc<dyn TaskStore> = Arc::new(KvStore::open(client, bucket).await.unwrap());
    let gw = Gateway::new(
        store,
        transport.clone(),
        ns.to_owned(),
        Default::default(),
        "x-sink".into(),
        "x-sump".into(),
    );
    let stop = CancellationToken::new();
    gw.spawn_parking(stop.clone());
    let listener = tokio::net::TcpListener::bind(addr.unwrap_or(([127, 0, 0, 1], 0).into()))
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(gateway::serve(listener, gw.clone(), None, stop.clone()));
    (gw, url, stop)
}

async fn resume(url: &str, id: &str, input: Value) -> (StatusCode, Value) {
    let ep = Endpoint::parse(url).unwrap();
    let body = Bytes::from(json!({ "input": input }).to_string());
    let (s, b) = call(
        &ep,
        Method::POST,
        &format!("/tasks/{id}/resume"),
        None,
        Some(body),
        WAIT,
    )
    .await
    .unwrap();
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// Acceptance (issue #19, pause/resume over NATS): a handler pauses the task (the stock
/// runtime's pause marker) → `paused` within one hop with its metadata; the gateway and every
/// sidecar restart; resume → `succeeded` with the merged fields (the task's 5 s deadline
/// passed while paused: the SLA clock was frozen); a second resume is 409; a pause past its
/// own timeout → `failed/Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_survives_restarts_and_resume_merges_the_input_over_nats() {
    let ns = format!("ctlp{}", std::process::id());
    let names = vec!["ask".to_owned(), "finish".to_owned()];
    let (_server, _cfg, nats) = nats(&ns, &names).await;
    let transport: Arc<dyn Transport> = nats.clone();
    let bucket = format!("{ns}-tasks");
    let actors = [("ask", "gw_handlers.ask"), ("finish", "gw_handlers.finish")];
    let nats_kind = |c: &mut SidecarConfig| c.transport = asya_host::transport::TransportKind::Nats;

    let (gw1, url1, stop1) = kv_gateway(&nats, &transport, &ns, &bucket, None).await;
    let mesh = Mesh::start(transport.clone(), &ns, &actors, gw1.reporter(), nats_kind);
    let sub = gw1
        .submit(SubmitRequest {
            route: Some(names.clone()),
            payload: json!({"order": 7}),
            timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        })
        .await
        .unwrap();
    let parked = eventually_async(WAIT, || async {
        gw1.get_task(&sub.id)
            .await
            .is_some_and(|t| t.status == TaskStatus::Paused && t.parked.is_some())
    })
    .await;
    assert!(
        parked,
        "never paused and parked: {:?}",
        gw1.get(&sub.id).await
    );
    // The hop's report (from the sidecar, after it settles) and the parked frame (through
    // the x-pause queue) reach the gateway by different paths, in either order.
    let counted = eventually_async(WAIT, || async {
        gw1.get(&sub.id)
            .await
            .is_some_and(|v| v.actors_completed == 1)
    })
    .await;
    let v = gw1.get(&sub.id).await.unwrap();
    assert!(counted, "paused after one hop: {v:?}");
    assert_eq!(v.status, TaskStatus::Paused, "{v:?}");
    assert_eq!(
        v.pause_metadata,
        Some(json!({"prompt": "approve?", "fields": ["approved"]}))
    );
    // Not resumable before it is paused, nor with a non-object input.
    let other = gw1
        .submit(SubmitRequest {
            route: Some(vec!["finish".into()]),
            payload: json!({}),
            ..Default::default()
        })
        .await
        .unwrap();
    let (s, _) = resume(&url1, &sub.id, json!(5)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let v = gw1.wait_final(&other.id, WAIT).await.unwrap();
    assert_eq!(v.status, TaskStatus::Succeeded);
    let (s, body) = resume(&url1, &other.id, json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");

    // Restart the gateway and every sidecar.
    let addr: std::net::SocketAddr = url1.trim_start_matches("http://").parse().unwrap();
    stop1.cancel();
    mesh.stop().await;
    drop(gw1);
    let (gw2, url2, stop2) = kv_gateway(&nats, &transport, &ns, &bucket, Some(addr)).await;
    assert_eq!(url2, url1);
    let mesh = Mesh::start(transport.clone(), &ns, &actors, gw2.reporter(), nats_kind);
    let v = gw2.get(&sub.id).await.unwrap();
    assert_eq!(v.status, TaskStatus::Paused, "{v:?}");
    // Paused past the task's 5 s deadline: frozen, so the task still succeeds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(gw2.get(&sub.id).await.unwrap().status, TaskStatus::Paused);

    let (s, body) = resume(&url2, &sub.id, json!({"approved": true, "order": 8})).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "running");
    let v = gw2.wait_final(&sub.id, WAIT).await.unwrap();
    assert_eq!(v.status, TaskStatus::Succeeded, "{v:?}");
    assert_eq!(
        v.result,
        Some(json!({"order": 8, "asked": true, "approved": true, "done": true}))
    );
    let (s, body) = resume(&url2, &sub.id, json!({"approved": false})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "conflict");

    // A pause past its own timeout fails the task.
    let timed = gw2
        .submit(SubmitRequest {
            route: Some(names.clone()),
            payload: json!({"pause_timeout": 1}),
            ..Default::default()
        })
        .await
        .unwrap();
    let failed = eventually_async(WAIT, || async {
        gw2.get(&timed.id)
            .await
            .is_some_and(|v| v.status == TaskStatus::Failed)
    })
    .await;
    let v = gw2.get(&timed.id).await.unwrap();
    assert!(failed, "{v:?}");
    assert_eq!(v.error.unwrap().kind, "Timeout");
    let (s, _) = resume(&url2, &timed.id, json!({"approved": true})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    stop2.cancel();
    mesh.stop().await;
}

/// One bad message costs one message, on the pause queue too: bytes that are not an
/// envelope and a paused frame of a task the gateway does not know go to x-sump, each with a
/// reason that says what is wrong, and leave x-pause (they were acked, not dropped silently
/// or redelivered for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparkable_pause_messages_go_to_sump_with_their_reason() {
    let ns = format!("ctlu{}", std::process::id());
    let (_server, _cfg, nats) = nats(&ns, &["a".to_owned()]).await;
    let transport: Arc<dyn Transport> = nats.clone();
    let mut sump = transport
        .subscribe(&QueueName::new(&ns, "x-sump").unwrap(), 1)
        .await
        .unwrap();
    let (_gw, _url, stop) = kv_gateway(&nats, &transport, &ns, &format!("{ns}-tasks"), None).await;
    let pause = QueueName::new(&ns, "x-pause").unwrap();
    let ghost = json!({
        "id": "ghost-1",
        "route": {"prev": ["a"], "curr": "b", "next": []},
        "headers": {"x-asya-pause": {"prompt": "approve?"}},
        "payload": {"k": 1},
    });
    for (id, body) in [
        ("junk", Bytes::from_static(b"{not json")),
        ("ghost", Bytes::from(ghost.to_string())),
    ] {
        transport
            .send(asya_host::transport::OutMessage {
                queue: pause.clone(),
                id: id.into(),
                body,
            })
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(WAIT, sump.recv())
            .await
            .expect("an x-sump message within the wait")
            .unwrap();
        seen.push(serde_json::from_slice::<Value>(&d.body).unwrap());
        d.acker.ack().await.unwrap();
    }
    seen.sort_by_key(|v| v["status"]["reason"].to_string());
    let (junk, ghost_out) = (&seen[0], &seen[1]);
    assert_eq!(junk["status"]["phase"], "failed", "{junk}");
    assert_eq!(junk["status"]["reason"], "ParseError", "{junk}");
    assert_eq!(junk["status"]["actor"], "x-pause", "{junk}");
    assert_eq!(junk["payload"]["error"], "parse_error", "{junk}");
    assert_eq!(junk["payload"]["original_payload"], "{not json", "{junk}");
    assert!(
        junk["status"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not an envelope"),
        "{junk}"
    );
    assert_eq!(ghost_out["id"], "ghost-1", "{ghost_out}");
    assert_eq!(
        ghost_out["status"]["reason"], "ValidationError",
        "{ghost_out}"
    );
    assert_eq!(
        ghost_out["payload"]["error"], "validation_error",
        "{ghost_out}"
    );
    assert_eq!(
        ghost_out["status"]["error"]["type"], "UnknownTask",
        "{ghost_out}"
    );
    assert_eq!(
        ghost_out["payload"]["original_payload"],
        json!({"k": 1}),
        "{ghost_out}"
    );
    assert_eq!(
        ghost_out["headers"]["x-asya-pause"],
        json!({"prompt": "approve?"})
    );
    assert!(
        eventually_async(WAIT, || async {
            depth(&*transport, &ns, "x-pause").await == 0
        })
        .await,
        "x-pause still holds messages"
    );
    stop.cancel();
}
