//! Steps 1–7 of SPEC §5 for one delivery.

use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::inflight::InflightGuard;
use super::report::{HopLog, HopReport, Report};
use super::{Shared, Stage};
use crate::envelope::{now_rfc3339, Envelope, ErrorInfo, Frame, Phase, Reason, Route};
use crate::metrics::{FailReason, MessageType};
use crate::plugin::Decision;
use crate::runtime::{Reply, RuntimeError, SseEvent};
use crate::transport::{Acker, Delivery, OutMessage, TransportError};

/// What the worker does after a delivery.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum After {
    Continue,
    /// The runtime timed out with crash-on-timeout: stop the sidecar.
    Crash,
}

/// How the input delivery is settled.
enum Settle {
    Ack,
    Retry(Duration),
}

/// Namespace for deterministic fan-out child ids.
const CHILD_ID_NS: uuid::Uuid = uuid::Uuid::from_u128(0x6173_7961_2d66_616e_2d6f_7574_2d69_6473);

/// A delivery whose outputs are all published (or that is to be retried): what is left is
/// to settle it with the broker, which [`settle`] does.
pub(super) struct Handled {
    pub after: After,
    settle: Settle,
    acker: Box<dyn Acker>,
    guard: InflightGuard,
    start: Instant,
    body_len: usize,
    attempt: u32,
    /// For the gateway's hop report: the input and when it was received.
    report: Option<(Envelope, chrono::DateTime<chrono::Utc>)>,
    log: HopLog,
}

/// Steps 1–6 for one delivery: everything up to settling it.
pub(super) async fn handle(s: &Shared, delivery: Delivery) -> Handled {
    let start = Instant::now();
    let received_at = s.reporter.as_ref().map(|_| chrono::Utc::now());
    let m = &s.metrics;
    m.received.inc();
    m.size_received.observe(delivery.body.len() as f64);
    m.active.inc();
    let guard = s.inflight.enter(&s.actor);
    let Delivery {
        body,
        attempt,
        acker,
    } = delivery;
    let mut log = HopLog::default();

    let mut after = After::Continue;
    let mut parsed = None;
    let settle = match Envelope::parse(&body) {
        Err(e) => {
            let (reason, status_reason) = if e.is_parse() {
                (FailReason::ParseError, Reason::ParseError)
            } else {
                (FailReason::ValidationError, Reason::ValidationError)
            };
            warn!(actor = %s.actor, envelope_id = "", trace_id = "", error = %e, "unusable message; sending to sump");
            m.failed(reason);
            let env = unparseable_envelope(&body, &e);
            let id = format!("{}:sump", env.id);
            settle_send(
                s,
                &mut log,
                sump_message(s, env, id, status_reason, None, attempt),
            )
            .await
        }
        Ok(env) if s.cfg.is_end_actor => {
            // End actors record the final state; they never route.
            guard.identify(&env.id, env.trace_id());
            debug!(actor = %s.actor, envelope_id = %env.id, trace_id = %env.trace_id(), "end of route");
            m.processed_success.inc();
            if let Some(r) = &s.reporter {
                r.report(Report::Final {
                    actor: s.actor.to_string(),
                    envelope: env,
                });
            }
            Settle::Ack
        }
        Ok(env) => {
            guard.identify(&env.id, env.trace_id());
            // Keep the broker from redelivering while we work (NATS: +WPI every ack_wait/2).
            let work = process(s, &mut log, &env, &body, attempt, &guard);
            let (settle, crash) = with_progress(acker.as_ref(), work).await;
            if crash {
                after = After::Crash;
            }
            parsed = Some(env);
            settle
        }
    };
    Handled {
        after,
        settle,
        acker,
        guard,
        start,
        body_len: body.len(),
        attempt,
        report: parsed.zip(received_at),
        log,
    }
}

/// Step 7: ack (or nack for a retry) the delivery, then record the hop.
pub(super) async fn settle(s: &Shared, h: Handled) {
    let Handled {
        settle,
        acker,
        guard,
        start,
        body_len,
        attempt,
        report,
        log,
        ..
    } = h;
    let m = &s.metrics;
    guard.stage(Stage::Acking);
    let retried = matches!(settle, Settle::Retry(_));
    let settled = match settle {
        Settle::Ack => acker.ack().await,
        Settle::Retry(delay) => {
            m.sent(
                s.queue.as_str(),
                MessageType::Retry,
                Duration::ZERO,
                body_len,
            );
            m.processed_retry.inc();
            acker.nack(delay).await
        }
    };
    if let Err(e) = settled {
        // The broker redelivers; deterministic ids keep the outputs from doubling.
        m.failed(FailReason::TransportError);
        warn!(actor = %s.actor, error = %e, "settling the delivery failed; it will be redelivered");
    }
    let took = start.elapsed();
    m.processing_duration.observe(took.as_secs_f64());
    m.active.dec();
    drop(guard);
    if let (Some(r), Some((env, received_at))) = (&s.reporter, report) {
        let HopLog {
            sent,
            runtime,
            error,
        } = log;
        r.report(Report::Hop(HopReport {
            actors_completed: env.route.prev.len() + 1,
            total_actors: env.route.actors().count(),
            envelope_id: env.id,
            parent_id: env.parent_id,
            trace_id: env
                .headers
                .get(crate::envelope::HEADER_TRACE_ID)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned(),
            actor: s.actor.to_string(),
            received_at,
            duration: took,
            runtime,
            sent,
            retried,
            attempt,
            error,
        }));
    }
}

/// Steps 2–6 for a parsed envelope. Returns how to settle the input and whether to crash.
async fn process(
    s: &Shared,
    log: &mut HopLog,
    env: &Envelope,
    body: &Bytes,
    attempt: u32,
    guard: &InflightGuard,
) -> (Settle, bool) {
    let m = &s.metrics;
    let res = &s.cfg.resiliency;
    let hop = env.route.prev.len();

    // 2. Route check.
    if env.route.curr != *s.actor {
        m.failed(FailReason::RouteMismatch);
        let msg = format!(
            "envelope for actor {:?} arrived at actor {:?}",
            env.route.curr, s.actor
        );
        warn!(actor = %s.actor, envelope_id = %env.id, trace_id = %env.trace_id(), "{msg}");
        let err = ErrorInfo::new("RouteMismatch", msg);
        return (
            sump_input(s, log, env, hop, Reason::RouteMismatch, Some(err), attempt).await,
            false,
        );
    }

    // 3. Deadline.
    let now = chrono::Utc::now();
    let deadline = env.deadline();
    if let Some(d) = deadline {
        if d <= now {
            return (sla_expired(s, log, env, hop).await, false);
        }
    }

    // Bounded redelivery (crash loops, lost acks).
    if attempt > res.max_attempts {
        m.failed(FailReason::MaxRetriesExhausted);
        let err = ErrorInfo::new(
            "MaxRetriesExhausted",
            format!("delivered {attempt} times, limit {}", res.max_attempts),
        );
        return (
            sump_input(
                s,
                log,
                env,
                hop,
                Reason::MaxRetriesExhausted,
                Some(err),
                attempt,
            )
            .await,
            false,
        );
    }

    // 4. Invoke with min(actor timeout, time to deadline).
    let mut timeout = res.actor_timeout;
    let mut cut_by_deadline = false;
    if let Some(d) = deadline {
        let left = (d - now).to_std().unwrap_or_default();
        if left < timeout {
            timeout = left;
            cut_by_deadline = true;
        }
    }
    guard.stage(Stage::Invoking);
    let call_start = Instant::now();
    let call_deadline = call_start + timeout;
    let reply = s.runtime.invoke(body.clone(), call_deadline).await;
    guard.stage(Stage::Routing);

    // 5. Route.
    let outcome: Result<(), Failure> = match reply {
        Ok(Reply::Frames(frames)) => {
            m.runtime_duration
                .observe(call_start.elapsed().as_secs_f64());
            let fanout = frames.len() > 1;
            let mut result = Ok(());
            if frames.is_empty() {
                result = route_abort(s, log, env, hop).await;
            }
            for (i, frame) in frames.into_iter().enumerate() {
                if let Err(e) = route_frame(s, log, env, hop, i, fanout, frame).await {
                    result = Err(e);
                    break;
                }
            }
            result
        }
        Ok(Reply::Stream(mut stream)) => {
            let mut i = 0;
            let result = loop {
                match stream.next().await {
                    Ok(Some(SseEvent::Downstream(frame))) => {
                        if let Err(e) = route_frame(s, log, env, hop, i, true, *frame).await {
                            break Err(e);
                        }
                        i += 1;
                    }
                    Ok(Some(SseEvent::Upstream(payload))) => {
                        debug!(actor = %s.actor, envelope_id = %env.id, trace_id = %env.trace_id(), "upstream event");
                        if let Some(r) = &s.reporter {
                            r.report(Report::Upstream {
                                envelope_id: env.id.clone(),
                                trace_id: env.trace_id().to_owned(),
                                actor: s.actor.to_string(),
                                payload,
                            });
                        }
                    }
                    Ok(Some(SseEvent::Error(info))) => break Err(Failure::Handler(info)),
                    Ok(Some(SseEvent::Done)) | Ok(None) => break Ok(()),
                    Err(e) => break Err(Failure::Runtime(e)),
                }
            };
            m.runtime_duration
                .observe(call_start.elapsed().as_secs_f64());
            result
        }
        Ok(Reply::Abort) => {
            m.runtime_duration
                .observe(call_start.elapsed().as_secs_f64());
            route_abort(s, log, env, hop).await
        }
        Ok(Reply::BadRequest(info)) => {
            m.runtime_duration
                .observe(call_start.elapsed().as_secs_f64());
            Err(Failure::Rejected(info))
        }
        Ok(Reply::HandlerError(info)) => {
            m.runtime_duration
                .observe(call_start.elapsed().as_secs_f64());
            Err(Failure::Handler(info))
        }
        Err(e) => {
            m.runtime_duration
                .observe(call_start.elapsed().as_secs_f64());
            Err(Failure::Runtime(e))
        }
    };

    log.runtime = Some(call_start.elapsed());
    if let Err(f) = &outcome {
        log.error = Some(f.info());
    }

    // 6. Errors.
    match outcome {
        Ok(()) => {
            m.processed_success.inc();
            (Settle::Ack, false)
        }
        Err(Failure::Transport(e)) => (transport_failed(s, &e, attempt), false),
        Err(Failure::Rejected(info)) => {
            m.failed(FailReason::ParseError);
            warn!(actor = %s.actor, envelope_id = %env.id, trace_id = %env.trace_id(), error = %info.message, "runtime rejected the envelope");
            (
                sump_input(s, log, env, hop, Reason::ParseError, Some(info), attempt).await,
                false,
            )
        }
        Err(Failure::Runtime(RuntimeError::Timeout(_))) if cut_by_deadline => {
            s.runtime.reset();
            (sla_expired(s, log, env, hop).await, false)
        }
        Err(Failure::Runtime(RuntimeError::Timeout(t))) if res.crash_on_timeout => {
            s.runtime.reset();
            m.failed(FailReason::Timeout);
            let err = ErrorInfo::new(
                "Timeout",
                format!("runtime did not answer within {t:?} (deadline exceeded)"),
            );
            warn!(actor = %s.actor, envelope_id = %env.id, trace_id = %env.trace_id(), "runtime deadline exceeded; sending to sump and crashing");
            let settle = sump_input(s, log, env, hop, Reason::Timeout, Some(err), attempt).await;
            // Only crash once the envelope is safely in x-sump: never both x-sump and a
            // redelivery.
            let crash = matches!(settle, Settle::Ack);
            (settle, crash)
        }
        Err(Failure::Runtime(e)) => {
            if matches!(e, RuntimeError::RequestIdMismatch { .. }) {
                m.id_mismatch.inc();
            }
            if matches!(e, RuntimeError::Timeout(_)) {
                s.runtime.reset();
            }
            let reason = if matches!(e, RuntimeError::Timeout(_)) {
                FailReason::Timeout
            } else {
                FailReason::RuntimeError
            };
            let info = ErrorInfo::new(e.error_type(), e.to_string());
            failed_call(s, log, env, hop, attempt, info, reason).await
        }
        Err(Failure::Handler(info)) => {
            failed_call(s, log, env, hop, attempt, info, FailReason::RuntimeError).await
        }
    }
}

/// Why processing an envelope failed.
enum Failure {
    /// 400: the runtime could not use the envelope.
    Rejected(ErrorInfo),
    /// 500 or an SSE error event: the handler raised.
    Handler(ErrorInfo),
    /// The call itself failed.
    Runtime(RuntimeError),
    /// Publishing an output failed.
    Transport(TransportError),
}

impl Failure {
    fn info(&self) -> ErrorInfo {
        match self {
            Failure::Rejected(i) | Failure::Handler(i) => i.clone(),
            Failure::Runtime(e) => ErrorInfo::new(e.error_type(), e.to_string()),
            Failure::Transport(e) => ErrorInfo::new("TransportError", e.to_string()),
        }
    }
}

/// Retry while allowed, else x-sump.
async fn failed_call(
    s: &Shared,
    log: &mut HopLog,
    env: &Envelope,
    hop: usize,
    attempt: u32,
    info: ErrorInfo,
    reason: FailReason,
) -> (Settle, bool) {
    let res = &s.cfg.resiliency;
    let retryable = res.is_retryable(&info.kind);
    if retryable && attempt < res.max_attempts {
        let delay = res.backoff(attempt);
        debug!(actor = %s.actor, envelope_id = %env.id, trace_id = %env.trace_id(), attempt, ?delay, error = %info.message, "retrying");
        return (Settle::Retry(delay), false);
    }
    s.metrics.failed(reason);
    let status_reason = if !retryable {
        Reason::NonRetryableFailure
    } else if res.max_attempts > 1 {
        s.metrics.failed(FailReason::MaxRetriesExhausted);
        Reason::MaxRetriesExhausted
    } else {
        Reason::RuntimeError
    };
    warn!(actor = %s.actor, envelope_id = %env.id, trace_id = %env.trace_id(), attempt, error_type = %info.kind, error = %info.message, "handler failed; sending to sump");
    (
        sump_input(s, log, env, hop, status_reason, Some(info), attempt).await,
        false,
    )
}

/// Step 3 (and a call cut short by the deadline): x-sink with phase failed, reason Timeout,
/// payload untouched.
async fn sla_expired(s: &Shared, log: &mut HopLog, env: &Envelope, hop: usize) -> Settle {
    s.metrics.failed(FailReason::SlaExpired);
    debug!(actor = %s.actor, envelope_id = %env.id, trace_id = %env.trace_id(), "deadline passed; sending to sink as failed");
    let mut out = env.clone();
    let st = out.status_mut();
    st.phase = Some(Phase::Failed);
    st.reason = Some(Reason::Timeout);
    st.actor = Some(s.actor.to_string());
    st.updated_at = Some(now_rfc3339());
    st.error = Some(ErrorInfo::new(
        "Timeout",
        "deadline passed before processing finished",
    ));
    let msg = OutMessage {
        queue: s.sink_queue.clone(),
        id: format!("{}:{hop}:expired", env.id),
        body: Bytes::from(out.to_vec()),
    };
    settle_send(s, log, (msg, MessageType::Sink)).await
}

/// 204 (or no frames): the input goes to x-sink as succeeded.
async fn route_abort(
    s: &Shared,
    log: &mut HopLog,
    env: &Envelope,
    hop: usize,
) -> Result<(), Failure> {
    let mut out = env.clone();
    let st = out.status_mut();
    st.phase = Some(Phase::Succeeded);
    st.reason = Some(Reason::Completed);
    st.actor = Some(s.actor.to_string());
    st.updated_at = Some(now_rfc3339());
    let msg = OutMessage {
        queue: s.sink_queue.clone(),
        id: format!("{}:{hop}:abort", env.id),
        body: Bytes::from(out.to_vec()),
    };
    send(s, log, msg, MessageType::Sink)
        .await
        .map_err(Failure::Transport)
}

/// Step 5 for one frame: check the route rules, apply the policy chain, publish.
async fn route_frame(
    s: &Shared,
    log: &mut HopLog,
    input: &Envelope,
    hop: usize,
    index: usize,
    fanout: bool,
    frame: Frame,
) -> Result<(), Failure> {
    let msg_id = format!("{}:{hop}:{index}", input.id);
    let mut out = frame.into_envelope(input);
    if fanout {
        out.parent_id = Some(input.id.clone());
        out.id = child_id(&msg_id);
    }
    if let Err(v) = input.route.check_successor(&out.route) {
        s.metrics.failed(FailReason::RouteMismatch);
        warn!(actor = %s.actor, envelope_id = %input.id, trace_id = %input.trace_id(), error = %v, "runtime rewrote route history");
        let err = ErrorInfo::new("RouteMismatch", v.to_string());
        let (msg, ty) = sump_message(
            s,
            input.clone(),
            format!("{msg_id}:sump"),
            Reason::RouteMismatch,
            Some(err),
            0,
        );
        return send(s, log, msg, ty).await.map_err(Failure::Transport);
    }
    let mut to_sink = out.route.is_finished();
    if let Some(policy) = &s.policy {
        let rejected = |why: String| {
            s.metrics.failed(FailReason::PolicyRejected);
            warn!(actor = %s.actor, envelope_id = %input.id, trace_id = %input.trace_id(), reason = %why, "policy rejected a frame");
            why
        };
        let sump_reason = match policy.decide(input, &out).await {
            Ok(Decision::Keep) => None,
            Ok(Decision::ReplaceRoute(route)) => match input.route.check_successor(&route) {
                Ok(()) => {
                    out.route = route;
                    to_sink = out.route.is_finished();
                    None
                }
                Err(v) => Some((Reason::PolicyRejected, rejected(v.to_string()))),
            },
            Ok(Decision::Reject(why)) => Some((Reason::PolicyRejected, rejected(why))),
            Ok(Decision::SendToSink) => {
                to_sink = true;
                None
            }
            Ok(Decision::SendToSump(why)) => Some((Reason::PolicyRejected, rejected(why))),
            Err(e) => Some((Reason::PolicyRejected, rejected(e.to_string()))),
        };
        if let Some((reason, why)) = sump_reason {
            let err = ErrorInfo::new("PolicyRejected", why);
            let (msg, ty) = sump_message(s, out, format!("{msg_id}:sump"), reason, Some(err), 0);
            return send(s, log, msg, ty).await.map_err(Failure::Transport);
        }
    }
    let (queue, ty) = if to_sink {
        let st = out.status_mut();
        st.phase = Some(Phase::Succeeded);
        st.reason = Some(Reason::Completed);
        st.actor = Some(s.actor.to_string());
        st.updated_at = Some(now_rfc3339());
        (s.sink_queue.clone(), MessageType::Sink)
    } else {
        let queue = s.queue.sibling(&out.route.curr).map_err(|e| {
            Failure::Transport(TransportError::Queue {
                queue: out.route.curr.clone(),
                message: e.to_string(),
            })
        })?;
        (queue, MessageType::Routing)
    };
    debug!(actor = %s.actor, envelope_id = %out.id, trace_id = %out.trace_id(), %queue, "routing");
    let msg = OutMessage {
        queue,
        id: msg_id,
        body: Bytes::from(out.to_vec()),
    };
    send(s, log, msg, ty).await.map_err(Failure::Transport)
}

/// Fan-out children get fresh ids, derived from the output's message id so that a
/// redelivered input produces the same children.
fn child_id(msg_id: &str) -> String {
    uuid::Uuid::new_v5(&CHILD_ID_NS, msg_id.as_bytes()).to_string()
}

/// Send the input envelope to x-sump (failed, `reason`, `error`) and settle it.
async fn sump_input(
    s: &Shared,
    log: &mut HopLog,
    env: &Envelope,
    hop: usize,
    reason: Reason,
    error: Option<ErrorInfo>,
    attempt: u32,
) -> Settle {
    let id = format!("{}:{hop}:sump", env.id);
    settle_send(
        s,
        log,
        sump_message(s, env.clone(), id, reason, error, attempt),
    )
    .await
}

/// The x-sump message for `out` (the input envelope, or a rejected frame): failed status
/// with `reason` and `error`, everything else as it was.
fn sump_message(
    s: &Shared,
    mut out: Envelope,
    id: String,
    reason: Reason,
    error: Option<ErrorInfo>,
    attempt: u32,
) -> (OutMessage, MessageType) {
    let max_attempts = s.cfg.resiliency.max_attempts;
    let st = out.status_mut();
    st.phase = Some(Phase::Failed);
    st.reason = Some(reason);
    st.actor = Some(s.actor.to_string());
    st.updated_at = Some(now_rfc3339());
    if attempt > 0 {
        st.attempt = Some(attempt);
        st.max_attempts = Some(max_attempts);
    }
    if error.is_some() {
        st.error = error;
    }
    (
        OutMessage {
            queue: s.sump_queue.clone(),
            id,
            body: Bytes::from(out.to_vec()),
        },
        MessageType::Sump,
    )
}

/// Publish and settle: ack when accepted, retry later when the transport failed.
async fn settle_send(s: &Shared, log: &mut HopLog, (msg, ty): (OutMessage, MessageType)) -> Settle {
    match send(s, log, msg, ty).await {
        Ok(()) => {
            if ty == MessageType::Sump {
                s.metrics.processed_error.inc();
            } else {
                s.metrics.processed_success.inc();
            }
            Settle::Ack
        }
        Err(e) => transport_failed(s, &e, 1),
    }
}

fn transport_failed(s: &Shared, e: &TransportError, attempt: u32) -> Settle {
    s.metrics.failed(FailReason::TransportError);
    warn!(actor = %s.actor, error = %e, "publishing failed; the input will be redelivered");
    Settle::Retry(s.cfg.resiliency.backoff(attempt.max(1)))
}

async fn send(
    s: &Shared,
    log: &mut HopLog,
    msg: OutMessage,
    ty: MessageType,
) -> Result<(), TransportError> {
    let t = Instant::now();
    let len = msg.body.len();
    let queue = msg.queue.clone();
    s.transport.send(msg).await?;
    s.metrics.sent(queue.as_str(), ty, t.elapsed(), len);
    log.sent.push((queue, ty));
    Ok(())
}

/// The x-sump envelope for bytes that are not an envelope: the raw body as text.
fn unparseable_envelope(body: &[u8], e: &crate::envelope::EnvelopeError) -> Envelope {
    let text = String::from_utf8_lossy(body);
    // Deterministic id: a redelivered copy of the same bytes is deduplicated.
    let id = uuid::Uuid::new_v5(&CHILD_ID_NS, body).to_string();
    let payload = RawValue::from_string(serde_json::to_string(&text).expect("a string serialises"))
        .expect("a JSON string is JSON");
    let mut env = Envelope::new(id, Route::default(), payload);
    // Keep what can be salvaged from a well-formed but invalid envelope.
    if let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(h) = obj.get("headers").and_then(|h| h.as_object()) {
            env.headers = h.clone();
        }
    }
    env.status_mut().error = Some(ErrorInfo::new(
        if e.is_parse() {
            "ParseError"
        } else {
            "ValidationError"
        },
        e.to_string(),
    ));
    env
}

/// Run `work`, calling [`Acker::in_progress`] every [`Acker::progress_interval`] meanwhile
/// (transports with a redelivery timer, e.g. NATS ack_wait, would otherwise redeliver a
/// message whose handler runs longer than that timer).
async fn with_progress<T>(acker: &dyn Acker, work: impl std::future::Future<Output = T>) -> T {
    let Some(every) = acker.progress_interval().filter(|d| !d.is_zero()) else {
        return work.await;
    };
    tokio::pin!(work);
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                if let Err(e) = acker.in_progress().await {
                    debug!(error = %e, "in-progress ack failed");
                }
            }
        }
    }
}
