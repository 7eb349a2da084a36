//! One delivery, SPEC §5 steps 1–7: the I/O around the decisions of [`super::plan`] —
//! parse, call the runtime, ask the policy, then apply the plan: publish every output
//! together, then settle the input.

use std::future::Future;

use bytes::Bytes;
use chrono::Utc;
use tokio::time::Instant;
use tracing::{debug, error, field, info_span, warn, Instrument, Span};

use super::inflight::InflightGuard;
use super::msgid::Digest;
use super::plan::{self, Answer, Call, Hop, Output, Plan, Processed, Routed, Settlement};
use super::report::{HopLog, HopReport, Report};
use super::{Exit, Shared, Stage};
use crate::envelope::{child_traceparent, Envelope, ErrorInfo, Frame, HEADER_TRACEPARENT};
use crate::metrics::{FailReason, MessageType};
use crate::runtime::{EventStream, Reply, SseEvent};
use crate::transport::{Acker, OutMessage, TransportError};

/// A handled delivery before its acknowledgement is attached ([`Outcome::with`]).
pub(super) struct Outcome {
    settle: Settlement,
    guard: InflightGuard,
    start: Instant,
    body_len: usize,
    attempt: u32,
    /// For the gateway's hop report: the input and when it was received.
    report: Option<(Envelope, chrono::DateTime<Utc>)>,
    log: HopLog,
    span: Span,
}

impl Outcome {
    pub fn with(self, acker: Box<dyn Acker>) -> Handled {
        Handled {
            outcome: self,
            acker,
        }
    }
}

/// A delivery whose outputs are all published (or that is to be retried): what is left is
/// to settle it with the broker, which [`settle`] does.
pub(super) struct Handled {
    outcome: Outcome,
    acker: Box<dyn Acker>,
}

impl Handled {
    /// The sidecar stops once this delivery is settled.
    pub fn exits(&self) -> Option<Exit> {
        match self.outcome.settle {
            Settlement::AckThenExit => Some(Exit::RuntimeTimeout),
            Settlement::HandBack => Some(Exit::RuntimeLost),
            Settlement::Ack | Settlement::Retry(_) => None,
        }
    }
}

/// Steps 1–6 for one delivery, inside the delivery's span (envelope id, trace id, actor,
/// and the hop's own span id when the envelope carries a `traceparent`).
pub(super) fn handle<'a>(
    s: &'a Shared,
    body: Bytes,
    attempt: u32,
    acker: &'a dyn Acker,
) -> impl Future<Output = Outcome> + 'a {
    let span = info_span!(
        "delivery",
        actor = %s.actor,
        envelope_id = field::Empty,
        trace_id = field::Empty,
        span_id = field::Empty,
    );
    handle_in(s, body, attempt, acker).instrument(span)
}

/// What [`process`] works with for one delivery.
struct Ctx<'a> {
    s: &'a Shared,
    /// `hop.input` is the envelope with its processing status stamped.
    hop: Hop<'a>,
    guard: &'a InflightGuard,
}

/// Runs inside the delivery's span ([`handle`]).
async fn handle_in(s: &Shared, body: Bytes, attempt: u32, acker: &dyn Acker) -> Outcome {
    let span = Span::current();
    let start = Instant::now();
    let received_at = s.reporter.as_ref().map(|_| Utc::now());
    let m = &s.metrics;
    m.received.inc();
    m.size_received.observe(body.len() as f64);
    m.active.inc();
    let guard = s.inflight.enter(&s.actor);
    let digest = Digest::of(&body);
    let mut log = HopLog::default();
    let (settle, report) = match Envelope::parse(&body) {
        Err(e) => {
            let input = crate::envelope::unparseable_envelope(&body, &e);
            let hop = Hop {
                rules: &s.rules,
                input: &input,
                hop: 0,
                attempt,
                digest,
                now: Utc::now(),
                traceparent: None,
            };
            let plan = plan::unparseable(&hop, &e);
            (apply(s, &hop, &mut log, plan).await, None)
        }
        Ok(mut env) => {
            guard.identify(&env.id, &env.trace_id());
            span.record("envelope_id", env.id.as_str());
            span.record("trace_id", env.trace_id().as_ref());
            if s.cfg.is_end_actor {
                debug!("end of route");
                let hop = Hop {
                    rules: &s.rules,
                    input: &env,
                    hop: env.route.prev.len(),
                    attempt,
                    digest,
                    now: Utc::now(),
                    traceparent: None,
                };
                let settle = apply(s, &hop, &mut log, plan::end_of_route(&s.rules)).await;
                if let Some(r) = s.reporter.as_ref().filter(|_| plan::reports_wanted(&env)) {
                    r.report(Report::Final {
                        actor: s.actor.to_string(),
                        envelope: env,
                    });
                }
                (settle, None)
            } else {
                let now = Utc::now();
                let traceparent = hop_traceparent(&env, &span);
                plan::stamp_processing(&s.rules, &mut env, attempt, now);
                let cx = Ctx {
                    s,
                    hop: Hop {
                        rules: &s.rules,
                        input: &env,
                        hop: env.route.prev.len(),
                        attempt,
                        digest,
                        now,
                        traceparent,
                    },
                    guard: &guard,
                };
                // Keep the broker from redelivering while we work (NATS: +WPI every ack_wait/2).
                let settle = with_progress(acker, process(cx, &mut log)).await;
                (settle, Some(env))
            }
        }
    };
    Outcome {
        settle,
        guard,
        start,
        body_len: body.len(),
        attempt,
        report: report.zip(received_at),
        log,
        span,
    }
}

/// A panic while handling this delivery was caught (a bug; the worker goes on): count it,
/// log it with the envelope id, and fail the delivery — retried while attempts are left (the
/// cause may be passing), then sent to x-sump as the bytes that were received.
pub(super) async fn panicked(s: &Shared, body: &Bytes, attempt: u32, panic: &str) -> Outcome {
    s.metrics.panics.inc();
    let envelope_id = Envelope::parse(body).map(|e| e.id).unwrap_or_default();
    let span = info_span!("delivery", actor = %s.actor, %envelope_id);
    span.in_scope(|| {
        error!(%panic, attempt, "panic while handling a delivery (a bug): the delivery is failed, the worker goes on");
    });
    let guard = s.inflight.enter(&s.actor);
    guard.identify(&envelope_id, "");
    let mut log = HopLog::default();
    let res = &s.rules.resiliency;
    let settle = if attempt < res.max_attempts {
        Settlement::Retry(res.backoff(attempt.max(1)))
    } else {
        let input = crate::envelope::raw_envelope(
            body,
            ErrorInfo::new("SidecarPanic", format!("the sidecar panicked: {panic}")),
        );
        let hop = Hop {
            rules: &s.rules,
            input: &input,
            hop: 0,
            attempt,
            digest: Digest::of(body),
            now: Utc::now(),
            traceparent: None,
        };
        let plan = plan::panicked(&hop);
        apply(s, &hop, &mut log, plan)
            .instrument(span.clone())
            .await
    };
    Outcome {
        settle,
        guard,
        start: Instant::now(),
        body_len: body.len(),
        attempt,
        report: None,
        log,
        span,
    }
}

/// A new span id for this hop; the outgoing `traceparent` names it as the parent.
fn hop_traceparent(env: &Envelope, span: &Span) -> Option<String> {
    let parent = env.headers.str(HEADER_TRACEPARENT)?;
    let span_id = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
    let tp = child_traceparent(&parent, span_id)?;
    span.record("span_id", field::display(format_args!("{span_id:016x}")));
    Some(tp)
}

/// Steps 2–6 for a parsed envelope: returns how to settle the input.
async fn process(mut cx: Ctx<'_>, log: &mut HopLog) -> Settlement {
    let s = cx.s;
    // Times this delivery's call lost its runtime mid-way (see `RuntimeError::is_lost`).
    let mut lost = 0;
    // The handler sees the stamped status: one serialisation of the envelope.
    let body = Bytes::from(cx.hop.input.to_vec());
    let (invoke, reply, call_start, gave_up) = loop {
        if s.canceled
            .as_ref()
            .is_some_and(|c| c.holds_task_of(cx.hop.input))
        {
            debug!("task canceled: to x-sink without calling the runtime");
            s.metrics.canceled.inc();
            return apply(s, &cx.hop, log, plan::canceled(&cx.hop)).await;
        }
        let invoke = match plan::before_invoke(&cx.hop) {
            Ok(invoke) => invoke,
            Err(plan) => return apply(s, &cx.hop, log, *plan).await,
        };
        cx.guard.stage(Stage::Invoking);
        let call_start = Instant::now();
        let reply = s
            .runtime
            .invoke(body.clone(), call_start + invoke.timeout)
            .await;
        match reply {
            Err(e) if e.is_unreachable() => {
                if e.is_lost() {
                    lost += 1;
                    if lost >= s.rules.resiliency.max_attempts {
                        // The runtime keeps going away on this envelope: the handler is
                        // probably what kills it (out of memory, a crash).
                        break (invoke, Err(e), call_start, true);
                    }
                }
                // Not a handler failure: hold the delivery (uncounted) until the runtime
                // is back, then call it again.
                debug!(error = %e, "runtime unreachable; holding the delivery until it is back");
                cx.guard.stage(Stage::WaitingForRuntime);
                s.gate.down();
                if !s.gate.wait_up().await {
                    return Settlement::HandBack;
                }
                cx.hop.now = Utc::now();
            }
            reply => break (invoke, reply, call_start, false),
        }
    };
    cx.guard.stage(Stage::Routing);
    let called = |log: &mut HopLog| {
        let took = call_start.elapsed();
        s.metrics.runtime_duration.observe(took.as_secs_f64());
        log.runtime = Some(took);
    };
    let max = s.rules.max_frames;
    let answer = match reply {
        Ok(Reply::Frames(frames)) if frames.is_empty() => {
            called(log);
            Answer::Abort
        }
        Ok(Reply::Frames(frames)) if frames.len() > max => {
            called(log);
            Answer::TooManyFrames
        }
        Ok(Reply::Frames(frames)) => {
            called(log);
            Answer::Frames(route_frames(&cx, frames, 0).await)
        }
        Ok(Reply::Stream(stream)) => {
            let answer = stream_frames(&cx, log, stream).await;
            called(log);
            answer
        }
        Ok(Reply::Abort) => {
            called(log);
            Answer::Abort
        }
        Ok(Reply::BadRequest(info)) => {
            called(log);
            Answer::Rejected(info)
        }
        Ok(Reply::HandlerError(info)) => {
            called(log);
            Answer::Handler(info)
        }
        Err(e) if gave_up => {
            called(log);
            Answer::RuntimeLost(e)
        }
        Err(e) => {
            called(log);
            Answer::Runtime(e)
        }
    };
    cx.hop.now = Utc::now();
    let plan = plan::after_invoke(&cx.hop, Call { invoke, answer });
    apply(s, &cx.hop, log, plan).await
}

/// Route frames (numbered from `first`): the pure rules per frame, with the policy's
/// decision for those that keep the route rules.
async fn route_frames(cx: &Ctx<'_>, frames: Vec<Frame>, first: usize) -> Routed {
    let mut routed = Routed::default();
    for (i, frame) in frames.into_iter().enumerate() {
        let cand = plan::candidate(&cx.hop, first + i, frame);
        let decision = match &cx.s.policy {
            Some(p) if cand.wants_policy() => Some(
                p.decide(cx.hop.input, &cand.envelope)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            _ => None,
        };
        plan::route_frame(&cx.hop, &mut routed, cand, decision);
    }
    routed
}

/// A streaming answer. Frames arrive over time and downstream actors should not wait for
/// the whole stream, so each batch of frames that has already arrived (everything buffered
/// when the first of them is read) is routed and published together, then the next batch
/// is awaited. The input is settled once the stream has ended (a frame published before an
/// `error` event stays published; a retry republishes it under the same id).
async fn stream_frames(cx: &Ctx<'_>, log: &mut HopLog, mut stream: Box<dyn EventStream>) -> Answer {
    let mut index = 0;
    loop {
        let mut batch = Vec::new();
        let mut event = stream.next().await;
        let end = loop {
            match event {
                Ok(Some(SseEvent::Downstream(frame))) => batch.push(*frame),
                Ok(Some(SseEvent::Upstream(payload))) => upstream(cx, payload),
                Ok(Some(SseEvent::Error(info))) => break Some(Answer::Handler(info)),
                Ok(Some(SseEvent::Done)) | Ok(None) => {
                    break Some(Answer::Frames(Routed::default()))
                }
                Err(e) => break Some(Answer::Runtime(e)),
            }
            match stream.next_buffered() {
                Some(next) => event = next,
                None => break None,
            }
        };
        if !batch.is_empty() {
            let n = batch.len();
            if index + n > cx.s.rules.max_frames {
                // The rest of the stream is not read: the call is abandoned.
                return Answer::TooManyFrames;
            }
            let routed = route_frames(cx, batch, index).await;
            index += n;
            count_failures(cx.s, &routed.failures);
            if log.paused.is_none() {
                log.paused = routed.paused;
            }
            match publish(cx.s, log, routed.outputs).await {
                Ok(()) => {}
                Err(Unpublished::Later(info)) => return Answer::Unpublished(info),
                Err(Unpublished::Never(e)) => return Answer::Unsendable(e),
            }
        }
        if let Some(answer) = end {
            return answer;
        }
    }
}

fn upstream(cx: &Ctx<'_>, payload: serde_json::Value) {
    debug!("upstream event");
    if let Some(r) =
        cx.s.reporter
            .as_ref()
            .filter(|_| plan::reports_wanted(cx.hop.input))
    {
        r.report(Report::Upstream {
            envelope_id: cx.hop.input.id.clone(),
            trace_id: cx.hop.input.trace_id().into_owned(),
            actor: cx.s.actor.to_string(),
            payload,
        });
    }
}

/// Carry out a plan up to the settlement: count and log its failures, publish every output
/// together, count the outcome. Returns how to settle the input (a retry when publishing
/// failed and may work later; when it can never work, the input goes to x-sump instead).
async fn apply(s: &Shared, h: &Hop<'_>, log: &mut HopLog, plan: Plan) -> Settlement {
    let Plan {
        outputs,
        settle,
        processed,
        failures,
        error,
        reset_runtime,
        id_mismatch,
        on_publish_failure,
        paused,
    } = plan;
    count_failures(s, &failures);
    if id_mismatch {
        s.metrics.id_mismatch.inc();
    }
    if reset_runtime {
        s.runtime.reset();
    }
    if error.is_some() {
        log.error = error;
    }
    if paused.is_some() {
        log.paused = paused;
    }
    match publish(s, log, outputs).await {
        Ok(()) => {}
        Err(Unpublished::Later(_)) => return Settlement::Retry(on_publish_failure),
        Err(Unpublished::Never(e)) => return Box::pin(unsendable(s, h, log, &e)).await,
    }
    match processed {
        Some(Processed::Success) => s.metrics.processed_success.inc(),
        Some(Processed::Error) => s.metrics.processed_error.inc(),
        None => 0,
    };
    settle
}

/// An output of this delivery can never be sent: the input goes to x-sump (cut to fit the
/// transport), then is acked. If even that cannot be sent, the input is retried later (an
/// x-sump the transport refuses is a configuration fault, not a reason to drop it).
async fn unsendable(s: &Shared, h: &Hop<'_>, log: &mut HopLog, e: &TransportError) -> Settlement {
    let plan = plan::unsendable(h, &e.to_string());
    let retry = plan.on_publish_failure;
    count_failures(s, &plan.failures);
    log.error = plan.error.clone();
    match publish(s, log, plan.outputs).await {
        Ok(()) => {
            s.metrics.processed_error.inc();
            plan.settle
        }
        Err(_) => {
            warn!("the x-sump copy of an unsendable input could not be sent either; retrying it later");
            Settlement::Retry(retry)
        }
    }
}

/// A failure to count (`messages_failed_total{reason}`) and log at DEBUG, together.
fn count_failures(s: &Shared, failures: &[plan::Failed]) {
    for f in failures {
        s.metrics.failed(f.reason);
        debug!(reason = f.reason.as_str(), error = %f.message, "envelope failed");
    }
}

/// Why outputs were not published.
enum Unpublished {
    /// The broker may take them later (down, timed out): retry the input.
    Later(ErrorInfo),
    /// The broker can never take one of them (too large, malformed).
    Never(TransportError),
}

/// Publish all outputs together (one `send_all`: the broker's acceptances are awaited
/// together). A failure is counted and logged (a retried input is a rare, recovered event).
/// Outputs the broker dropped as duplicates (a redelivered input republishing them under
/// the same ids) are counted and logged at DEBUG.
async fn publish(s: &Shared, log: &mut HopLog, outputs: Vec<Output>) -> Result<(), Unpublished> {
    if outputs.is_empty() {
        return Ok(());
    }
    let mut sent = Vec::with_capacity(outputs.len());
    let msgs: Vec<OutMessage> = outputs
        .into_iter()
        .map(|o| {
            let body = Bytes::from(o.envelope.to_vec());
            sent.push((o.queue.clone(), o.kind, body.len(), o.envelope.id));
            debug!(queue = %o.queue, kind = o.kind.as_str(), "publishing");
            OutMessage {
                queue: o.queue,
                id: o.id,
                body,
            }
        })
        .collect();
    let ids: Vec<String> = msgs.iter().map(|m| m.id.clone()).collect();
    let t = Instant::now();
    match s.transport.send_all(msgs).await {
        Ok(accepted) => {
            let took = t.elapsed();
            for i in accepted.duplicates {
                s.metrics.duplicates.inc();
                if let (Some((queue, _, _, envelope_id)), Some(msg_id)) = (sent.get(i), ids.get(i))
                {
                    debug!(%queue, %envelope_id, %msg_id, "the broker already had this output (a redelivery): not stored twice");
                }
            }
            for (queue, kind, len, _) in sent {
                s.metrics.sent(queue.as_str(), kind, took, len);
                log.sent.push((queue, kind));
            }
            Ok(())
        }
        Err(e) if !e.is_retryable() => {
            // Counted with the x-sump plan that follows (`plan::unsendable`).
            debug!(error = %e, "an output can never be sent; the input goes to x-sump");
            Err(Unpublished::Never(e))
        }
        Err(e) => {
            s.metrics.failed(FailReason::TransportError);
            warn!(error = %e, "publishing failed; the input will be redelivered");
            let info = ErrorInfo::new("TransportError", e.to_string());
            log.error = Some(info.clone());
            Err(Unpublished::Later(info))
        }
    }
}

/// Step 7: ack (or nack for a retry) the delivery, then record the hop.
pub(super) fn settle(s: &Shared, h: Handled) -> impl Future<Output = ()> + '_ {
    let span = h.outcome.span.clone();
    settle_in(s, h).instrument(span)
}

async fn settle_in(s: &Shared, h: Handled) {
    let Handled { outcome, acker } = h;
    let Outcome {
        settle,
        guard,
        start,
        body_len,
        attempt,
        report,
        log,
        ..
    } = outcome;
    let m = &s.metrics;
    guard.stage(Stage::Acking);
    let settled = match settle {
        Settlement::Ack | Settlement::AckThenExit => acker.ack().await,
        Settlement::Retry(delay) => {
            let delay = s.rules.resiliency.jittered(delay, unit_sample());
            debug!(attempt, ?delay, "retrying");
            m.sent(
                s.queue.as_str(),
                MessageType::Retry,
                std::time::Duration::ZERO,
                body_len,
            );
            m.processed_retry.inc();
            acker.nack(delay).await
        }
        // The runtime is gone: another replica (or this one, restarted) takes it.
        Settlement::HandBack => acker.nack(std::time::Duration::ZERO).await,
    };
    if let Err(e) = settled {
        // The broker redelivers; deterministic ids keep the outputs from doubling.
        m.failed(FailReason::TransportError);
        warn!(error = %e, "settling the delivery failed; it will be redelivered");
    }
    let took = start.elapsed();
    m.processing_duration.observe(took.as_secs_f64());
    m.active.dec();
    drop(guard);
    let report = report.filter(|(env, _)| plan::reports_wanted(env));
    if let (Some(r), Some((env, received_at))) = (&s.reporter, report) {
        let HopLog {
            sent,
            runtime,
            error,
            paused,
        } = log;
        r.report(Report::Hop(HopReport {
            actors_completed: env.route.prev.len() + 1,
            total_actors: env.route.actors().count(),
            trace_id: env.trace_id().into_owned(),
            envelope_id: env.id,
            parent_id: env.parent_id,
            actor: s.actor.to_string(),
            received_at,
            duration: took,
            runtime,
            sent,
            retried: matches!(settle, Settlement::Retry(_) | Settlement::HandBack),
            attempt,
            error,
            paused,
        }));
    }
}

/// A random number in [0, 1) for the retry jitter.
fn unit_sample() -> f64 {
    (uuid::Uuid::new_v4().as_u64_pair().0 >> 11) as f64 / (1u64 << 53) as f64
}

/// Run `work`, calling [`Acker::in_progress`] every [`Acker::progress_interval`] meanwhile
/// (transports with a redelivery timer, e.g. NATS ack_wait, would otherwise redeliver a
/// message whose handler runs longer than that timer).
async fn with_progress<T>(acker: &dyn Acker, work: impl Future<Output = T>) -> T {
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
