//! The decisions of one delivery, without a runtime, a broker or a clock.

use std::time::Duration;

use chrono::TimeZone;

use super::*;
use crate::envelope::{unparseable_envelope, unparseable_envelope_id, Route, Status};

fn rules() -> Rules {
    let mut cfg = SidecarConfig::new("a", "ns", "/nonexistent");
    cfg.resiliency.max_attempts = 3;
    cfg.resiliency.backoff_initial = Duration::from_secs(1);
    cfg.resiliency.backoff_multiplier = 2.0;
    cfg.resiliency.actor_timeout = Duration::from_secs(10);
    cfg.resiliency.crash_on_timeout = false;
    Rules::new(&cfg).unwrap()
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap()
}

fn env(text: &str) -> Envelope {
    Envelope::parse(text.as_bytes()).unwrap()
}

/// An input for actor `a` with one actor (`b`) after it.
fn input() -> Envelope {
    env(
        r#"{"id":"e1","route":{"prev":["p"],"curr":"a","next":["b"]},"headers":{"trace_id":"t1"},"payload":{"k":1},"x":"kept"}"#,
    )
}

/// The digest of the (pretend) input message bytes.
fn digest() -> Digest {
    Digest::of(b"the input message")
}

/// Message id `e1:<digest>:<rest>` of the test input.
fn mid(rest: &str) -> String {
    format!("e1:{}:{rest}", digest())
}

fn hop<'a>(rules: &'a Rules, input: &'a Envelope, attempt: u32) -> Hop<'a> {
    Hop {
        rules,
        input,
        hop: input.route.prev.len(),
        attempt,
        digest: digest(),
        now: now(),
        traceparent: None,
    }
}

fn frame(text: &str) -> Frame {
    serde_json::from_str(text).unwrap()
}

/// The frame a handler returns for `input()`: route shifted to `b`.
fn to_b() -> Frame {
    frame(r#"{"route":{"prev":["p","a"],"curr":"b","next":[]},"payload":2}"#)
}

fn to_end() -> Frame {
    frame(r#"{"route":{"prev":["p","a"],"curr":"","next":[]},"payload":3}"#)
}

fn call(answer: Answer) -> Call {
    Call {
        invoke: Invoke {
            timeout: Duration::from_secs(10),
            cut_by_deadline: false,
        },
        answer,
    }
}

fn routed(h: &Hop, frames: Vec<Frame>, policy: Option<Result<Decision, String>>) -> Routed {
    let mut r = Routed::default();
    for (i, f) in frames.into_iter().enumerate() {
        let c = candidate(h, i, f);
        let d = if c.wants_policy() {
            policy.clone()
        } else {
            None
        };
        route_frame(h, &mut r, c, d);
    }
    r
}

fn status(o: &Output) -> &Status {
    o.envelope.status.as_ref().expect("stamped")
}

fn reasons(p: &Plan) -> Vec<FailReason> {
    p.failures.iter().map(|f| f.reason).collect()
}

/// The payload of an x-sump output, parsed.
fn sump_shape(o: &Output) -> serde_json::Value {
    serde_json::from_str(o.envelope.payload.get()).unwrap()
}

// --- before the call ---

#[test]
fn a_fresh_input_is_invoked_with_the_actor_timeout() {
    let (r, i) = (rules(), input());
    let inv = before_invoke(&hop(&r, &i, 1)).unwrap();
    assert_eq!(inv.timeout, Duration::from_secs(10));
    assert!(!inv.cut_by_deadline);
}

#[test]
fn a_near_deadline_cuts_the_call_timeout() {
    let r = rules();
    let i = env(
        r#"{"id":"e1","route":{"curr":"a"},"payload":1,"status":{"deadline_at":"2030-01-01T12:00:03Z"}}"#,
    );
    let inv = before_invoke(&hop(&r, &i, 1)).unwrap();
    assert_eq!(inv.timeout, Duration::from_secs(3));
    assert!(inv.cut_by_deadline);
}

#[test]
fn a_far_deadline_leaves_the_actor_timeout() {
    let r = rules();
    let i = env(
        r#"{"id":"e1","route":{"curr":"a"},"payload":1,"status":{"deadline_at":"2030-01-01T13:00:00Z"}}"#,
    );
    let inv = before_invoke(&hop(&r, &i, 1)).unwrap();
    assert!(!inv.cut_by_deadline);
}

#[test]
fn an_envelope_for_another_actor_goes_to_sump_as_route_mismatch() {
    let r = rules();
    let i = env(r#"{"id":"e1","route":{"curr":"zz"},"payload":1}"#);
    let p = before_invoke(&hop(&r, &i, 1)).unwrap_err();
    assert_eq!(reasons(&p), [FailReason::RouteMismatch]);
    assert_eq!(p.settle, Settlement::Ack);
    assert_eq!(p.processed, Some(Processed::Error));
    let [o] = &p.outputs[..] else { panic!() };
    assert_eq!(o.kind, MessageType::Sump);
    assert_eq!(o.queue.as_str(), "asya-ns-x-sump");
    assert_eq!(o.id, mid("0:sump"));
    let st = status(o);
    assert_eq!(st.phase, Some(Phase::Failed));
    assert_eq!(st.reason, Some(Reason::RouteMismatch));
    assert_eq!(st.actor.as_deref(), Some("a"));
    assert_eq!(st.error.as_ref().unwrap().kind, "RouteMismatch");
    assert!(st.error.as_ref().unwrap().message.contains("\"zz\""));
    assert_eq!(st.attempt, Some(1));
    assert_eq!(st.max_attempts, Some(3));
    assert_eq!(p.error, None, "no hop error before the call");
}

#[test]
fn a_passed_deadline_goes_to_sink_as_failed_timeout_with_the_payload_untouched() {
    let r = rules();
    let i = env(
        r#"{"id":"e1","route":{"curr":"a","next":["b"]},"payload":{"keep": 1.50},"status":{"deadline_at":"2030-01-01T11:59:59Z"}}"#,
    );
    let p = before_invoke(&hop(&r, &i, 1)).unwrap_err();
    assert_eq!(reasons(&p), [FailReason::SlaExpired]);
    assert_eq!(p.processed, Some(Processed::Success));
    let [o] = &p.outputs[..] else { panic!() };
    assert_eq!(
        (o.kind, o.queue.as_str()),
        (MessageType::Sink, "asya-ns-x-sink")
    );
    assert_eq!(o.id, mid("0:expired"));
    assert_eq!(o.envelope.payload.get(), r#"{"keep": 1.50}"#);
    let st = status(o);
    assert_eq!(
        (st.phase, st.reason),
        (Some(Phase::Failed), Some(Reason::Timeout))
    );
    assert_eq!(st.error.as_ref().unwrap().kind, "Timeout");
    assert_eq!(st.updated_at.as_deref(), Some("2030-01-01T12:00:00.000Z"));
    assert_eq!(st.created_at.as_deref(), Some("2030-01-01T12:00:00.000Z"));
    assert_eq!((st.attempt, st.max_attempts), (Some(1), Some(3)));
}

#[test]
fn too_many_deliveries_go_to_sump_as_max_retries_exhausted() {
    let (r, i) = (rules(), input());
    assert!(before_invoke(&hop(&r, &i, 3)).is_ok());
    let p = before_invoke(&hop(&r, &i, 4)).unwrap_err();
    assert_eq!(reasons(&p), [FailReason::MaxRetriesExhausted]);
    let st = status(&p.outputs[0]);
    assert_eq!(st.reason, Some(Reason::MaxRetriesExhausted));
    assert_eq!(
        st.error.as_ref().unwrap().message,
        "delivered 4 times, limit 3"
    );
    assert_eq!(p.outputs[0].id, mid("1:sump"));
}

// --- frames ---

#[test]
fn one_frame_routes_to_the_next_actor_with_the_input_identity() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let p = after_invoke(&h, call(Answer::Frames(routed(&h, vec![to_b()], None))));
    assert_eq!(p.settle, Settlement::Ack);
    assert_eq!(p.processed, Some(Processed::Success));
    assert!(p.failures.is_empty());
    let [o] = &p.outputs[..] else { panic!() };
    assert_eq!(
        (o.kind, o.queue.as_str()),
        (MessageType::Routing, "asya-ns-b")
    );
    assert_eq!(o.id, mid("1:0"));
    assert_eq!(o.envelope.id, "e1");
    assert_eq!(o.envelope.parent_id, None);
    assert_eq!(o.envelope.trace_id(), "t1");
    assert_eq!(o.envelope.extra["x"].get(), r#""kept""#);
    assert_eq!(o.envelope.payload.get(), "2");
    assert!(o.envelope.status.is_none(), "a routed frame is not stamped");
}

#[test]
fn a_frame_at_the_end_of_its_route_goes_to_sink_as_succeeded() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let p = after_invoke(&h, call(Answer::Frames(routed(&h, vec![to_end()], None))));
    let [o] = &p.outputs[..] else { panic!() };
    assert_eq!(
        (o.kind, o.queue.as_str()),
        (MessageType::Sink, "asya-ns-x-sink")
    );
    let st = status(o);
    assert_eq!(
        (st.phase, st.reason),
        (Some(Phase::Succeeded), Some(Reason::Completed))
    );
    assert_eq!(st.actor.as_deref(), Some("a"));
}

#[test]
fn fan_out_keeps_the_input_id_on_the_first_frame_and_derives_the_children() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let frames = (0..10).map(|_| to_b()).collect();
    let p = after_invoke(&h, call(Answer::Frames(routed(&h, frames, None))));
    assert_eq!(p.outputs.len(), 10);
    let mut ids = std::collections::HashSet::new();
    for (n, o) in p.outputs.iter().enumerate() {
        assert_eq!(o.id, mid(&format!("1:{n}")));
        if n == 0 {
            assert_eq!(o.envelope.id, "e1");
            assert_eq!(o.envelope.parent_id, None, "the input's own parent");
        } else {
            assert_eq!(o.envelope.parent_id.as_deref(), Some("e1"));
            assert_eq!(o.envelope.id, MsgId::frame("e1", digest(), 1, n).child_id());
        }
        ids.insert(o.envelope.id.clone());
    }
    assert_eq!(ids.len(), 10);
    // A later batch of a stream (frames numbered from 3) are all children.
    let c = candidate(&h, 3, to_b());
    assert_eq!(c.envelope.id, MsgId::frame("e1", digest(), 1, 3).child_id());
    assert_eq!(c.envelope.parent_id.as_deref(), Some("e1"));
    // A redelivered input makes the same children.
    let again = after_invoke(
        &h,
        call(Answer::Frames(routed(&h, vec![to_b(), to_b()], None))),
    );
    assert_eq!(again.outputs[1].envelope.id, p.outputs[1].envelope.id);
}

#[test]
fn a_frame_that_rewrites_history_sends_the_input_to_sump_and_skips_the_policy() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 2);
    let bad = frame(r#"{"route":{"prev":["zz","a"],"curr":"b"},"payload":9}"#);
    let c = candidate(&h, 0, bad);
    assert!(!c.wants_policy());
    let mut rt = Routed::default();
    route_frame(&h, &mut rt, c, None);
    let p = after_invoke(&h, call(Answer::Frames(rt)));
    assert_eq!(reasons(&p), [FailReason::RouteMismatch]);
    assert_eq!(
        p.processed,
        Some(Processed::Success),
        "as before: the hop itself succeeded"
    );
    let [o] = &p.outputs[..] else { panic!() };
    assert_eq!(
        (o.kind, o.id.as_str()),
        (MessageType::Sump, mid("1:0:sump").as_str())
    );
    assert_eq!(
        sump_shape(o)["original_payload"],
        serde_json::json!({"k": 1}),
        "the input, not the frame"
    );
    assert_eq!(sump_shape(o)["error"], "route_mismatch");
    let st = status(o);
    assert_eq!(st.reason, Some(Reason::RouteMismatch));
    assert_eq!(st.attempt, Some(2), "this hop's delivery count");
}

#[test]
fn one_bad_frame_costs_one_frame() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let bad = frame(r#"{"route":{"prev":["a"],"curr":"b"},"payload":9}"#);
    let p = after_invoke(
        &h,
        call(Answer::Frames(routed(
            &h,
            vec![to_b(), bad, to_end()],
            None,
        ))),
    );
    let kinds: Vec<_> = p.outputs.iter().map(|o| o.kind).collect();
    assert_eq!(
        kinds,
        [MessageType::Routing, MessageType::Sump, MessageType::Sink]
    );
    assert_eq!(p.outputs[1].id, mid("1:1:sump"));
}

#[test]
fn a_frame_for_an_actor_no_queue_can_name_goes_to_sump() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let bad = frame(r#"{"route":{"prev":["p","a"],"curr":"no such/actor"},"payload":2}"#);
    let p = after_invoke(
        &h,
        call(Answer::Frames(routed(&h, vec![to_b(), bad], None))),
    );
    assert_eq!(reasons(&p), [FailReason::RouteMismatch]);
    assert_eq!(p.outputs[0].kind, MessageType::Routing);
    let o = &p.outputs[1];
    assert_eq!(
        (o.kind, o.id.as_str()),
        (MessageType::Sump, mid("1:1:sump").as_str())
    );
    assert_eq!(status(o).reason, Some(Reason::RouteMismatch));
}

#[test]
fn policy_keep_routes_as_the_handler_said() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let p = after_invoke(
        &h,
        call(Answer::Frames(routed(
            &h,
            vec![to_b()],
            Some(Ok(Decision::Keep)),
        ))),
    );
    assert_eq!(p.outputs[0].queue.as_str(), "asya-ns-b");
}

#[test]
fn policy_replace_route_is_checked_and_applied() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let ok = Route {
        prev: vec!["p".into(), "a".into()],
        curr: "c".into(),
        next: vec![],
    };
    let p = after_invoke(
        &h,
        call(Answer::Frames(routed(
            &h,
            vec![to_b()],
            Some(Ok(Decision::ReplaceRoute(ok))),
        ))),
    );
    assert_eq!(p.outputs[0].queue.as_str(), "asya-ns-c");
    let finished = Route {
        prev: vec!["p".into(), "a".into()],
        curr: String::new(),
        next: vec![],
    };
    let p = after_invoke(
        &h,
        call(Answer::Frames(routed(
            &h,
            vec![to_b()],
            Some(Ok(Decision::ReplaceRoute(finished))),
        ))),
    );
    assert_eq!(p.outputs[0].kind, MessageType::Sink);
}

#[test]
fn policy_replace_route_that_rewrites_history_is_rejected() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let bad = Route {
        prev: vec!["a".into()],
        curr: "c".into(),
        next: vec![],
    };
    let p = after_invoke(
        &h,
        call(Answer::Frames(routed(
            &h,
            vec![to_b()],
            Some(Ok(Decision::ReplaceRoute(bad))),
        ))),
    );
    assert_eq!(reasons(&p), [FailReason::PolicyRejected]);
    assert_eq!(p.outputs[0].kind, MessageType::Sump);
}

#[test]
fn policy_send_to_sink_ends_the_route_succeeded() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let p = after_invoke(
        &h,
        call(Answer::Frames(routed(
            &h,
            vec![to_b()],
            Some(Ok(Decision::SendToSink)),
        ))),
    );
    let o = &p.outputs[0];
    assert_eq!(
        (o.kind, o.id.as_str()),
        (MessageType::Sink, mid("1:0").as_str())
    );
    assert_eq!(status(o).phase, Some(Phase::Succeeded));
}

#[test]
fn policy_rejections_and_failures_send_the_frame_to_sump_with_the_reason() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    for decision in [
        Ok(Decision::Reject("no".into())),
        Ok(Decision::SendToSump("no".into())),
        Err("no".into()),
    ] {
        let p = after_invoke(
            &h,
            call(Answer::Frames(routed(&h, vec![to_b()], Some(decision)))),
        );
        assert_eq!(reasons(&p), [FailReason::PolicyRejected]);
        let o = &p.outputs[0];
        assert_eq!(
            (o.kind, o.id.as_str()),
            (MessageType::Sump, mid("1:0:sump").as_str())
        );
        assert_eq!(
            sump_shape(o)["original_payload"],
            2,
            "the frame, not the input"
        );
        assert_eq!(sump_shape(o)["error"], "policy_rejected");
        let st = status(o);
        assert_eq!(st.reason, Some(Reason::PolicyRejected));
        assert_eq!(st.error.as_ref().unwrap().message, "no");
    }
}

#[test]
fn no_frames_or_204_send_the_input_to_sink_as_succeeded() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let p = after_invoke(&h, call(Answer::Abort));
    let [o] = &p.outputs[..] else { panic!() };
    assert_eq!(
        (o.kind, o.id.as_str()),
        (MessageType::Sink, mid("1:abort").as_str())
    );
    assert_eq!(o.envelope.payload.get(), r#"{"k":1}"#);
    assert_eq!(status(o).reason, Some(Reason::Completed));
    assert_eq!(p.processed, Some(Processed::Success));
}

// --- failures and retries ---

fn handler_error(kind: &str) -> ErrorInfo {
    ErrorInfo::new(kind, "boom")
}

#[test]
fn a_handler_error_is_retried_with_backoff_while_attempts_are_left() {
    let (r, i) = (rules(), input());
    for (attempt, delay) in [(1, 1), (2, 2)] {
        let p = after_invoke(
            &hop(&r, &i, attempt),
            call(Answer::Handler(handler_error("ValueError"))),
        );
        assert_eq!(p.settle, Settlement::Retry(Duration::from_secs(delay)));
        assert!(p.outputs.is_empty());
        assert!(p.failures.is_empty(), "a retry is not a failure");
        assert_eq!(p.processed, None);
        assert_eq!(p.error.as_ref().unwrap().kind, "ValueError");
    }
}

#[test]
fn the_last_attempt_goes_to_sump_as_max_retries_exhausted() {
    let (r, i) = (rules(), input());
    let p = after_invoke(&hop(&r, &i, 3), call(Answer::Handler(handler_error("E"))));
    assert_eq!(
        reasons(&p),
        [FailReason::RuntimeError, FailReason::MaxRetriesExhausted]
    );
    let st = status(&p.outputs[0]);
    assert_eq!(st.reason, Some(Reason::MaxRetriesExhausted));
    assert_eq!(st.error.as_ref().unwrap().message, "boom");
    assert_eq!((st.attempt, st.max_attempts), (Some(3), Some(3)));
    assert_eq!(p.settle, Settlement::Ack);
    assert_eq!(p.processed, Some(Processed::Error));
}

#[test]
fn without_retries_a_handler_error_is_a_runtime_error() {
    let mut r = rules();
    r.resiliency.max_attempts = 1;
    let i = input();
    let p = after_invoke(&hop(&r, &i, 1), call(Answer::Handler(handler_error("E"))));
    assert_eq!(reasons(&p), [FailReason::RuntimeError]);
    assert_eq!(status(&p.outputs[0]).reason, Some(Reason::RuntimeError));
}

#[test]
fn non_retryable_types_go_to_sump_at_once() {
    let mut r = rules();
    r.resiliency.non_retryable = vec!["ValueError".into()];
    let i = input();
    let p = after_invoke(
        &hop(&r, &i, 1),
        call(Answer::Handler(handler_error("builtins.ValueError"))),
    );
    assert_eq!(
        status(&p.outputs[0]).reason,
        Some(Reason::NonRetryableFailure)
    );
    assert_eq!(reasons(&p), [FailReason::RuntimeError]);
}

#[test]
fn a_400_goes_to_sump_as_parse_error_without_retry() {
    let (r, i) = (rules(), input());
    let p = after_invoke(
        &hop(&r, &i, 1),
        call(Answer::Rejected(ErrorInfo::new(
            "MessageParsingError",
            "bad",
        ))),
    );
    assert_eq!(reasons(&p), [FailReason::ParseError]);
    let st = status(&p.outputs[0]);
    assert_eq!(st.reason, Some(Reason::ParseError));
    assert_eq!(st.error.as_ref().unwrap().kind, "MessageParsingError");
}

#[test]
fn a_runtime_timeout_is_retried_and_resets_the_connections() {
    let (r, i) = (rules(), input());
    let p = after_invoke(
        &hop(&r, &i, 1),
        call(Answer::Runtime(RuntimeError::Timeout(Duration::from_secs(
            10,
        )))),
    );
    assert!(matches!(p.settle, Settlement::Retry(_)));
    assert!(p.reset_runtime);
    assert_eq!(p.error.as_ref().unwrap().kind, "Timeout");
}

#[test]
fn a_timeout_with_crash_on_timeout_is_sumped_then_acked_then_exits() {
    let mut r = rules();
    r.resiliency.crash_on_timeout = true;
    let i = input();
    let p = after_invoke(
        &hop(&r, &i, 1),
        call(Answer::Runtime(RuntimeError::Timeout(Duration::from_secs(
            10,
        )))),
    );
    assert_eq!(p.settle, Settlement::AckThenExit);
    assert!(p.reset_runtime);
    assert_eq!(reasons(&p), [FailReason::Timeout]);
    let st = status(&p.outputs[0]);
    assert_eq!(st.reason, Some(Reason::Timeout));
    assert!(st
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("deadline exceeded"));
    // If the sump message cannot be published the input is retried, never exited on.
    assert_eq!(p.on_publish_failure, Duration::from_secs(1));
}

/// Issue #12 item 5: a deadline that cuts a running call leaves the runtime busy, so it is a
/// runtime timeout — x-sump with the deadline named, ack, and exit with crash-on-timeout.
#[test]
fn a_call_cut_by_the_deadline_is_a_runtime_timeout() {
    for crash in [true, false] {
        let mut r = rules();
        r.resiliency.crash_on_timeout = crash;
        let i = env(
            r#"{"id":"e1","route":{"prev":["p"],"curr":"a","next":["b"]},"payload":1,"status":{"deadline_at":"2030-01-01T12:00:03Z"}}"#,
        );
        let mut c = call(Answer::Runtime(RuntimeError::Timeout(Duration::from_secs(
            3,
        ))));
        c.invoke.cut_by_deadline = true;
        let p = after_invoke(&hop(&r, &i, 1), c);
        let want = if crash {
            Settlement::AckThenExit
        } else {
            Settlement::Ack
        };
        assert_eq!(p.settle, want, "crash={crash}");
        assert!(p.reset_runtime);
        assert_eq!(reasons(&p), [FailReason::Timeout]);
        let o = &p.outputs[0];
        assert_eq!(
            (o.kind, o.id.as_str()),
            (MessageType::Sump, mid("1:sump").as_str())
        );
        let st = status(o);
        assert_eq!(st.reason, Some(Reason::Timeout));
        let msg = &st.error.as_ref().unwrap().message;
        assert!(msg.contains("2030-01-01T12:00:03Z"), "{msg}");
    }
}

#[test]
fn invalid_envelopes_go_to_sump_before_anything_else() {
    let r = rules();
    for (text, says) in [
        (
            r#"{"id":"e1","route":{"curr":"a"},"status":{"deadline_at":"soon"}}"#,
            "deadline_at",
        ),
        (
            r#"{"id":"e1","route":{"curr":"a","next":["b.c"]}}"#,
            "route.next[0]",
        ),
        (
            r#"{"id":"e1","route":{"curr":"a","next":[""]}}"#,
            "route.next[0]",
        ),
        // validation comes before the route check (`curr` is not even a name)
        (r#"{"id":"e1","route":{"curr":"a b"}}"#, "route.curr"),
    ] {
        let i = env(text);
        let p = *before_invoke(&hop(&r, &i, 1)).unwrap_err();
        assert_eq!(reasons(&p), [FailReason::ValidationError], "{text}");
        assert_eq!(p.settle, Settlement::Ack);
        let st = status(&p.outputs[0]);
        assert_eq!(st.reason, Some(Reason::ValidationError));
        let msg = &st.error.as_ref().unwrap().message;
        assert!(msg.contains(says), "{text}: {msg}");
    }
    let mut r = rules();
    r.max_hops = 2;
    let i = env(r#"{"id":"e1","route":{"prev":["a","a","a"],"curr":"a"}}"#);
    let p = *before_invoke(&hop(&r, &i, 1)).unwrap_err();
    assert_eq!(reasons(&p), [FailReason::ValidationError]);
    let i = env(r#"{"id":"e1","route":{"prev":["a","a"],"curr":"a"}}"#);
    assert!(before_invoke(&hop(&r, &i, 1)).is_ok());
}

#[test]
fn too_many_frames_send_the_input_to_sump_once() {
    let (r, i) = (rules(), input());
    let p = after_invoke(&hop(&r, &i, 1), call(Answer::TooManyFrames));
    assert_eq!(reasons(&p), [FailReason::RuntimeError]);
    assert_eq!(p.settle, Settlement::Ack, "never retried");
    let st = status(&p.outputs[0]);
    assert_eq!(st.reason, Some(Reason::NonRetryableFailure));
    assert!(st
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("ASYA_MAX_FRAMES (1024)"));
}

#[test]
fn an_unsendable_output_sends_the_input_to_sump_cut_to_fit() {
    let mut r = rules();
    r.max_output_bytes = Some(64 * 1024);
    let big = format!(
        r#"{{"id":"e1","route":{{"prev":["p"],"curr":"a","next":["b"]}},"payload":{{"text":"{}"}}}}"#,
        "é\\n".repeat(40_000)
    );
    let i = env(&big);
    let p = unsendable(&hop(&r, &i, 1), "max payload size exceeded");
    assert_eq!(reasons(&p), [FailReason::TransportError]);
    assert_eq!(p.settle, Settlement::Ack);
    let o = &p.outputs[0];
    assert_eq!(o.kind, MessageType::Sump);
    let bytes = o.envelope.to_vec();
    assert!(bytes.len() <= 64 * 1024 - FIT_MARGIN, "{}", bytes.len());
    assert!(
        bytes.len() > 32 * 1024,
        "kept as much as fits: {}",
        bytes.len()
    );
    let st = status(o);
    let msg = &st.error.as_ref().unwrap().message;
    assert!(msg.contains("max payload size exceeded"), "{msg}");
    assert!(msg.contains("original_payload cut from"), "{msg}");
    let shape = sump_shape(o);
    assert_eq!(shape["error"], "transport_error");
    let cut = shape["original_payload"].as_str().unwrap();
    assert!(i.payload.get().starts_with(cut));
    // a small input is not cut
    let small = input();
    let p = unsendable(&hop(&r, &small, 1), "rejected");
    assert_eq!(
        sump_shape(&p.outputs[0])["original_payload"],
        serde_json::json!({"k": 1})
    );
}

#[test]
fn a_stale_answer_counts_an_id_mismatch() {
    let (r, i) = (rules(), input());
    let e = RuntimeError::RequestIdMismatch {
        expected: "1".into(),
        got: "2".into(),
    };
    let p = after_invoke(&hop(&r, &i, 1), call(Answer::Runtime(e)));
    assert!(p.id_mismatch);
    assert!(!p.reset_runtime);
    assert_eq!(p.error.as_ref().unwrap().kind, "RequestIdMismatch");
}

#[test]
fn unpublished_stream_frames_retry_with_this_attempts_backoff() {
    let (r, i) = (rules(), input());
    let p = after_invoke(
        &hop(&r, &i, 2),
        call(Answer::Unpublished(ErrorInfo::new(
            "TransportError",
            "down",
        ))),
    );
    assert_eq!(p.settle, Settlement::Retry(Duration::from_secs(2)));
    assert!(p.failures.is_empty(), "counted when publishing failed");
}

#[test]
fn a_failed_publish_of_frames_retries_with_this_attempts_backoff_and_of_a_sump_with_the_first() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 3);
    let ok = after_invoke(&h, call(Answer::Frames(routed(&h, vec![to_b()], None))));
    assert_eq!(ok.on_publish_failure, Duration::from_secs(4));
    let sump = before_invoke(&hop(&r, &i, 4)).unwrap_err();
    assert_eq!(sump.on_publish_failure, Duration::from_secs(1));
}

// --- input that is not an envelope ---

#[test]
fn unparseable_bytes_go_to_sump_with_a_deterministic_id_and_the_raw_text() {
    let r = rules();
    let body = br#"{"headers":{"trace_id":"t9"},"route":{"curr":"a"},"payload":1}"#;
    let err = Envelope::parse(body).unwrap_err();
    let input = unparseable_envelope(body, &err);
    assert_eq!(input.id, unparseable_envelope_id(body));
    assert_eq!(input.trace_id(), "t9", "headers salvaged");
    let payload: String = serde_json::from_str(input.payload.get()).unwrap();
    assert_eq!(payload.as_bytes(), body);
    let h = Hop {
        hop: 0,
        ..hop(&r, &input, 1)
    };
    let p = unparseable(&h, &err);
    assert_eq!(reasons(&p), [FailReason::ValidationError]);
    let o = &p.outputs[0];
    assert_eq!(o.id, format!("{}:sump", input.id));
    let st = status(o);
    assert_eq!(st.reason, Some(Reason::ValidationError));
    assert_eq!(st.error.as_ref().unwrap().kind, "ValidationError");
    assert_eq!(st.attempt, Some(1));

    let err = Envelope::parse(b"not json").unwrap_err();
    let garbage = unparseable_envelope(b"not json", &err);
    let p = unparseable(&hop(&r, &garbage, 2), &err);
    assert_eq!(reasons(&p), [FailReason::ParseError]);
    assert_eq!(status(&p.outputs[0]).reason, Some(Reason::ParseError));
}

#[test]
fn end_actors_ack_and_count_success() {
    let p = end_of_route(&rules());
    assert!(p.outputs.is_empty());
    assert_eq!(p.settle, Settlement::Ack);
    assert_eq!(p.processed, Some(Processed::Success));
}

// --- trace context ---

#[test]
fn every_output_of_a_hop_carries_the_hops_traceparent() {
    let r = rules();
    let i = env(
        r#"{"id":"e1","route":{"curr":"a","next":["b"]},"headers":{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},"payload":1}"#,
    );
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
    let h = Hop {
        traceparent: Some(tp.into()),
        ..hop(&r, &i, 1)
    };
    // A frame that echoes the input's headers still gets the hop's span as parent.
    let echo = frame(
        r#"{"route":{"prev":["a"],"curr":"b"},"headers":{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},"payload":2}"#,
    );
    let p = after_invoke(&h, call(Answer::Frames(routed(&h, vec![echo], None))));
    assert_eq!(
        p.outputs[0].envelope.headers.value("traceparent").unwrap(),
        tp
    );
    let p = after_invoke(&h, call(Answer::Handler(handler_error("E"))));
    assert!(p.outputs.is_empty());
    let mut last = h.clone();
    last.attempt = 3;
    let p = after_invoke(&last, call(Answer::Handler(handler_error("E"))));
    assert_eq!(
        p.outputs[0].envelope.headers.value("traceparent").unwrap(),
        tp,
        "x-sump too"
    );
    // Without a hop traceparent the input's header passes unchanged.
    let h = hop(&r, &i, 1);
    let p = after_invoke(&h, call(Answer::Abort));
    assert_eq!(
        p.outputs[0].envelope.headers.value("traceparent").unwrap(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
}

// --- upstream-compatible envelope semantics (issue #15) ---

#[test]
fn the_processing_status_is_stamped_before_the_call() {
    let r = rules();
    let mut e = input();
    stamp_processing(&r, &mut e, 2, now());
    let st = e.status.as_ref().unwrap();
    assert_eq!(st.phase, Some(Phase::Processing));
    assert_eq!(st.actor.as_deref(), Some("a"));
    assert_eq!((st.attempt, st.max_attempts), (Some(2), Some(3)));
    assert_eq!(st.created_at.as_deref(), Some("2030-01-01T12:00:00.000Z"));
    assert_eq!(st.updated_at, st.created_at);
    // created_at is kept; reason cleared; a previous error kept (for _on_error handlers).
    let mut e = env(
        r#"{"id":"e1","route":{"curr":"a"},"payload":1,"status":{"phase":"failed","reason":"RuntimeError","created_at":"2029-12-31T00:00:00.000Z","error":{"message":"m","type":"T"},"attempt":7,"custom":1}}"#,
    );
    stamp_processing(&r, &mut e, 0, now());
    let st = e.status.as_ref().unwrap();
    assert_eq!(st.created_at.as_deref(), Some("2029-12-31T00:00:00.000Z"));
    assert!(
        st.created_at <= st.updated_at,
        "same format: ordered as strings"
    );
    assert_eq!(st.reason, None);
    assert_eq!(st.attempt, Some(1), "attempt is 1-based");
    assert_eq!(st.error.as_ref().unwrap().kind, "T");
    assert_eq!(st.extra["custom"].get(), "1");
}

#[test]
fn a_handler_failure_reaches_sump_in_upstreams_shape() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 3);
    let mut info = handler_error("ValueError");
    info.mro = vec!["ValueError".into(), "Exception".into()];
    info.traceback = Some("tb".into());
    let p = after_invoke(&h, call(Answer::Handler(info.clone())));
    let o = &p.outputs[0];
    assert_eq!(o.kind, MessageType::Sump);
    let v = sump_shape(o);
    assert_eq!(v["error"], "processing_error");
    assert_eq!(
        v["details"],
        serde_json::json!({"message": info.message, "type": "ValueError", "mro": ["ValueError", "Exception"], "traceback": "tb"})
    );
    assert_eq!(v["original_payload"], serde_json::json!({"k": 1}));
    let st = status(o);
    assert_eq!(st.error.as_ref(), Some(&info), "status.error is kept too");
    assert_eq!((st.attempt, st.max_attempts), (Some(3), Some(3)));

    let p = after_invoke(
        &h,
        call(Answer::Rejected(ErrorInfo::new("ValueError", "bad"))),
    );
    assert_eq!(sump_shape(&p.outputs[0])["error"], "msg_parsing_error");
    let p = after_invoke(
        &h,
        call(Answer::Runtime(RuntimeError::Timeout(Duration::from_secs(
            1,
        )))),
    );
    assert_eq!(sump_shape(&p.outputs[0])["error"], "max_retries_exhausted");
}

#[test]
fn unparseable_bytes_reach_sump_with_the_raw_text_as_original_payload() {
    let r = rules();
    let e = Envelope::parse(b"{nope").unwrap_err();
    let input = unparseable_envelope(b"{nope", &e);
    let p = unparseable(&hop(&r, &input, 1), &e);
    let v = sump_shape(&p.outputs[0]);
    assert_eq!(v["error"], "parse_error");
    assert_eq!(v["original_payload"], "{nope");
    assert_eq!(v["details"]["type"], "ParseError");
}

#[test]
fn non_retryable_types_match_any_class_of_the_mro() {
    let mut r = rules();
    r.resiliency.non_retryable = vec!["Exception".into()];
    let i = input();
    let h = hop(&r, &i, 1);
    let mut info = handler_error("MemoryError");
    info.mro = vec!["Exception".into()];
    let p = after_invoke(&h, call(Answer::Handler(info.clone())));
    assert_eq!(p.settle, Settlement::Ack, "not retried");
    assert_eq!(
        status(&p.outputs[0]).reason,
        Some(Reason::NonRetryableFailure)
    );
    info.mro.clear();
    let p = after_invoke(&h, call(Answer::Handler(info)));
    assert!(matches!(p.settle, Settlement::Retry(_)));
}

#[test]
fn a_route_override_sends_the_next_hop_to_the_physical_queue_and_records_it() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let f = frame(
        r#"{"route":{"prev":["p","a"],"curr":"b","next":["c"]},"payload":2,"headers":{"x-asya-route-override":{"b":"b-canary","c":"c2"}}}"#,
    );
    let p = after_invoke(&h, call(Answer::Frames(routed(&h, vec![f], None))));
    let [o] = &p.outputs[..] else { panic!() };
    assert_eq!(
        (o.kind, o.queue.as_str()),
        (MessageType::Routing, "asya-ns-b-canary")
    );
    assert_eq!(
        o.envelope.route.curr, "b",
        "the route keeps the logical name"
    );
    assert_eq!(
        o.envelope.headers.value(HEADER_ROUTE_RESOLVED).unwrap(),
        serde_json::json!({"b": {"target": "b-canary", "by": "a"}})
    );
    // Without an entry for the next actor: routed as usual, no audit.
    let p = after_invoke(&h, call(Answer::Frames(routed(&h, vec![to_b()], None))));
    assert_eq!(p.outputs[0].queue.as_str(), "asya-ns-b");
    assert!(!p.outputs[0]
        .envelope
        .headers
        .contains_key(HEADER_ROUTE_RESOLVED));
}

#[test]
fn an_envelope_for_a_logical_actor_mapped_to_this_one_is_accepted() {
    let r = rules();
    let i = env(
        r#"{"id":"e1","route":{"curr":"logical"},"headers":{"x-asya-route-override":{"logical":"a"}},"payload":1}"#,
    );
    assert!(before_invoke(&hop(&r, &i, 1)).is_ok());
    let other = env(
        r#"{"id":"e1","route":{"curr":"logical"},"headers":{"x-asya-route-override":{"logical":"z"}},"payload":1}"#,
    );
    assert!(before_invoke(&hop(&r, &other, 1)).is_err());
}

#[test]
fn on_error_sends_a_failure_to_the_handler_actor_instead_of_sump() {
    let r = rules();
    let i = env(
        r#"{"id":"e1","route":{"prev":["p"],"curr":"a","next":["b"]},"headers":{"_on_error":"fix","k":1},"payload":{"k":1}}"#,
    );
    let h = hop(&r, &i, 3);
    let info = handler_error("ValueError");
    let p = after_invoke(&h, call(Answer::Handler(info.clone())));
    assert_eq!(reasons(&p)[0], FailReason::RuntimeError);
    assert_eq!(p.processed, Some(Processed::Error));
    let [o] = &p.outputs[..] else { panic!() };
    assert_eq!(
        (o.kind, o.queue.as_str(), o.id.as_str()),
        (
            MessageType::Routing,
            "asya-ns-fix",
            mid("1:on_error").as_str()
        )
    );
    assert_eq!(
        o.envelope.route,
        Route {
            prev: vec!["p".into(), "a".into()],
            curr: "fix".into(),
            next: vec![],
        }
    );
    assert!(!o.envelope.headers.contains_key(HEADER_ON_ERROR));
    assert_eq!(o.envelope.headers.value("k").unwrap(), 1);
    assert_eq!(o.envelope.payload.get(), r#"{"k":1}"#, "payload untouched");
    let st = status(o);
    assert_eq!(st.phase, Some(Phase::Failed));
    assert_eq!(st.reason, Some(Reason::MaxRetriesExhausted));
    assert_eq!(st.error.as_ref(), Some(&info));
    // While attempts are left it is retried as usual.
    let p = after_invoke(&hop(&r, &i, 1), call(Answer::Handler(info)));
    assert!(matches!(p.settle, Settlement::Retry(_)));
}

#[test]
fn a_frame_with_a_pause_header_is_parked_not_routed() {
    let (r, i) = (rules(), input());
    let h = hop(&r, &i, 1);
    let f = frame(
        r#"{"route":{"prev":["p","a"],"curr":"b"},"payload":2,"headers":{"x-asya-pause":{"prompt":"approve?"}}}"#,
    );
    let p = after_invoke(&h, call(Answer::Frames(routed(&h, vec![f, to_b()], None))));
    assert_eq!(p.paused, Some(serde_json::json!({"prompt": "approve?"})));
    let o = &p.outputs[0];
    assert_eq!(
        (o.kind, o.queue.as_str(), o.id.as_str()),
        (MessageType::Routing, "asya-ns-x-pause", mid("1:0").as_str())
    );
    assert_eq!(o.envelope.route.curr, "b", "kept for the resume");
    assert_eq!(status(o).phase, Some(Phase::Paused));
    assert_eq!(status(o).reason, None);
    assert_eq!(
        p.outputs[1].queue.as_str(),
        "asya-ns-b",
        "other frames route"
    );
}

#[test]
fn mesh_status_off_turns_reports_off() {
    assert!(reports_wanted(&input()));
    let off = env(r#"{"id":"e","route":{"curr":"a"},"headers":{"x-asya-mesh-status":"off"}}"#);
    assert!(!reports_wanted(&off));
    let on = env(r#"{"id":"e","route":{"curr":"a"},"headers":{"x-asya-mesh-status":"on"}}"#);
    assert!(reports_wanted(&on));
}

#[test]
fn a_canceled_task_goes_to_sink_as_canceled_uncalled_with_the_payload_untouched() {
    let r = rules();
    let i = input();
    let p = canceled(&hop(&r, &i, 1));
    assert!(p.failures.is_empty());
    assert_eq!(
        (p.settle, p.processed),
        (Settlement::Ack, Some(Processed::Success))
    );
    let [o] = &p.outputs[..] else { panic!() };
    assert_eq!(
        (o.kind, o.queue.as_str()),
        (MessageType::Sink, "asya-ns-x-sink")
    );
    assert_eq!(o.id, mid("1:canceled"));
    assert_eq!(o.envelope.payload.get(), i.payload.get());
    assert_eq!(o.envelope.route, i.route);
    let st = status(o);
    assert_eq!((st.phase, st.reason), (Some(Phase::Canceled), None));
    assert_eq!(st.actor.as_deref(), Some("a"));
}
