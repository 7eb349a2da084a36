//! `asya-host sump replay` (issue #19): read x-sump, show what would be replayed, and
//! republish the original envelopes (unwrapped from the x-sump shape) to the actor each one
//! was for, counting replays in `x-asya-replays` so a still-failing envelope stops.
//!
//! Works through the [`Transport`] trait only: NATS and transport components from the
//! command line, the in-process `memory` transport from a program. x-sump is a work queue,
//! so replay reads what is waiting in it: an x-sump end actor running at the same time
//! takes (and records) envelopes first.
//!
//! A run: receive from x-sump until nothing arrives for `idle` (or `limit` envelopes were
//! replayed); for each envelope that matches the filters and has been replayed fewer than
//! `max_replays` times, publish the unwrapped envelope, then ack the x-sump copy. Every other
//! x-sump message (filtered out, stopped by the counter, unusable, and everything with
//! `--dry-run`, and an envelope that failed again after its replay in this same run) is held
//! until the end of the run and then handed back to x-sump, unchanged, deliverable again
//! [`HAND_BACK_DELAY`] later. On NATS a message that arrives in x-sump within 2 s after a run
//! (the pull request's life) may wait for `ASYA_NATS_ACK_WAIT`: the run's last pull request,
//! still open on the server, takes it.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::envelope::{now_rfc3339, Envelope, Phase};
use crate::queue::QueueName;
use crate::transport::{Acker, OutMessage, Transport, TransportError};

/// How many times an envelope was replayed from x-sump.
pub const HEADER_REPLAYS: &str = "x-asya-replays";
/// Default `--max-replays`.
pub const DEFAULT_MAX_REPLAYS: u32 = 3;
/// Default [`ReplayOptions::hand_back_delay`]: longer than a NATS pull request lives (2 s),
/// so the run's own last pull request, still open on the server after the run, cannot take
/// a handed-back message (which would then wait for `ASYA_NATS_ACK_WAIT`).
pub const HAND_BACK_DELAY: Duration = Duration::from_secs(3);
/// Unsettled x-sump messages a run holds at most (filtered-out ones wait until its end).
pub const MAX_HELD: usize = 1000;

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub namespace: String,
    /// The x-sump actor (`ASYA_ACTOR_SUMP`).
    pub sump: String,
    /// Only envelopes that failed at this actor (`status.actor`, else `route.curr`).
    pub actor: Option<String>,
    /// Only this reason: `status.reason` (`RuntimeError`, `MaxRetriesExhausted`, ...) or the
    /// x-sump payload's `error` code (`processing_error`, ...), case-insensitive.
    pub reason: Option<String>,
    /// Only envelopes that went to x-sump at or after this time (`status.updated_at`).
    pub since: Option<DateTime<Utc>>,
    /// Replay at most this many.
    pub limit: usize,
    /// Show, publish nothing, hand everything back.
    pub dry_run: bool,
    /// An envelope replayed this many times already stays in x-sump.
    pub max_replays: u32,
    /// The run ends when x-sump stays quiet this long.
    pub idle: Duration,
    /// Messages not replayed become deliverable again this long after the run
    /// ([`HAND_BACK_DELAY`]).
    pub hand_back_delay: Duration,
}

impl ReplayOptions {
    pub fn new(namespace: &str) -> ReplayOptions {
        ReplayOptions {
            namespace: namespace.to_owned(),
            sump: "x-sump".to_owned(),
            actor: None,
            reason: None,
            since: None,
            limit: usize::MAX,
            dry_run: false,
            max_replays: DEFAULT_MAX_REPLAYS,
            idle: Duration::from_secs(2),
            hand_back_delay: HAND_BACK_DELAY,
        }
    }
}

/// What happened to one x-sump message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Republished to `actor` (with `--dry-run`: would be).
    Replayed { actor: String, replays: u32 },
    /// Replayed `max_replays` times already: left in x-sump.
    Stopped { replays: u32 },
    /// Does not match the filters: left in x-sump.
    Filtered,
    /// Not an envelope in the x-sump shape with an actor to go to: left in x-sump.
    Unusable(String),
    /// Replayed in this run and back in x-sump already: left there (once per run).
    Again,
}

/// One line of progress.
#[derive(Debug, Clone)]
pub struct Line {
    pub envelope_id: String,
    pub reason: String,
    pub verdict: Verdict,
    pub dry_run: bool,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = &self.envelope_id;
        let reason = &self.reason;
        match &self.verdict {
            Verdict::Replayed { actor, replays } if self.dry_run => write!(
                f,
                "would replay {id} -> {actor} (reason {reason}, replay {replays})"
            ),
            Verdict::Replayed { actor, replays } => {
                write!(
                    f,
                    "replayed {id} -> {actor} (reason {reason}, replay {replays})"
                )
            }
            Verdict::Stopped { replays } => write!(
                f,
                "stopped  {id}: replayed {replays} times already (--max-replays); left in x-sump"
            ),
            Verdict::Filtered => write!(f, "skipped  {id}: does not match (reason {reason})"),
            Verdict::Unusable(why) => write!(f, "unusable {id}: {why}; left in x-sump"),
            Verdict::Again => write!(
                f,
                "again    {id}: failed again after its replay in this run; left in x-sump"
            ),
        }
    }
}

/// Counts of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub replayed: usize,
    pub stopped: usize,
    pub filtered: usize,
    pub unusable: usize,
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replayed {}, stopped by --max-replays {}, not matching {}, unusable {}",
            self.replayed, self.stopped, self.filtered, self.unusable
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Queue(#[from] crate::queue::InvalidName),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// The envelope an x-sump message held, ready to publish, and where to.
struct Unwrapped {
    queue: QueueName,
    actor: String,
    replays: u32,
    envelope: Envelope,
}

/// Decide about one x-sump message.
fn examine(body: &[u8], opts: &ReplayOptions) -> (Line, Option<Unwrapped>) {
    let mut line = Line {
        envelope_id: String::new(),
        reason: String::new(),
        verdict: Verdict::Filtered,
        dry_run: opts.dry_run,
    };
    let env = match Envelope::parse(body) {
        Ok(e) => e,
        Err(e) => {
            line.verdict = Verdict::Unusable(format!("not an envelope: {e}"));
            return (line, None);
        }
    };
    line.envelope_id = env.id.clone();
    let status = env.status.clone().unwrap_or_default();
    // The x-sump shape, `original_payload` kept as its text (numbers beyond 64 bits, key
    // order) so the replayed payload is the one that failed, byte for byte.
    #[derive(serde::Deserialize, Default)]
    struct Shape {
        #[serde(default)]
        error: Option<Value>,
        /// Absent: not the x-sump shape; `null` is a payload like any other.
        #[serde(default, deserialize_with = "present")]
        original_payload: Option<Box<RawValue>>,
    }
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
        <Box<RawValue> as serde::Deserialize>::deserialize(d).map(Some)
    }
    let shape: Shape = serde_json::from_str(env.payload.get()).unwrap_or_default();
    let code = shape.error.as_ref().and_then(Value::as_str).unwrap_or("");
    let reason = status.reason.map(|r| format!("{r:?}")).unwrap_or_default();
    line.reason = if code.is_empty() {
        reason.clone()
    } else {
        format!("{reason}/{code}")
    };
    let actor = status
        .actor
        .clone()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| env.route.curr.clone());
    if let Some(want) = &opts.actor {
        if &actor != want {
            return (line, None);
        }
    }
    if let Some(want) = &opts.reason {
        if !want.eq_ignore_ascii_case(&reason) && !want.eq_ignore_ascii_case(code) {
            return (line, None);
        }
    }
    if let Some(since) = opts.since {
        let at = status
            .updated_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
        if at.is_none_or(|t| t.with_timezone(&Utc) < since) {
            return (line, None);
        }
    }
    let Some(original) = shape.original_payload else {
        line.verdict = Verdict::Unusable("payload is not the x-sump shape".into());
        return (line, None);
    };
    if env.route.curr.is_empty() {
        line.verdict = Verdict::Unusable("no actor in its route".into());
        return (line, None);
    }
    let replays = env
        .headers
        .value(HEADER_REPLAYS)
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
        .min(u32::MAX as u64) as u32;
    if replays >= opts.max_replays {
        line.verdict = Verdict::Stopped { replays };
        return (line, None);
    }
    let queue = match QueueName::new(&opts.namespace, &env.route.curr) {
        Ok(q) => q,
        Err(e) => {
            line.verdict = Verdict::Unusable(e.to_string());
            return (line, None);
        }
    };
    let mut out = env;
    out.payload = original;
    out.headers
        .insert_value(HEADER_REPLAYS, &Value::from(replays + 1));
    let st = out.status_mut();
    st.phase = Some(Phase::Pending);
    st.reason = None;
    st.error = None;
    st.attempt = None;
    st.updated_at = Some(now_rfc3339());
    let dest = out.route.curr.clone();
    line.verdict = Verdict::Replayed {
        actor: dest.clone(),
        replays: replays + 1,
    };
    (
        line,
        Some(Unwrapped {
            queue,
            actor: dest,
            replays: replays + 1,
            envelope: out,
        }),
    )
}

/// Run one replay: `progress` sees every x-sump message's line as it is decided.
pub async fn replay(
    transport: &dyn Transport,
    opts: &ReplayOptions,
    mut progress: impl FnMut(&Line),
) -> Result<ReplaySummary, ReplayError> {
    let sump = QueueName::new(&opts.namespace, &opts.sump)?;
    let mut rx = transport.subscribe(&sump, MAX_HELD).await?;
    let mut summary = ReplaySummary::default();
    let mut held: Vec<Box<dyn Acker>> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut replayed_ids: HashSet<String> = HashSet::new();
    let result = async {
        while summary.replayed < opts.limit && held.len() < MAX_HELD {
            let d = match tokio::time::timeout(opts.idle, rx.recv()).await {
                Err(_) => break,
                Ok(Err(TransportError::Closed)) => break,
                Ok(r) => r?,
            };
            let digest = xxhash_rust::xxh3::xxh3_64(&d.body);
            if !seen.insert(digest) {
                // A held message came round again (the broker's redelivery timer): every
                // message was looked at.
                held.push(d.acker);
                break;
            }
            let (mut line, mut out) = examine(&d.body, opts);
            if let Some(u) = &out {
                if !replayed_ids.insert(u.envelope.id.clone()) {
                    // Replayed in this run and failed again already: once per run.
                    line.verdict = Verdict::Again;
                    out = None;
                }
            }
            match &line.verdict {
                Verdict::Replayed { .. } => summary.replayed += 1,
                Verdict::Stopped { .. } => summary.stopped += 1,
                Verdict::Filtered | Verdict::Again => summary.filtered += 1,
                Verdict::Unusable(_) => summary.unusable += 1,
            }
            match out {
                Some(u) if !opts.dry_run => {
                    let msg = OutMessage {
                        queue: u.queue,
                        id: format!("{}:replay:{}:{digest:016x}", u.envelope.id, u.replays),
                        body: Bytes::from(u.envelope.to_vec()),
                    };
                    tracing::debug!(actor = %u.actor, "replaying");
                    transport.send(msg).await?;
                    d.acker.ack().await?;
                }
                _ => held.push(d.acker),
            }
            progress(&line);
        }
        Ok::<(), ReplayError>(())
    }
    .await;
    // Everything not replayed goes back to x-sump as it was.
    for a in held {
        if let Err(e) = a.nack(opts.hand_back_delay).await {
            tracing::warn!(error = %e, "could not hand an x-sump message back; it returns after the broker's redelivery timeout");
        }
    }
    result.map(|()| summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::memory::MemoryTransport;

    fn sump_message(id: &str, actor: &str, replays: Option<u32>) -> Vec<u8> {
        let headers = match replays {
            Some(n) => format!(r#"{{"trace_id":"t","{HEADER_REPLAYS}":{n}}}"#),
            None => r#"{"trace_id":"t"}"#.to_owned(),
        };
        format!(
            r#"{{"id":"{id}","route":{{"prev":["p"],"curr":"{actor}","next":["z"]}},"headers":{headers},"payload":{{"error":"processing_error","details":{{"message":"boom","type":"ValueError","mro":[],"traceback":null}},"original_payload":{{"k": 1.50}}}},"status":{{"phase":"failed","reason":"RuntimeError","actor":"{actor}","updated_at":"2030-01-01T00:00:00.000Z","error":{{"message":"boom","type":"ValueError"}}}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn unwraps_the_original_envelope_and_counts_the_replay() {
        let opts = ReplayOptions::new("ns");
        let (line, out) = examine(&sump_message("e1", "a", None), &opts);
        let u = out.expect("replayed");
        assert_eq!(
            line.verdict,
            Verdict::Replayed {
                actor: "a".into(),
                replays: 1
            }
        );
        assert_eq!(line.reason, "RuntimeError/processing_error");
        assert_eq!(u.queue.as_str(), "asya-ns-a");
        let env = u.envelope;
        assert_eq!(
            env.payload.get(),
            r#"{"k": 1.50}"#,
            "the payload that failed, as its text"
        );
        assert_eq!(env.route.prev, ["p"]);
        assert_eq!(env.route.next, ["z"]);
        assert_eq!(env.headers.value(HEADER_REPLAYS).unwrap(), 1);
        assert_eq!(env.headers.value("trace_id").unwrap(), "t");
        let st = env.status.unwrap();
        assert_eq!(st.phase, Some(Phase::Pending));
        assert!(st.error.is_none() && st.reason.is_none());
    }

    #[test]
    fn a_null_original_payload_is_replayed_and_a_missing_one_is_unusable() {
        let opts = ReplayOptions::new("ns");
        let with = |payload: &str| {
            String::from_utf8(sump_message("e1", "a", None))
                .unwrap()
                .replace(r#""original_payload":{"k": 1.50}"#, payload)
                .into_bytes()
        };
        let (_, out) = examine(&with(r#""original_payload":null"#), &opts);
        assert_eq!(out.expect("replayed").envelope.payload.get(), "null");
        let (line, out) = examine(&with(r#""other":1"#), &opts);
        assert!(out.is_none());
        assert!(
            matches!(line.verdict, Verdict::Unusable(_)),
            "{:?}",
            line.verdict
        );
    }

    #[test]
    fn filters_and_the_counter_keep_envelopes_in_x_sump() {
        let mut opts = ReplayOptions::new("ns");
        let (_, out) = examine(&sump_message("e1", "a", Some(3)), &opts);
        assert!(out.is_none());
        let (line, _) = examine(&sump_message("e1", "a", Some(3)), &opts);
        assert_eq!(line.verdict, Verdict::Stopped { replays: 3 });
        opts.actor = Some("b".into());
        let (line, _) = examine(&sump_message("e1", "a", None), &opts);
        assert_eq!(line.verdict, Verdict::Filtered);
        opts.actor = None;
        opts.reason = Some("processing_error".into());
        assert!(examine(&sump_message("e1", "a", None), &opts).1.is_some());
        opts.reason = Some("timeout".into());
        assert!(examine(&sump_message("e1", "a", None), &opts).1.is_none());
        opts.reason = None;
        opts.since = Some("2030-01-02T00:00:00Z".parse().unwrap());
        assert!(examine(&sump_message("e1", "a", None), &opts).1.is_none());
        let (line, _) = examine(b"not json", &opts);
        assert!(matches!(line.verdict, Verdict::Unusable(_)));
    }

    #[tokio::test]
    async fn dry_run_hands_everything_back_and_a_run_replays_it() {
        let t = MemoryTransport::new();
        let sump = QueueName::new("ns", "x-sump").unwrap();
        for i in 0..3 {
            t.send(OutMessage {
                queue: sump.clone(),
                id: format!("m{i}"),
                body: Bytes::from(sump_message(&format!("e{i}"), "a", None)),
            })
            .await
            .unwrap();
        }
        let mut opts = ReplayOptions::new("ns");
        opts.idle = Duration::from_millis(200);
        opts.hand_back_delay = Duration::ZERO;
        opts.dry_run = true;
        let mut lines = Vec::new();
        let s = replay(&t, &opts, |l| lines.push(l.to_string()))
            .await
            .unwrap();
        assert_eq!(s.replayed, 3, "{lines:?}");
        assert!(lines[0].starts_with("would replay e0 -> a"), "{lines:?}");
        opts.dry_run = false;
        opts.limit = 2;
        let s = replay(&t, &opts, |_| {}).await.unwrap();
        assert_eq!(s.replayed, 2);
        opts.limit = usize::MAX;
        let s = replay(&t, &opts, |_| {}).await.unwrap();
        assert_eq!(
            s.replayed, 1,
            "the third was handed back by the limited run"
        );
        let mut rx = t
            .subscribe(&QueueName::new("ns", "a").unwrap(), 10)
            .await
            .unwrap();
        for _ in 0..3 {
            let d = tokio::time::timeout(Duration::from_secs(1), rx.recv())
                .await
                .unwrap()
                .unwrap();
            let env = Envelope::parse(&d.body).unwrap();
            assert_eq!(env.headers.value(HEADER_REPLAYS).unwrap(), 1);
            d.acker.ack().await.unwrap();
        }
    }
}
