//! The decisions of one delivery, as pure functions (no I/O, no clock, no runtime): what the
//! input, the runtime's answer and the policy's decisions mean — every outgoing message and
//! how the input is settled — written down as a [`Plan`] that `delivery.rs` applies.
//!
//! Steps of SPEC §5 decided here: route check (2), deadline (3), bounded redelivery, the
//! timeout of the call (4), route rules, policy outcomes, sink/sump shapes (5), retries and
//! the x-sump fallback (6), and how the input is settled (7).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;

use super::msgid::{Digest, MsgId};
use crate::config::{Resiliency, SidecarConfig};
use crate::envelope::{
    sump_payload, Envelope, EnvelopeError, ErrorInfo, Frame, Phase, Reason, RouteViolation, Status,
    HEADER_TRACEPARENT,
};
use crate::metrics::{FailReason, MessageType};
use crate::plugin::Decision;
use crate::queue::{InvalidName, QueueName};
use crate::runtime::RuntimeError;

/// `{"<logical actor>": "<physical actor>"}`: the next hop to `<logical>` goes to the queue
/// of `<physical>` instead (the route keeps the logical name).
pub(crate) const HEADER_ROUTE_OVERRIDE: &str = "x-asya-route-override";
/// Audit of applied overrides: `{"<logical>": {"target": "<physical>", "by": "<actor>"}}`.
pub(crate) const HEADER_ROUTE_RESOLVED: &str = "x-asya-route-resolved";
/// `"<actor>"`: where a handler failure goes instead of x-sump.
pub(crate) const HEADER_ON_ERROR: &str = "_on_error";
/// `"off"`: no gateway reports for this envelope.
pub(crate) const HEADER_MESH_STATUS: &str = "x-asya-mesh-status";
/// On a frame: the task pauses; the value is the pause metadata for the gateway.
pub(crate) const HEADER_PAUSE: &str = "x-asya-pause";
/// The sibling queue where paused frames are parked (until the gateway resumes them).
pub(crate) const PAUSE_ACTOR: &str = "x-pause";

/// `x-asya-mesh-status: off` turns the gateway's reports off for an envelope.
pub(crate) fn reports_wanted(env: &Envelope) -> bool {
    env.headers.str(HEADER_MESH_STATUS).as_deref() != Some("off")
}

/// The physical actor `x-asya-route-override` names for `logical`, when it names one.
fn route_override(env: &Envelope, logical: &str) -> Option<String> {
    match env
        .headers
        .value(HEADER_ROUTE_OVERRIDE)?
        .get_mut(logical)?
        .take()
    {
        Value::String(t) if !t.is_empty() => Some(t),
        _ => None,
    }
}

/// What the decisions need from the sidecar's configuration.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub actor: Arc<str>,
    /// This actor's queue; the others are its siblings.
    pub queue: QueueName,
    pub sink_queue: QueueName,
    pub sump_queue: QueueName,
    pub resiliency: Resiliency,
    /// `ASYA_MAX_HOPS`.
    pub max_hops: usize,
    /// `ASYA_MAX_FRAMES`.
    pub max_frames: usize,
    /// The largest message the transport accepts, when it says (x-sump copies are cut to
    /// fit it).
    pub max_output_bytes: Option<usize>,
}

impl Rules {
    pub fn new(cfg: &SidecarConfig) -> Result<Self, InvalidName> {
        let queue = cfg.queue()?;
        Ok(Rules {
            actor: Arc::from(cfg.actor.as_str()),
            sink_queue: queue.sibling(&cfg.ends.sink)?,
            sump_queue: queue.sibling(&cfg.ends.sump)?,
            queue,
            resiliency: cfg.resiliency.clone(),
            max_hops: cfg.max_hops,
            max_frames: cfg.max_frames,
            max_output_bytes: None,
        })
    }
}

/// Everything a decision about one delivery looks at (the per-delivery context).
#[derive(Debug, Clone)]
pub(crate) struct Hop<'a> {
    pub rules: &'a Rules,
    pub input: &'a Envelope,
    /// This actor's position in the route (`route.prev.len()`).
    pub hop: usize,
    /// Delivery count of the input (1 = first delivery).
    pub attempt: u32,
    /// Of the input message's bytes: part of every message id this hop sends.
    pub digest: Digest,
    /// The time of the decision: deadline checks and `status.updated_at`.
    pub now: DateTime<Utc>,
    /// `traceparent` of every message this hop sends (the hop's span as the parent);
    /// `None` passes the input's header on unchanged.
    pub traceparent: Option<String>,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub kind: MessageType,
    pub queue: QueueName,
    /// Deduplication id ([`MsgId`]).
    pub id: String,
    pub envelope: Envelope,
}

/// How the input delivery is settled once every output was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settlement {
    Ack,
    /// Hand the input back for redelivery after the delay.
    Retry(Duration),
    /// Ack, then stop the sidecar (the runtime timed out with crash-on-timeout; the input is
    /// safely in x-sump, so it is never both in x-sump and redelivered).
    AckThenExit,
    /// Hand the input back at once (uncounted by us: the runtime is gone, not the handler
    /// failing), then stop the sidecar.
    HandBack,
}

/// Which `processed` counter a delivery adds to once its outputs are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Processed {
    Success,
    Error,
}

/// A failure to count (`messages_failed_total{reason}`) and log at DEBUG, together.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failed {
    pub reason: FailReason,
    pub message: String,
}

/// Everything one delivery does, decided before any of it is done.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Published together; the input is settled only after all were accepted.
    pub outputs: Vec<Output>,
    pub settle: Settlement,
    /// Counted once the outputs were accepted (`None`: a retry, counted when settling).
    pub processed: Option<Processed>,
    pub failures: Vec<Failed>,
    /// The error of the hop, for the gateway's hop report.
    pub error: Option<ErrorInfo>,
    /// Drop the runtime's pooled connections (it timed out and may still answer late).
    pub reset_runtime: bool,
    /// The runtime answered another request's id.
    pub id_mismatch: bool,
    /// The redelivery delay when publishing the outputs fails.
    pub on_publish_failure: Duration,
    /// A frame carried `x-asya-pause` (its value): the task is reported paused.
    pub paused: Option<Value>,
}

impl Plan {
    fn new(rules: &Rules, settle: Settlement, processed: Option<Processed>) -> Self {
        Plan {
            outputs: Vec::new(),
            settle,
            processed,
            failures: Vec::new(),
            error: None,
            reset_runtime: false,
            id_mismatch: false,
            on_publish_failure: rules.resiliency.backoff(1),
            paused: None,
        }
    }

    fn failed(mut self, reason: FailReason, message: impl Into<String>) -> Self {
        self.failures.push(Failed {
            reason,
            message: message.into(),
        });
        self
    }
}

/// How the runtime is to be called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invoke {
    /// min(actor timeout, time left to the deadline).
    pub timeout: Duration,
    /// The deadline, not the actor timeout, bounds the call.
    pub cut_by_deadline: bool,
}

/// What the runtime call came to (after routing any frames it returned).
#[derive(Debug)]
pub(crate) enum Answer {
    /// Frames, routed (for a stream: the frames were published batch by batch as they
    /// arrived, and this holds nothing left to publish).
    Frames(Routed),
    /// 204, or a JSON answer without frames: the input goes to x-sink as succeeded.
    Abort,
    /// 400: the runtime could not use the envelope.
    Rejected(ErrorInfo),
    /// 500, or an SSE `error` event: the handler raised.
    Handler(ErrorInfo),
    /// The call itself failed.
    Runtime(RuntimeError),
    /// The runtime went away during the call on this envelope `max_attempts` times in a row.
    RuntimeLost(RuntimeError),
    /// Publishing streamed frames failed (already counted and logged).
    Unpublished(ErrorInfo),
    /// The runtime produced more frames than `ASYA_MAX_FRAMES`.
    TooManyFrames,
    /// Publishing streamed frames failed for good (too large, malformed).
    Unsendable(crate::transport::TransportError),
}

impl Answer {
    fn error(&self) -> Option<ErrorInfo> {
        match self {
            Answer::Frames(_) | Answer::Abort => None,
            Answer::TooManyFrames => Some(too_many_frames_info(0)),
            Answer::Unsendable(e) => Some(ErrorInfo::new("TransportError", e.to_string())),
            Answer::Rejected(i) | Answer::Handler(i) | Answer::Unpublished(i) => Some(i.clone()),
            Answer::Runtime(e) | Answer::RuntimeLost(e) => Some(runtime_error_info(e)),
        }
    }
}

fn runtime_error_info(e: &RuntimeError) -> ErrorInfo {
    ErrorInfo::new(e.error_type(), e.to_string())
}

/// The runtime call and what it came to.
#[derive(Debug)]
pub(crate) struct Call {
    pub invoke: Invoke,
    pub answer: Answer,
}

/// Routed frames: their outputs and the failures met while routing them.
#[derive(Debug, Default)]
pub(crate) struct Routed {
    pub outputs: Vec<Output>,
    pub failures: Vec<Failed>,
    /// The `x-asya-pause` metadata of a parked frame (the first one).
    pub paused: Option<Value>,
}

/// One frame turned into an outgoing envelope, before the policy has seen it.
#[derive(Debug)]
pub(crate) struct Candidate {
    index: usize,
    pub envelope: Envelope,
    violation: Option<RouteViolation>,
}

impl Candidate {
    /// Only frames that keep the route rules are shown to the policy.
    pub fn wants_policy(&self) -> bool {
        self.violation.is_none()
    }
}

/// A panic kept failing this delivery: `h.input` is [`raw_envelope`] of the bytes; it goes
/// to x-sump (the panic is counted on its own metric, not as a failure reason).
pub(crate) fn panicked(h: &Hop) -> Plan {
    let id = MsgId::unparseable(&h.input.id).render();
    let why = Why {
        reason: Reason::NonRetryableFailure,
        error: None,
        code: Some("sidecar_panic"),
    };
    let mut plan = Plan::new(h.rules, Settlement::Ack, Some(Processed::Error));
    plan.outputs.push(to_sump(h, h.input.clone(), id, why));
    plan
}

/// Step 1 failed: `h.input` is [`crate::envelope::unparseable_envelope`] of the bytes; it goes
/// to x-sump.
pub(crate) fn unparseable(h: &Hop, e: &EnvelopeError) -> Plan {
    let fail = if e.is_parse() {
        FailReason::ParseError
    } else {
        FailReason::ValidationError
    };
    let why = Why {
        reason: e.reason(),
        error: None,
        code: None,
    };
    let id = MsgId::unparseable(&h.input.id).render();
    let mut plan = Plan::new(h.rules, Settlement::Ack, Some(Processed::Error))
        .failed(fail, format!("unusable message: {e}"));
    plan.outputs.push(to_sump(h, h.input.clone(), id, why));
    plan
}

/// An end actor (x-sink, x-sump) records the final state; it never routes.
pub(crate) fn end_of_route(rules: &Rules) -> Plan {
    Plan::new(rules, Settlement::Ack, Some(Processed::Success))
}

/// Step 4, before the runtime is called: the status the handler sees — phase `processing`,
/// this actor, the attempt (1-based delivery count) and `max_attempts`, `created_at` when
/// missing (kept otherwise), `updated_at` now. A previous `status.error` is kept (an
/// `_on_error` handler reads it); `reason` is cleared.
pub(crate) fn stamp_processing(
    rules: &Rules,
    env: &mut Envelope,
    attempt: u32,
    now: DateTime<Utc>,
) {
    let ts = timestamp(now);
    let st = env.status_mut();
    st.phase = Some(Phase::Processing);
    st.reason = None;
    st.actor = Some(rules.actor.to_string());
    st.attempt = Some(attempt.max(1));
    st.max_attempts = Some(rules.resiliency.max_attempts);
    if st.created_at.is_none() {
        st.created_at = Some(ts.clone());
    }
    st.updated_at = Some(ts);
}

/// Steps 2–4 before the runtime is called: the input may be done with already (wrong actor,
/// past its deadline, delivered too often: `Err` with its plan); else how to call the
/// runtime. An envelope for another actor is accepted when its `x-asya-route-override`
/// maps that actor to this one.
pub(crate) fn before_invoke(h: &Hop) -> Result<Invoke, Box<Plan>> {
    let input = h.input;
    let res = &h.rules.resiliency;
    if let Err(msg) = input.check(h.rules.max_hops) {
        let err = ErrorInfo::new("ValidationError", msg.clone());
        let plan = sump_input(h, Reason::ValidationError, Some(err)).failed(
            FailReason::ValidationError,
            format!("invalid envelope: {msg}"),
        );
        return Err(Box::new(plan));
    }
    if input.route.curr != *h.rules.actor
        && route_override(input, &input.route.curr).as_deref() != Some(&*h.rules.actor)
    {
        let msg = format!(
            "envelope for actor {:?} arrived at actor {:?}",
            input.route.curr, h.rules.actor
        );
        let err = ErrorInfo::new("RouteMismatch", msg.clone());
        let plan =
            sump_input(h, Reason::RouteMismatch, Some(err)).failed(FailReason::RouteMismatch, msg);
        return Err(Box::new(plan));
    }
    let deadline = input.deadline();
    if deadline.is_some_and(|d| d <= h.now) {
        return Err(Box::new(expired(h)));
    }
    if h.attempt > res.max_attempts {
        let msg = format!("delivered {} times, limit {}", h.attempt, res.max_attempts);
        let err = ErrorInfo::new("MaxRetriesExhausted", msg.clone());
        return Err(Box::new(
            sump_input(h, Reason::MaxRetriesExhausted, Some(err))
                .failed(FailReason::MaxRetriesExhausted, msg),
        ));
    }
    let left = deadline.map(|d| (d - h.now).to_std().unwrap_or_default());
    Ok(match left {
        Some(left) if left < res.actor_timeout => Invoke {
            timeout: left,
            cut_by_deadline: true,
        },
        _ => Invoke {
            timeout: res.actor_timeout,
            cut_by_deadline: false,
        },
    })
}

/// Frame `index` of the answer as an outgoing envelope, checked against the route rules.
/// The first frame of a call (JSON or streamed) keeps the input's id; every later one is a
/// child: a deterministic id of its own and the input as parent.
pub(crate) fn candidate(h: &Hop, index: usize, frame: Frame) -> Candidate {
    let mut out = frame.into_envelope(h.input);
    if index > 0 {
        out.parent_id = Some(h.input.id.clone());
        out.id = MsgId::frame(&h.input.id, h.digest, h.hop, index).child_id();
    }
    let violation = h.input.route.check_successor(&out.route).err();
    Candidate {
        index,
        envelope: out,
        violation,
    }
}

/// Step 5 for one frame: route rules, the policy's decision (`None`: no policy, or the frame
/// was not shown to it; `Err`: the policy failed), then its destination.
pub(crate) fn route_frame(
    h: &Hop,
    routed: &mut Routed,
    cand: Candidate,
    policy: Option<Result<Decision, String>>,
) {
    let input = h.input;
    // Only a frame that breaks a rule needs it.
    let sump_id = || MsgId::frame_sump(&input.id, h.digest, h.hop, cand.index).render();
    if let Some(v) = cand.violation {
        routed.failures.push(Failed {
            reason: FailReason::RouteMismatch,
            message: format!("runtime rewrote route history: {v}"),
        });
        let why = Why {
            reason: Reason::RouteMismatch,
            error: Some(ErrorInfo::new("RouteMismatch", v.to_string())),
            code: None,
        };
        routed
            .outputs
            .push(to_sump(h, input.clone(), sump_id(), why));
        return;
    }
    let mut out = cand.envelope;
    let mut to_sink = out.route.is_finished();
    let rejected = match policy {
        None | Some(Ok(Decision::Keep)) => None,
        Some(Ok(Decision::ReplaceRoute(route))) => match input.route.check_successor(&route) {
            Ok(()) => {
                out.route = route;
                to_sink = out.route.is_finished();
                None
            }
            Err(v) => Some(v.to_string()),
        },
        Some(Ok(Decision::SendToSink)) => {
            to_sink = true;
            None
        }
        Some(Ok(Decision::Reject(why) | Decision::SendToSump(why))) | Some(Err(why)) => Some(why),
    };
    if let Some(why) = rejected {
        routed.failures.push(Failed {
            reason: FailReason::PolicyRejected,
            message: format!("policy rejected a frame: {why}"),
        });
        let why = Why {
            reason: Reason::PolicyRejected,
            error: Some(ErrorInfo::new("PolicyRejected", why)),
            code: None,
        };
        routed.outputs.push(to_sump(h, out, sump_id(), why));
        return;
    }
    let id = MsgId::frame(&input.id, h.digest, h.hop, cand.index).render();
    if let Some(meta) = out.headers.value(HEADER_PAUSE) {
        // Not routed: parked on the pause queue (the gateway resumes it), status paused.
        if let Ok(queue) = h.rules.queue.sibling(PAUSE_ACTOR) {
            stamp_phase(h, &mut out, Phase::Paused).reason = None;
            routed.paused.get_or_insert(meta);
            routed
                .outputs
                .push(emit(h, (MessageType::Routing, queue), id, out));
            return;
        }
    }
    let dest = if to_sink {
        stamp(h, &mut out, Phase::Succeeded, Reason::Completed);
        (MessageType::Sink, h.rules.sink_queue.clone())
    } else {
        let logical = out.route.curr.clone();
        let physical = route_override(&out, &logical);
        match h
            .rules
            .queue
            .sibling(physical.as_deref().unwrap_or(&logical))
        {
            Ok(queue) => {
                if let Some(target) = physical {
                    resolved(h, &mut out, logical, target);
                }
                (MessageType::Routing, queue)
            }
            Err(e) => {
                // No queue can carry it: this frame (only) goes to x-sump.
                routed.failures.push(Failed {
                    reason: FailReason::RouteMismatch,
                    message: format!("frame routed to an invalid actor: {e}"),
                });
                let why = Why {
                    reason: Reason::RouteMismatch,
                    error: Some(ErrorInfo::new("RouteMismatch", e.to_string())),
                    code: None,
                };
                routed.outputs.push(to_sump(h, out, sump_id(), why));
                return;
            }
        }
    };
    routed.outputs.push(emit(h, dest, id, out));
}

/// Record an applied route override in `x-asya-route-resolved` (kept across hops).
fn resolved(h: &Hop, out: &mut Envelope, logical: String, target: String) {
    let entry = serde_json::json!({"target": target, "by": &*h.rules.actor});
    let mut audit = match out.headers.value(HEADER_ROUTE_RESOLVED) {
        Some(Value::Object(m)) => m,
        _ => Default::default(),
    };
    audit.insert(logical, entry);
    out.headers
        .insert_value(HEADER_ROUTE_RESOLVED, &Value::Object(audit));
}

/// Steps 5–7 after the runtime call: what its answer means for the input.
pub(crate) fn after_invoke(h: &Hop, call: Call) -> Plan {
    let rules = h.rules;
    let res = &rules.resiliency;
    let error = call.answer.error();
    let mut plan = match call.answer {
        Answer::Frames(routed) => {
            let mut plan = succeeded(h);
            plan.outputs = routed.outputs;
            plan.failures = routed.failures;
            plan.paused = routed.paused;
            plan
        }
        Answer::Abort => {
            let mut out = h.input.clone();
            stamp(h, &mut out, Phase::Succeeded, Reason::Completed);
            let id = MsgId::abort(&h.input.id, h.digest, h.hop).render();
            let mut plan = succeeded(h);
            let dest = (MessageType::Sink, rules.sink_queue.clone());
            plan.outputs.push(emit(h, dest, id, out));
            plan
        }
        Answer::Unpublished(_) => Plan::new(
            rules,
            Settlement::Retry(res.backoff(h.attempt.max(1))),
            None,
        ),
        Answer::Rejected(info) => {
            let msg = format!("runtime rejected the envelope: {}", info.message);
            let why = Why {
                reason: Reason::ParseError,
                error: Some(info),
                code: Some(CODE_REJECTED),
            };
            sump_input_why(h, why).failed(FailReason::ParseError, msg)
        }
        // The call was cut while the handler ran: the runtime is in an unknown state (still
        // busy with it), so a deadline cut is a runtime timeout like the actor timeout.
        Answer::Runtime(RuntimeError::Timeout(t))
            if call.invoke.cut_by_deadline || res.crash_on_timeout =>
        {
            let why = match h.input.deadline_at() {
                Some(d) if call.invoke.cut_by_deadline => {
                    format!("the envelope's deadline {d} cut the runtime call after {t:?}")
                }
                _ => format!(
                    "runtime did not answer within {t:?} (ASYA_RESILIENCY_ACTOR_TIMEOUT; deadline exceeded)"
                ),
            };
            let mut plan = sump_input(h, Reason::Timeout, Some(ErrorInfo::new("Timeout", &why)))
                .failed(FailReason::Timeout, why);
            if res.crash_on_timeout {
                plan.settle = Settlement::AckThenExit;
            }
            plan.reset_runtime = true;
            plan
        }
        Answer::Unsendable(e) => unsendable(h, &e.to_string()),
        Answer::RuntimeLost(e) => {
            // Only after the connection was lost on this envelope ASYA_RESILIENCY_MAX_ATTEMPTS
            // times in a row (a lost connection alone is waited out, not counted).
            let msg = format!(
                "the runtime went away during the call {} times in a row ({e}): the handler may be crashing it (out of memory?)",
                res.max_attempts
            );
            let info = ErrorInfo::new("RuntimeLost", msg.clone());
            sump_input(h, Reason::NonRetryableFailure, Some(info))
                .failed(FailReason::RuntimeError, msg)
        }
        Answer::TooManyFrames => {
            let info = too_many_frames_info(rules.max_frames);
            let msg = info.message.clone();
            let mut plan = sump_input(h, Reason::NonRetryableFailure, Some(info))
                .failed(FailReason::RuntimeError, msg);
            // A stream was cut short: its connection is in the middle of an answer.
            plan.reset_runtime = true;
            plan
        }
        Answer::Runtime(e) => {
            let timeout = matches!(e, RuntimeError::Timeout(_));
            let reason = if timeout {
                FailReason::Timeout
            } else {
                FailReason::RuntimeError
            };
            let mut plan = failed_call(h, runtime_error_info(&e), reason, None);
            plan.reset_runtime = timeout;
            plan.id_mismatch = matches!(e, RuntimeError::RequestIdMismatch { .. });
            plan
        }
        Answer::Handler(info) => failed_call(h, info, FailReason::RuntimeError, Some(CODE_HANDLER)),
    };
    plan.error = error;
    plan
}

fn too_many_frames_info(max: usize) -> ErrorInfo {
    ErrorInfo::new(
        "TooManyFrames",
        format!("the runtime produced more than ASYA_MAX_FRAMES ({max}) frames for one envelope"),
    )
}

/// The transport can never accept an output of this delivery (too large, malformed):
/// retrying cannot help, so the input goes to x-sump at once (`transport_error`), cut to
/// fit the transport's limit when it would not fit either.
pub(crate) fn unsendable(h: &Hop, error: &str) -> Plan {
    let msg = format!("an output cannot be sent: {error}");
    let sump = |input: &Envelope, msg: &str| {
        let info = ErrorInfo::new("TransportError", msg);
        let h = Hop { input, ..h.clone() };
        let why = Why {
            reason: Reason::NonRetryableFailure,
            error: Some(info),
            code: Some("transport_error"),
        };
        sump_input_why(&h, why).failed(FailReason::TransportError, msg)
    };
    let plan = sump(h.input, &msg);
    let Some(limit) = h.rules.max_output_bytes else {
        return plan;
    };
    let budget = limit.saturating_sub(FIT_MARGIN);
    let size = plan.outputs[0].envelope.to_vec().len();
    if size <= budget {
        return plan;
    }
    // Cut the original payload (inside the x-sump shape) by what is too much.
    let original = h.input.payload.get();
    let msg = format!(
        "{msg} (x-sump copy: original_payload cut from {} bytes to fit the transport's limit of {limit} bytes; it is now a string holding the start of the payload's JSON text)",
        original.len()
    );
    let mut input = h.input.clone();
    let mut keep = original.len().saturating_sub(size - budget + msg.len());
    loop {
        while !original.is_char_boundary(keep) {
            keep -= 1;
        }
        let text = serde_json::to_string(&original[..keep]).expect("a string serialises");
        input.payload = RawValue::from_string(text).expect("a JSON string is JSON");
        let plan = sump(&input, &msg);
        let size = plan.outputs[0].envelope.to_vec().len();
        if size <= budget || keep == 0 {
            return plan;
        }
        // Escaping grew the text: cut the excess too.
        keep = keep.saturating_sub(size - budget);
    }
}

/// Room left for headers and transport framing below a transport's limit.
const FIT_MARGIN: usize = 4096;

/// The runtime call succeeded: ack once the outputs are accepted; a failed publish is
/// retried with the backoff of this attempt.
fn succeeded(h: &Hop) -> Plan {
    let mut plan = Plan::new(h.rules, Settlement::Ack, Some(Processed::Success));
    plan.on_publish_failure = h.rules.resiliency.backoff(h.attempt.max(1));
    plan
}

/// Step 6: retry while allowed, else x-sump — or the `_on_error` actor when the input
/// names one. `code` is the x-sump payload's `error` (`None`: from the reason).
fn failed_call(h: &Hop, info: ErrorInfo, reason: FailReason, code: Option<&'static str>) -> Plan {
    let res = &h.rules.resiliency;
    let retryable = res.is_retryable(&info.kind, &info.mro);
    if retryable && h.attempt < res.max_attempts {
        let delay = res.backoff(h.attempt);
        return Plan::new(h.rules, Settlement::Retry(delay), None);
    }
    let msg = format!("handler failed ({}): {}", info.kind, info.message);
    let mut failures = vec![Failed {
        reason,
        message: msg,
    }];
    let status_reason = if !retryable {
        Reason::NonRetryableFailure
    } else if res.max_attempts > 1 {
        failures.push(Failed {
            reason: FailReason::MaxRetriesExhausted,
            message: format!("gave up after {} attempts", h.attempt),
        });
        Reason::MaxRetriesExhausted
    } else {
        Reason::RuntimeError
    };
    let why = Why {
        reason: status_reason,
        error: Some(info),
        code,
    };
    let mut plan = match on_error(h) {
        Some(queue) => to_error_handler(h, queue, why),
        None => sump_input_why(h, why),
    };
    plan.failures.splice(0..0, failures);
    plan
}

/// The queue of the input's `_on_error` actor, when it names one a queue can carry.
fn on_error(h: &Hop) -> Option<(String, QueueName)> {
    let actor = h.input.headers.str(HEADER_ON_ERROR)?;
    let queue = h.rules.queue.sibling(&actor).ok()?;
    Some((actor.into_owned(), queue))
}

/// A failure that would go to x-sump goes to the `_on_error` actor instead: the input's
/// payload untouched, status failed with the reason and error, the route shifted past this
/// actor with the handler as `curr` (and nothing after it), the header removed (a failing
/// handler ends in x-sump, not in a loop).
fn to_error_handler(h: &Hop, (actor, queue): (String, QueueName), why: Why) -> Plan {
    let mut out = h.input.clone();
    out.headers.remove(HEADER_ON_ERROR);
    let mut route = h.input.route.shifted();
    route.curr = actor;
    route.next.clear();
    out.route = route;
    let st = stamp(h, &mut out, Phase::Failed, why.reason);
    if why.error.is_some() {
        st.error = why.error;
    }
    let id = MsgId::on_error(&h.input.id, h.digest, h.hop).render();
    let mut plan = Plan::new(h.rules, Settlement::Ack, Some(Processed::Error));
    plan.outputs
        .push(emit(h, (MessageType::Routing, queue), id, out));
    plan
}

/// The input's task was canceled (its id is in the sidecar's canceled set, an input of
/// this decision): the input to x-sink with phase `canceled`, its payload untouched, and
/// no runtime call. Counted on `messages_canceled_total`, not as a failure.
pub(crate) fn canceled(h: &Hop) -> Plan {
    let mut out = h.input.clone();
    let st = stamp_phase(h, &mut out, Phase::Canceled);
    st.reason = None;
    let id = MsgId::canceled(&h.input.id, h.digest, h.hop).render();
    let dest = (MessageType::Sink, h.rules.sink_queue.clone());
    let mut plan = Plan::new(h.rules, Settlement::Ack, Some(Processed::Success));
    plan.outputs.push(emit(h, dest, id, out));
    plan
}

/// Step 3 (or a call cut short by the deadline): the input to x-sink, failed with reason
/// Timeout, its payload untouched.
fn expired(h: &Hop) -> Plan {
    let mut out = h.input.clone();
    stamp(h, &mut out, Phase::Failed, Reason::Timeout).error = Some(ErrorInfo::new(
        "Timeout",
        "deadline passed before processing finished",
    ));
    let id = MsgId::expired(&h.input.id, h.digest, h.hop).render();
    let dest = (MessageType::Sink, h.rules.sink_queue.clone());
    let mut plan = Plan::new(h.rules, Settlement::Ack, Some(Processed::Success)).failed(
        FailReason::SlaExpired,
        "deadline passed; sending to sink as failed",
    );
    plan.outputs.push(emit(h, dest, id, out));
    plan
}

/// The input to x-sump (failed, `reason`, `error`), then ack.
fn sump_input(h: &Hop, reason: Reason, error: Option<ErrorInfo>) -> Plan {
    sump_input_why(
        h,
        Why {
            reason,
            error,
            code: None,
        },
    )
}

fn sump_input_why(h: &Hop, why: Why) -> Plan {
    let id = MsgId::sump(&h.input.id, h.digest, h.hop).render();
    let mut plan = Plan::new(h.rules, Settlement::Ack, Some(Processed::Error));
    plan.outputs.push(to_sump(h, h.input.clone(), id, why));
    plan
}

/// Why an envelope goes to x-sump.
struct Why {
    reason: Reason,
    /// Replaces the envelope's `status.error` when given.
    error: Option<ErrorInfo>,
    /// The x-sump payload's `error`; `None`: [`reason_code`] of the reason.
    code: Option<&'static str>,
}

/// `error` of the x-sump payload when the handler raised (the runtime's 500 code).
const CODE_HANDLER: &str = "processing_error";
/// `error` of the x-sump payload when the runtime rejected the envelope (its 400 code).
const CODE_REJECTED: &str = "msg_parsing_error";

/// The x-sump message for `env` (the input, a rejected frame, or unparseable bytes): failed
/// status with the reason, the error and this hop's attempt; the payload in upstream's
/// shape `{"error": code, "details": {message, type, mro, traceback}, "original_payload":
/// payload}` (`details` null when there is no error); everything else as it was.
fn to_sump(h: &Hop, mut env: Envelope, id: String, why: Why) -> Output {
    let st = stamp(h, &mut env, Phase::Failed, why.reason);
    if why.error.is_some() {
        st.error = why.error;
    }
    let error = st.error.clone();
    let code = why.code.unwrap_or_else(|| why.reason.code());
    let payload = sump_payload(code, error.as_ref(), &env.payload);
    env.payload = payload;
    let dest = (MessageType::Sump, h.rules.sump_queue.clone());
    emit(h, dest, id, env)
}

/// The one status stamp: phase, reason, this actor, this hop's attempt, now. Returns the
/// status for the rest.
fn stamp<'e>(h: &Hop, env: &'e mut Envelope, phase: Phase, reason: Reason) -> &'e mut Status {
    let st = stamp_phase(h, env, phase);
    st.reason = Some(reason);
    st
}

/// [`stamp`] without the reason: phase, actor, attempt and `max_attempts` (when the delivery
/// count is known), `created_at` when missing, `updated_at`.
fn stamp_phase<'e>(h: &Hop, env: &'e mut Envelope, phase: Phase) -> &'e mut Status {
    let ts = timestamp(h.now);
    let st = env.status_mut();
    st.phase = Some(phase);
    st.actor = Some(h.rules.actor.to_string());
    if h.attempt > 0 {
        st.attempt = Some(h.attempt);
        st.max_attempts = Some(h.rules.resiliency.max_attempts);
    }
    if st.created_at.is_none() {
        st.created_at = Some(ts.clone());
    }
    st.updated_at = Some(ts);
    st
}

/// Every status time the sidecar writes: RFC 3339 UTC, milliseconds, `Z` (one format, so
/// `created_at <= updated_at` holds as strings too).
fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An output of this hop: carries the hop's `traceparent`.
fn emit(h: &Hop, (kind, queue): (MessageType, QueueName), id: String, mut env: Envelope) -> Output {
    if let Some(tp) = &h.traceparent {
        env.headers.insert_str(HEADER_TRACEPARENT, tp);
    }
    Output {
        kind,
        queue,
        id,
        envelope: env,
    }
}

#[cfg(test)]
mod tests;
