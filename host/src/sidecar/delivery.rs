//! One delivery, SPEC §5 steps 1–7: the I/O around the decisions of [`super::plan`] —
//! parse, call the runtime, ask the policy, then apply the plan: publish every output
//! together, then settle the input.

use std::future::Future;

use bytes::Bytes;
use chrono::Utc;
use tokio::time::Instant;
use tracing::{debug, field, info_span, warn, Instrument, Span};

use super::inflight::InflightGuard;
use super::plan::{self, Answer, Call, Hop, Output, Plan, Processed, Routed, Settlement};
use super::report::{HopLog, HopReport, Report};
use super::{Shared, Stage};
use crate::envelope::{child_traceparent, Envelope, ErrorInfo, Frame, HEADER_TRACEPARENT};
use crate::metrics::{FailReason, MessageType};
use crate::runtime::{EventStream, Reply, SseEvent};
use crate::transport::{Acker, Delivery, OutMessage};

/// A delivery whose outputs are all published (or that is to be retried): what is left is
/// to settle it with the broker, which [`settle`] does.
pub(super) struct Handled {
    settle: Settlement,
    acker: Box<dyn Acker>,
    guard: InflightGuard,
    start: Instant,
    body_len: usize,
    attempt: u32,
    /// For the gateway's hop report: the input and when it was received.
    report: Option<(Envelope, chrono::DateTime<Utc>)>,
    log: HopLog,
    span: Span,
}

impl Handled {
    /// The sidecar stops once this delivery is settled.
    pub fn exits(&self) -> bool {
        self.settle == Settlement::AckThenExit
    }
}

/// Steps 1–6 for one delivery, inside the delivery's span (envelope id, trace id, actor,
/// and the hop's own span id when the envelope carries a `traceparent`).
pub(super) fn handle(s: &Shared, delivery: Delivery) -> impl Future<Output = Handled> + '_ {
    let span = info_span!(
        "delivery",
        actor = %s.actor,
        envelope_id = field::Empty,
        trace_id = field::Empty,
        span_id = field::Empty,
    );
    handle_in(s, delivery, span.clone()).instrument(span)
}

/// What [`process`] works with for one delivery.
struct Ctx<'a> {
    s: &'a Shared,
    /// `hop.input` is the envelope with its processing status stamped.
    hop: Hop<'a>,
    guard: &'a InflightGuard,
}

async fn handle_in(s: &Shared, delivery: Delivery, span: Span) -> Handled {
    let start = Instant::now();
    let received_at = s.reporter.as_ref().map(|_| Utc::now());
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
    let (settle, report) = match Envelope::parse(&body) {
        Err(e) => {
            let input = plan::unparseable_envelope(&body, &e);
            let hop = Hop {
                rules: &s.rules,
                input: &input,
                hop: 0,
                attempt,
                now: Utc::now(),
                traceparent: None,
            };
            let plan = plan::unparseable(&hop, &e);
            (apply(s, &mut log, plan).await, None)
        }
        Ok(mut env) => {
            guard.identify(&env.id, env.trace_id());
            span.record("envelope_id", env.id.as_str());
            span.record("trace_id", env.trace_id());
            if s.cfg.is_end_actor {
                debug!("end of route");
                let settle = apply(s, &mut log, plan::end_of_route(&s.rules)).await;
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
                        now,
                        traceparent,
                    },
                    guard: &guard,
                };
                // Keep the broker from redelivering while we work (NATS: +WPI every ack_wait/2).
                let settle = with_progress(acker.as_ref(), process(cx, &mut log)).await;
                (settle, Some(env))
            }
        }
    };
    Handled {
        settle,
        acker,
        guard,
        start,
        body_len: body.len(),
        attempt,
        report: report.zip(received_at),
        log,
        span,
    }
}

/// A new span id for this hop; the outgoing `traceparent` names it as the parent.
fn hop_traceparent(env: &Envelope, span: &Span) -> Option<String> {
    let parent = env.headers.get(HEADER_TRACEPARENT)?.as_str()?;
    let span_id = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
    let tp = child_traceparent(parent, span_id)?;
    span.record("span_id", field::display(format_args!("{span_id:016x}")));
    Some(tp)
}

/// Steps 2–6 for a parsed envelope: returns how to settle the input.
async fn process(mut cx: Ctx<'_>, log: &mut HopLog) -> Settlement {
    let s = cx.s;
    let invoke = match plan::before_invoke(&cx.hop) {
        Ok(invoke) => invoke,
        Err(plan) => return apply(s, log, *plan).await,
    };
    cx.guard.stage(Stage::Invoking);
    // The handler sees the stamped status: one serialisation of the envelope.
    let body = Bytes::from(cx.hop.input.to_vec());
    let call_start = Instant::now();
    let reply = s.runtime.invoke(body, call_start + invoke.timeout).await;
    cx.guard.stage(Stage::Routing);
    let called = |log: &mut HopLog| {
        let took = call_start.elapsed();
        s.metrics.runtime_duration.observe(took.as_secs_f64());
        log.runtime = Some(took);
    };
    let answer = match reply {
        Ok(Reply::Frames(frames)) if frames.is_empty() => {
            called(log);
            Answer::Abort
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
        Err(e) => {
            called(log);
            Answer::Runtime(e)
        }
    };
    cx.hop.now = Utc::now();
    let plan = plan::after_invoke(&cx.hop, Call { invoke, answer });
    apply(s, log, plan).await
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
            let routed = route_frames(cx, batch, index).await;
            index += n;
            count_failures(cx.s, &routed.failures);
            if log.paused.is_none() {
                log.paused = routed.paused;
            }
            if let Err(info) = publish(cx.s, log, routed.outputs).await {
                return Answer::Unpublished(info);
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
            trace_id: cx.hop.input.trace_id().to_owned(),
            actor: cx.s.actor.to_string(),
            payload,
        });
    }
}

/// Carry out a plan up to the settlement: count and log its failures, publish every output
/// together, count the outcome. Returns how to settle the input (a retry when publishing
/// failed).
async fn apply(s: &Shared, log: &mut HopLog, plan: Plan) -> Settlement {
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
    if publish(s, log, outputs).await.is_err() {
        return Settlement::Retry(on_publish_failure);
    }
    match processed {
        Some(Processed::Success) => s.metrics.processed_success.inc(),
        Some(Processed::Error) => s.metrics.processed_error.inc(),
        None => 0,
    };
    settle
}

/// A failed envelope: the counter and the DEBUG line together (the counter is the
/// per-message record; nothing per message is logged above DEBUG).
fn count_failures(s: &Shared, failures: &[plan::Failed]) {
    for f in failures {
        s.metrics.failed(f.reason);
        debug!(reason = f.reason.as_str(), error = %f.message, "envelope failed");
    }
}

/// Publish all outputs together (one `send_all`: the broker's acceptances are awaited
/// together). A failure is counted, logged (the input is redelivered: a rare, recovered
/// event) and returned for the hop report.
async fn publish(s: &Shared, log: &mut HopLog, outputs: Vec<Output>) -> Result<(), ErrorInfo> {
    if outputs.is_empty() {
        return Ok(());
    }
    let mut sent = Vec::with_capacity(outputs.len());
    let msgs: Vec<OutMessage> = outputs
        .into_iter()
        .map(|o| {
            let body = Bytes::from(o.envelope.to_vec());
            sent.push((o.queue.clone(), o.kind, body.len()));
            debug!(queue = %o.queue, kind = o.kind.as_str(), "publishing");
            OutMessage {
                queue: o.queue,
                id: o.id,
                body,
            }
        })
        .collect();
    let t = Instant::now();
    match s.transport.send_all(msgs).await {
        Ok(()) => {
            let took = t.elapsed();
            for (queue, kind, len) in sent {
                s.metrics.sent(queue.as_str(), kind, took, len);
                log.sent.push((queue, kind));
            }
            Ok(())
        }
        Err(e) => {
            s.metrics.failed(FailReason::TransportError);
            warn!(error = %e, "publishing failed; the input will be redelivered");
            let info = ErrorInfo::new("TransportError", e.to_string());
            log.error = Some(info.clone());
            Err(info)
        }
    }
}

/// Step 7: ack (or nack for a retry) the delivery, then record the hop.
pub(super) fn settle(s: &Shared, h: Handled) -> impl Future<Output = ()> + '_ {
    let span = h.span.clone();
    settle_in(s, h).instrument(span)
}

async fn settle_in(s: &Shared, h: Handled) {
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
            trace_id: env.trace_id().to_owned(),
            envelope_id: env.id,
            parent_id: env.parent_id,
            actor: s.actor.to_string(),
            received_at,
            duration: took,
            runtime,
            sent,
            retried: matches!(settle, Settlement::Retry(_)),
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
