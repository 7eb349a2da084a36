//! The sidecar loop (SPEC §5 steps 1–7) and every row of the runtime response table (SPEC §3),
//! with a real runtime process on a real Unix socket and the memory transport.

use std::time::Duration;

use asya_host::sidecar::Exit;
use asya_test_support::{eventually, metric_value, FixtureRuntime};
use asya_tests::{Harness, NS};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

fn status(v: &Value) -> &Value {
    &v["status"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_routes_to_the_next_actor_and_the_end_of_route_to_sink() {
    let mut h = Harness::start(|_| {});
    let mut b = h.consumer("b").await;
    let mut sink = h.consumer("x-sink").await;
    h.send("e1", &["b"], json!({"op": "echo", "k": "ü"})).await;
    let out = b.next().await;
    assert_eq!(out["id"], "e1");
    assert_eq!(
        out["route"],
        json!({"prev": ["a"], "curr": "b", "next": []})
    );
    assert_eq!(out["payload"], json!({"op": "echo", "k": "ü"}));
    assert_eq!(out["headers"]["trace_id"], "trace-e1");

    h.send("e2", &[], json!({"op": "echo"})).await;
    let done = sink.next().await;
    assert_eq!(done["id"], "e2");
    assert_eq!(status(&done)["phase"], "succeeded");
    assert_eq!(status(&done)["reason"], "Completed");
    assert_eq!(status(&done)["actor"], "a");
    assert_eq!(h.stop().await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_and_deadline_are_carried_across_the_hop() {
    let mut h = Harness::start(|_| {});
    let mut b = h.consumer("b").await;
    let env = json!({
        "id": "e1", "route": {"prev": [], "curr": "a", "next": ["b"]},
        "payload": {"op": "echo"}, "custom": {"keep": [1, 2]},
        "status": {"deadline_at": "2099-01-01T00:00:00Z", "created_at": "2020-01-01T00:00:00Z"},
    });
    h.send_raw(serde_json::to_vec(&env).unwrap()).await;
    let out = b.next().await;
    assert_eq!(out["custom"], json!({"keep": [1, 2]}));
    assert_eq!(out["status"]["deadline_at"], "2099-01-01T00:00:00Z");
    assert_eq!(out["status"]["created_at"], "2020-01-01T00:00:00Z");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_goes_to_sump_with_the_raw_body() {
    let mut h = Harness::start(|_| {});
    let mut sump = h.consumer("x-sump").await;
    h.send_raw(&b"{not json at all"[..]).await;
    let out = sump.next().await;
    assert_eq!(out["payload"]["original_payload"], "{not json at all");
    assert_eq!(out["payload"]["error"], "parse_error");
    assert_eq!(status(&out)["phase"], "failed");
    assert_eq!(status(&out)["reason"], "ParseError");
    assert_eq!(status(&out)["error"]["type"], "ParseError");
    assert!(h.runtime.invocations().is_empty());
    let text = h.scrape().await;
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_failed_total",
            &[("queue", "asya-t-a"), ("reason", "parse_error")]
        ),
        Some(1.0)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_id_goes_to_sump_as_validation_error() {
    let mut h = Harness::start(|_| {});
    let mut sump = h.consumer("x-sump").await;
    h.send_raw(
        &br#"{"route":{"prev":[],"curr":"a","next":[]},"headers":{"trace_id":"t-9"},"payload":1}"#
            [..],
    )
    .await;
    let out = sump.next().await;
    assert_eq!(status(&out)["reason"], "ValidationError");
    assert_eq!(out["headers"]["trace_id"], "t-9");
    assert!(status(&out)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("id"));
    assert!(h.runtime.invocations().is_empty());
    assert_eq!(
        metric_value(
            &h.scrape().await,
            "asya_actor_messages_failed_total",
            &[("reason", "validation_error")]
        ),
        Some(1.0)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_mismatch_goes_to_sump_without_invoking() {
    let mut h = Harness::start(|_| {});
    let mut sump = h.consumer("x-sump").await;
    let env =
        json!({"id": "e1", "route": {"prev": [], "curr": "other", "next": []}, "payload": {}});
    h.send_raw(serde_json::to_vec(&env).unwrap()).await;
    let out = sump.next().await;
    assert_eq!(out["id"], "e1");
    assert_eq!(status(&out)["reason"], "RouteMismatch");
    assert!(h.runtime.invocations().is_empty());
    assert_eq!(
        metric_value(
            &h.scrape().await,
            "asya_actor_messages_failed_total",
            &[("reason", "route_mismatch")]
        ),
        Some(1.0)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadline_goes_to_sink_as_failed_timeout_without_invoking() {
    let mut h = Harness::start(|_| {});
    let mut sink = h.consumer("x-sink").await;
    let env = json!({"id": "e1", "route": {"prev": [], "curr": "a", "next": ["b"]},
        "payload": {"op": "echo", "x": 1}, "status": {"deadline_at": "2001-01-01T00:00:00Z"}});
    h.send_raw(serde_json::to_vec(&env).unwrap()).await;
    let out = sink.next().await;
    assert_eq!(status(&out)["phase"], "failed");
    assert_eq!(status(&out)["reason"], "Timeout");
    assert_eq!(status(&out)["deadline_at"], "2001-01-01T00:00:00Z");
    assert_eq!(out["payload"], json!({"op": "echo", "x": 1}));
    assert!(h.runtime.invocations().is_empty());
    assert_eq!(
        metric_value(
            &h.scrape().await,
            "asya_actor_messages_failed_total",
            &[("reason", "sla_expired")]
        ),
        Some(1.0)
    );
    h.stop().await;
}

/// An envelope whose deadline (1 s away) cuts its handler (3 s) and is shorter than the actor
/// timeout (30 s). Built once the sidecar consumes ([`Harness::ready`]): the deadline's clock
/// must not run while the runtime starts (a loaded machine took longer than 300 ms).
fn slow_envelope_with_a_near_deadline() -> Vec<u8> {
    let deadline = (chrono::Utc::now() + chrono::Duration::seconds(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let env = json!({"id": "slow", "route": {"prev": [], "curr": "a", "next": ["b"]},
        "payload": {"op": "sleep", "s": 3}, "status": {"deadline_at": deadline}});
    serde_json::to_vec(&env).unwrap()
}

/// The deadline cuts a running call: the runtime is still busy with it, so this is a
/// runtime timeout (docs/SPEC.md §5): x-sump naming the deadline, acked, exit 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_cutting_a_running_call_sumps_acks_and_crashes() {
    let mut h = Harness::start(|c| c.resiliency.actor_timeout = Duration::from_secs(30));
    let mut sump = h.consumer("x-sump").await;
    h.ready().await;
    h.send_raw(slow_envelope_with_a_near_deadline()).await;
    let out = sump.next().await;
    assert_eq!(status(&out)["reason"], "Timeout");
    assert_eq!(status(&out)["phase"], "failed");
    let msg = status(&out)["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("deadline"), "{msg}");
    assert_eq!(h.join().await, Exit::RuntimeTimeout);
    assert_eq!(h.transport.depth(h.cfg.queue().unwrap()), 0, "acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_cutting_a_running_call_without_crash_on_timeout_keeps_serving() {
    let mut h = Harness::start(|c| {
        c.resiliency.actor_timeout = Duration::from_secs(30);
        c.resiliency.crash_on_timeout = false;
    });
    let mut sump = h.consumer("x-sump").await;
    let mut b = h.consumer("b").await;
    h.ready().await;
    h.send_raw(slow_envelope_with_a_near_deadline()).await;
    let out = sump.next().await;
    assert_eq!(status(&out)["reason"], "Timeout");
    assert_eq!(
        out["payload"]["original_payload"],
        json!({"op": "sleep", "s": 3})
    );
    h.send("next", &["b"], json!({"op": "echo"})).await;
    assert_eq!(b.next().await["id"], "next");
    assert_eq!(h.stop().await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_error_is_retried_then_sumped_with_the_error() {
    let mut h = Harness::start(|c| c.resiliency.max_attempts = 3);
    let mut sump = h.consumer("x-sump").await;
    h.send("e1", &["b"], json!({"op": "error"})).await;
    let out = sump.next().await;
    assert_eq!(h.runtime.invocations(), vec!["e1", "e1", "e1"]);
    let st = status(&out);
    assert_eq!(st["phase"], "failed");
    assert_eq!(st["reason"], "MaxRetriesExhausted");
    assert_eq!(st["attempt"], 3);
    assert_eq!(st["max_attempts"], 3);
    assert_eq!(st["error"]["type"], "ValueError");
    assert_eq!(st["error"]["message"], "boom 3");
    assert!(st["error"]["traceback"]
        .as_str()
        .unwrap()
        .contains("Traceback"));
    assert_eq!(st["error"]["mro"][0], "ValueError");
    assert_eq!(
        out["payload"]["original_payload"],
        json!({"op": "error"}),
        "original payload kept"
    );
    assert_eq!(out["payload"]["error"], "processing_error");
    assert_eq!(out["payload"]["details"], st["error"]);
    let text = h.scrape().await;
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_sent_total",
            &[("destination_queue", "asya-t-a"), ("message_type", "retry")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_sent_total",
            &[
                ("destination_queue", "asya-t-x-sump"),
                ("message_type", "sump")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_failed_total",
            &[("reason", "runtime_error")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_processed_total",
            &[("status", "retry")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_processed_total",
            &[("status", "error")]
        ),
        Some(1.0)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_succeeds_on_retry() {
    let mut h = Harness::start(|c| c.resiliency.max_attempts = 3);
    let mut b = h.consumer("b").await;
    h.send("e1", &["b"], json!({"op": "fail_times", "n": 1}))
        .await;
    assert_eq!(b.next().await["id"], "e1");
    assert_eq!(h.runtime.invocations(), vec!["e1", "e1"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_error_types_go_straight_to_sump() {
    let mut h = Harness::start(|c| {
        c.resiliency.max_attempts = 5;
        c.resiliency.non_retryable = vec!["ValueError".into()];
    });
    let mut sump = h.consumer("x-sump").await;
    h.send("e1", &[], json!({"op": "error"})).await;
    let out = sump.next().await;
    assert_eq!(status(&out)["reason"], "NonRetryableFailure");
    assert_eq!(h.runtime.invocations().len(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_204_sends_the_input_to_sink_as_succeeded() {
    let mut h = Harness::start(|_| {});
    let mut sink = h.consumer("x-sink").await;
    h.send("e1", &["b", "c"], json!({"op": "abort", "v": 7}))
        .await;
    let out = sink.next().await;
    assert_eq!(out["id"], "e1");
    assert_eq!(out["payload"], json!({"op": "abort", "v": 7}));
    assert_eq!(status(&out)["phase"], "succeeded");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_400_goes_to_sump() {
    let mut h = Harness::start(|c| c.resiliency.max_attempts = 3);
    let mut sump = h.consumer("x-sump").await;
    h.send("e1", &["b"], json!({"op": "bad"})).await;
    let out = sump.next().await;
    assert_eq!(status(&out)["reason"], "ParseError");
    assert_eq!(status(&out)["error"]["message"], "route.curr missing");
    assert_eq!(h.runtime.invocations().len(), 1, "a 400 is not retried");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_of_three_keeps_the_id_on_the_first_and_gives_children_fresh_ids() {
    let mut h = Harness::start(|_| {});
    let mut b = h.consumer("b").await;
    h.send("e1", &["b"], json!({"op": "fanout", "n": 3})).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let out = b.next().await;
        if i == 0 {
            assert_eq!(out["id"], "e1");
            assert!(out.get("parent_id").is_none(), "{out}");
            continue;
        }
        assert_eq!(out["parent_id"], "e1");
        assert_eq!(out["payload"], json!({"i": i}));
        assert_eq!(out["headers"]["trace_id"], "trace-e1");
        ids.push(out["id"].as_str().unwrap().to_owned());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2);
    assert!(!ids.contains(&"e1".to_string()));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_frames_are_routed_as_they_arrive() {
    let mut h = Harness::start(|_| {});
    let mut b = h.consumer("b").await;
    h.send("e1", &["b"], json!({"op": "sse", "n": 3})).await;
    for i in 0..3 {
        let out = b.next().await;
        assert_eq!(out["payload"], json!({"i": i}));
        if i == 0 {
            assert_eq!(out["id"], "e1", "the first streamed frame keeps the id");
            assert!(out.get("parent_id").is_none(), "{out}");
        } else {
            assert_eq!(out["parent_id"], "e1");
        }
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_error_after_two_frames_routes_two_and_sumps_once_even_with_retries() {
    let mut h = Harness::start(|c| c.resiliency.max_attempts = 2);
    let mut b = h.consumer("b").await;
    let mut sump = h.consumer("x-sump").await;
    h.send("e1", &["b"], json!({"op": "sse_error", "n": 2}))
        .await;
    let out = sump.next().await;
    assert_eq!(status(&out)["error"]["message"], "stream broke");
    assert_eq!(status(&out)["error"]["type"], "RuntimeError");
    assert_eq!(h.runtime.invocations().len(), 2, "retried once");
    // The retry re-sent the same two frames; their deterministic ids deduplicated them.
    assert!(b.next_within(WAIT).await.is_some());
    assert!(b.next_within(WAIT).await.is_some());
    assert!(b.next_within(Duration::from_millis(300)).await.is_none());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_runtime_times_out_sumps_acks_and_crashes_without_redelivery() {
    let mut h = Harness::start(|c| c.resiliency.actor_timeout = Duration::from_millis(300));
    let mut sump = h.consumer("x-sump").await;
    h.send("e1", &["b"], json!({"op": "hang"})).await;
    let out = sump.next().await;
    assert_eq!(status(&out)["reason"], "Timeout");
    assert_eq!(h.join().await, Exit::RuntimeTimeout);
    // Acked: nothing waits in the queue for redelivery.
    assert_eq!(h.transport.depth(h.cfg.queue().unwrap()), 0);
    assert_eq!(
        metric_value(
            &h.scrape().await,
            "asya_actor_messages_failed_total",
            &[("reason", "timeout")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_runtime_without_crash_on_timeout_sumps_and_keeps_serving() {
    let mut h = Harness::start(|c| {
        c.resiliency.actor_timeout = Duration::from_millis(300);
        c.resiliency.crash_on_timeout = false;
    });
    let mut sump = h.consumer("x-sump").await;
    let mut b = h.consumer("b").await;
    h.send("e1", &["b"], json!({"op": "hang"})).await;
    assert_eq!(status(&sump.next().await)["error"]["type"], "Timeout");
    h.send("e2", &["b"], json!({"op": "echo"})).await;
    assert_eq!(b.next().await["id"], "e2");
    assert_eq!(h.stop().await, Exit::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_closing_mid_response_is_an_error_not_a_panic() {
    let mut h = Harness::start(|_| {});
    let mut sump = h.consumer("x-sump").await;
    let mut b = h.consumer("b").await;
    h.send("e1", &["b"], json!({"op": "close_mid"})).await;
    let out = sump.next().await;
    assert_eq!(status(&out)["reason"], "RuntimeError");
    let kind = status(&out)["error"]["type"].as_str().unwrap().to_owned();
    assert!(
        kind == "MalformedResponse" || kind == "ConnectionError",
        "{kind}"
    );
    h.send("e2", &["b"], json!({"op": "echo"})).await;
    assert_eq!(b.next().await["id"], "e2");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_request_id_is_rejected_and_counted() {
    let mut h = Harness::start(|_| {});
    let mut sump = h.consumer("x-sump").await;
    let mut b = h.consumer("b").await;
    h.send("e1", &["b"], json!({"op": "wrong_id"})).await;
    let out = sump.next().await;
    assert_eq!(status(&out)["error"]["type"], "RequestIdMismatch");
    assert_eq!(
        metric_value(
            &h.scrape().await,
            "asya_actor_runtime_request_id_mismatch_total",
            &[("queue", "asya-t-a")]
        ),
        Some(1.0)
    );
    h.send("e2", &["b"], json!({"op": "echo"})).await;
    assert_eq!(b.next().await["id"], "e2");
    assert!(
        b.next_within(Duration::from_millis(200)).await.is_none(),
        "the stale answer was not routed"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_close_delimited_response_is_accepted() {
    let mut h = Harness::start(|_| {});
    let mut b = h.consumer("b").await;
    for i in 0..3 {
        h.send(&format!("e{i}"), &["b"], json!({"op": "http10"}))
            .await;
        assert_eq!(b.next().await["id"], format!("e{i}"));
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_200_bodies_and_history_rewrites_go_to_sump() {
    let mut h = Harness::start(|_| {});
    let mut sump = h.consumer("x-sump").await;
    h.send("garbage", &["b"], json!({"op": "garbage"})).await;
    let out = sump.next().await;
    assert_eq!(out["id"], "garbage");
    assert_eq!(status(&out)["error"]["type"], "MalformedResponse");
    h.send("rewrite", &["b"], json!({"op": "rewrite_prev"}))
        .await;
    let out = sump.next().await;
    assert_eq!(out["id"], "rewrite");
    assert_eq!(status(&out)["reason"], "RouteMismatch");
    assert_eq!(out["route"]["curr"], "a", "the input envelope is kept");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_may_replace_next() {
    let mut h = Harness::start(|_| {});
    let mut c = h.consumer("c").await;
    h.send("e1", &["b"], json!({"op": "route", "next": ["c", "d"]}))
        .await;
    let out = c.next().await;
    assert_eq!(
        out["route"],
        json!({"prev": ["a"], "curr": "c", "next": ["d"]})
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_keeps_several_envelopes_in_flight() {
    let mut h = Harness::start(|c| c.concurrency = 4);
    let mut b = h.consumer("b").await;
    for i in 0..4 {
        h.send(&format!("e{i}"), &["b"], json!({"op": "sleep", "s": 1.0}))
            .await;
    }
    let inflight = h.deps.inflight.clone();
    assert!(
        eventually(WAIT, || inflight.len() == 4).await,
        "four envelopes in flight at once"
    );
    let rows = inflight.snapshot();
    assert!(rows
        .iter()
        .all(|r| r.envelope_id.starts_with('e') && r.trace_id.starts_with("trace-e")));
    for _ in 0..4 {
        b.next().await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_work_and_acks_it() {
    let mut h = Harness::start(|_| {});
    let mut b = h.consumer("b").await;
    h.send("slow", &["b"], json!({"op": "sleep", "s": 0.5}))
        .await;
    let inflight = h.deps.inflight.clone();
    assert!(eventually(WAIT, || inflight.len() == 1).await);
    assert_eq!(h.stop().await, Exit::Shutdown);
    assert_eq!(b.next().await["id"], "slow");
    assert_eq!(
        h.transport.depth(h.cfg.queue().unwrap()),
        0,
        "acked, not requeued"
    );
    assert!(
        metric_value(
            &h.scrape().await,
            "asya_actor_messages_sent_total",
            &[("message_type", "sump")]
        )
        .is_none(),
        "nothing dead-lettered by a shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_events_do_not_become_frames() {
    let mut h = Harness::start(|_| {});
    let mut b = h.consumer("b").await;
    h.send("e1", &["b"], json!({"op": "upstream"})).await;
    let out = b.next().await;
    assert_eq!(out["id"], "e1", "a single streamed frame keeps the id");
    assert!(out.get("parent_id").is_none(), "{out}");
    assert!(b.next_within(Duration::from_millis(200)).await.is_none());
    h.stop().await;
}

/// GET over a fresh TCP connection; returns (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_server_serves_metrics_readiness_and_inflight() {
    use asya_host::admin::{serve, AdminState};
    use std::sync::Arc;
    let mut h = Harness::start(|c| {
        c.resiliency.crash_on_timeout = false;
        c.resiliency.actor_timeout = Duration::from_secs(1);
        c.concurrency = 2;
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let readiness = h.deps.readiness.clone();
    let state = AdminState {
        metrics: h.metrics.clone(),
        inflight: h.deps.inflight.clone(),
        checks: vec![("runtime:a".into(), Arc::new(move || readiness.is_ready()))],
        live: Vec::new(),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(serve(listener, state, stop.clone()));

    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let mut ready = false;
    for _ in 0..500 {
        if http_get(addr, "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "/readyz turns 200 once the runtime is reachable");
    assert_eq!(http_get(addr, "/nope").await.0, 404);

    let mut b = h.consumer("b").await;
    let mut sump = h.consumer("x-sump").await;
    h.send_raw(&b"garbage"[..]).await;
    sump.next().await;
    h.send("e1", &["b"], json!({"op": "echo"})).await;
    b.next().await;
    h.send("wedged", &["b"], json!({"op": "hang"})).await;
    let inflight = h.deps.inflight.clone();
    assert!(
        eventually(WAIT, || inflight
            .snapshot()
            .iter()
            .any(|r| r.envelope_id == "wedged"))
        .await
    );
    let (code, body) = http_get(addr, "/debug/inflight").await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let row = &v["inflight"][0];
    assert_eq!(row["envelope_id"], "wedged");
    assert_eq!(row["trace_id"], "trace-wedged");
    assert_eq!(row["stage"], "invoking");
    assert_eq!(row["actor"], "a");
    assert!(row["age_ms"].is_u64());
    sump.next().await; // the hang times out
    assert!(eventually(WAIT, || inflight.is_empty()).await);

    let (code, text) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let q = ("queue", "asya-t-a");
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_received_total",
            &[q, ("transport", "memory")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_failed_total",
            &[q, ("reason", "parse_error")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_failed_total",
            &[q, ("reason", "timeout")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_processed_total",
            &[q, ("status", "success")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_processed_total",
            &[q, ("status", "error")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_sent_total",
            &[
                ("destination_queue", "asya-t-b"),
                ("message_type", "routing")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_messages_sent_total",
            &[
                ("destination_queue", "asya-t-x-sump"),
                ("message_type", "sump")
            ]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&text, "asya_actor_processing_duration_seconds_count", &[q]),
        Some(3.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_runtime_execution_duration_seconds_count",
            &[q]
        ),
        Some(2.0)
    );
    assert!(metric_value(
        &text,
        "asya_actor_queue_receive_duration_seconds_count",
        &[q, ("transport", "memory")]
    )
    .is_some());
    assert!(metric_value(
        &text,
        "asya_actor_queue_send_duration_seconds_count",
        &[("destination_queue", "asya-t-b"), ("transport", "memory")]
    )
    .is_some());
    assert_eq!(
        metric_value(
            &text,
            "asya_actor_message_size_bytes_count",
            &[("direction", "received")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(&text, "asya_actor_active_messages", &[q]),
        Some(0.0)
    );
    stop.cancel();
    h.stop().await;
}

/// Each hop's span is the parent in the `traceparent` it sends on: same trace id and flags,
/// a new span id per hop (the runtime echoes the header it received; the host replaces it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hop_sends_its_own_span_as_the_traceparent_parent() {
    let mut h = Harness::start(|_| {});
    // A second actor `b` on the same transport, with its own runtime.
    let rt_b = FixtureRuntime::start();
    let mut cfg_b = asya_host::config::SidecarConfig::new("b", NS, rt_b.dir.path());
    cfg_b.ready_timeout = Duration::from_secs(20);
    let stop_b = tokio_util::sync::CancellationToken::new();
    let task_b = asya_host::SidecarBuilder::new(cfg_b, std::sync::Arc::new(h.transport.clone()))
        .build()
        .spawn(stop_b.clone());
    let mut c = h.consumer("c").await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let root = format!("00-{trace}-00f067aa0ba902b7-01");
    let send = |id: &str, next: &[&str]| {
        serde_json::to_vec(&json!({
            "id": id,
            "route": {"prev": [], "curr": "a", "next": next},
            "headers": {"trace_id": trace, "traceparent": root},
            "payload": {"op": "echo"},
        }))
        .unwrap()
    };
    let span_of = |v: &Value| -> String {
        let tp = v["headers"]["traceparent"].as_str().expect("traceparent");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!((parts[0], parts[1], parts[3]), ("00", trace, "01"), "{tp}");
        assert_eq!(parts[2].len(), 16);
        assert_ne!(parts[2], "0000000000000000");
        parts[2].to_owned()
    };

    // One hop (a -> c) and two hops (a -> b -> c).
    h.send_raw(send("one", &["c"])).await;
    let one = c.next().await;
    assert_eq!(one["id"], "one");
    let hop_a = span_of(&one);
    h.send_raw(send("two", &["b", "c"])).await;
    let two = c.next().await;
    assert_eq!(two["id"], "two");
    assert_eq!(two["route"]["prev"], json!(["a", "b"]));
    let hop_b = span_of(&two);
    assert_ne!(hop_a, "00f067aa0ba902b7", "hop a's span replaces the root");
    assert_ne!(hop_b, "00f067aa0ba902b7", "two hops later, not the root");
    assert_ne!(hop_a, hop_b, "every hop has its own span");

    stop_b.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), task_b).await;
    assert_eq!(h.stop().await, Exit::Shutdown);
}
