//! The task control plane of issue #19 end to end: a cancel that reaches the actors (real
//! nats-server, stock Python runtimes, in-process sidecars and gateway).

use std::sync::Arc;
use std::time::Duration;

use asya_host::cancel::{self, Canceled};
use asya_host::gateway::{Gateway, MemoryStore, SubmitRequest, TaskStatus};
use asya_host::queue::EndActors;
use asya_host::sidecar::Reporter;
use asya_host::transport::nats::{provision, NatsConfig, NatsTransport};
use asya_host::transport::Transport;
use asya_test_support::{eventually, eventually_async, NatsServer};
use asya_tests::mesh::Mesh;
use serde_json::json;
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
