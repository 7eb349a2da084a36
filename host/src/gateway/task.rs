//! The task record: what the gateway stores per task, how reports move it forward, and the
//! SPEC §9 view of it.
//!
//! Tracking rules:
//! - Task id = the first envelope's id; trace id = the same uuid in W3C form (32 hex), so a
//!   report of any branch (fan-out children get new ids) finds its task by trace id.
//! - Outstanding branches: 1 at submit; a hop that sent N messages adds N - 1; a final
//!   (x-sink / x-sump) removes 1. Reports arrive in any order (a child can reach x-sink
//!   before its parent's hop report), so a task is only done when no branch is outstanding
//!   **and** every parent named by a report has had its own hop reported.
//! - Status is monotonic: once succeeded / failed / canceled, reports only append to the
//!   timeline.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::{now_rfc3339, ErrorInfo, Phase, Reason};

/// Task status (SPEC §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Paused,
    Canceled,
}

impl TaskStatus {
    /// Succeeded, failed and canceled never change again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Canceled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Paused => "paused",
            TaskStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<TaskStatus> {
        Some(match s {
            "pending" => TaskStatus::Pending,
            "running" => TaskStatus::Running,
            "succeeded" => TaskStatus::Succeeded,
            "failed" => TaskStatus::Failed,
            "paused" => TaskStatus::Paused,
            "canceled" | "cancelled" => TaskStatus::Canceled,
            _ => return None,
        })
    }
}

/// What `GET /tasks/{id}` returns (SPEC §9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: String,
    pub status: TaskStatus,
    pub current_actor_name: Option<String>,
    pub actors_completed: usize,
    pub total_actors: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    pub created_at: String,
    pub updated_at: String,
    pub trace_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<String>,
    /// The `x-asya-pause` metadata of the frame that paused the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_metadata: Option<Value>,
}

/// One entry of the hop-by-hop timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopEntry {
    pub actor: String,
    pub envelope_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// RFC 3339 time the actor received the envelope.
    pub received_at: String,
    /// Receive to last send, milliseconds (0 for end actors).
    pub duration_ms: f64,
    /// The runtime call alone, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_ms: Option<f64>,
    /// Actors (or queues) the outputs went to.
    #[serde(default)]
    pub routed_to: Vec<String>,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub retried: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// `final` for x-sink / x-sump entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// A hop as the gateway receives it (in process or over `POST /reports`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopUpdate {
    pub entry: HopEntry,
    /// Number of messages the hop sent (retries excluded).
    pub sent: usize,
    /// Next actor of the (first) routing output, when there was one.
    pub next_actor: Option<String>,
    pub actors_completed: usize,
    pub total_actors: usize,
    /// A frame of the hop carried `x-asya-pause` (this metadata) and was parked on the
    /// `x-pause` queue: the task is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Value>,
}

/// A final envelope as the gateway receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalUpdate {
    pub actor: String,
    pub envelope_id: String,
    #[serde(default)]
    pub parent_id: Option<String>,
    pub phase: Option<Phase>,
    pub reason: Option<Reason>,
    #[serde(default)]
    pub error: Option<ErrorInfo>,
    pub payload: Value,
    /// Actors named by the route (processed ones).
    pub actors_completed: usize,
    pub total_actors: usize,
    /// Actor that produced the final state.
    #[serde(default)]
    pub status_actor: Option<String>,
    pub received_at: String,
    /// The envelope went to the sump actor.
    pub to_sump: bool,
}

/// The stored task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub trace_id: String,
    pub flow: Option<String>,
    pub route: Vec<String>,
    pub status: TaskStatus,
    pub current_actor_name: Option<String>,
    pub actors_completed: usize,
    pub total_actors: usize,
    pub result: Option<Value>,
    pub error: Option<ErrorInfo>,
    pub created_at: String,
    pub updated_at: String,
    pub deadline_at: Option<String>,
    /// Branches that have not reached x-sink / x-sump yet.
    pub outstanding: i64,
    /// Envelope ids whose hop was reported.
    pub hops_seen: BTreeSet<String>,
    /// `actor:hop:envelope id` of every counted hop report, and the envelope ids of every
    /// counted final report: transports deliver at least once, so a redelivered envelope
    /// can be reported twice (NATS.md, "Known limit"); it is counted once.
    #[serde(default)]
    pub counted: BTreeSet<String>,
    /// Parents named by reports.
    pub parents: BTreeSet<String>,
    /// Final payloads of succeeded branches, in arrival order.
    pub results: Vec<Value>,
    /// More than one branch was created.
    pub fanned_out: bool,
    pub timeline: Vec<HopEntry>,
    /// The `x-asya-pause` metadata of the frame that paused the task.
    #[serde(default)]
    pub pause_metadata: Option<Value>,
    /// The parked frame (envelope JSON) while paused: what `resume` republishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<String>,
    /// When the frame was parked (RFC 3339): the SLA clock stops there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<String>,
    /// The pause's own timeout (metadata `timeout`) as a time: past it the task fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_until: Option<String>,
    /// Times the task was resumed.
    #[serde(default)]
    pub resumed: u32,
}

/// Timeline entries kept per task (a runaway fan-out must not grow a record forever).
pub const MAX_TIMELINE: usize = 1000;

impl Task {
    pub fn new(
        id: String,
        trace_id: String,
        flow: Option<String>,
        route: Vec<String>,
        deadline_at: Option<String>,
    ) -> Task {
        let now = now_rfc3339();
        Task {
            current_actor_name: route.first().cloned(),
            total_actors: route.len(),
            id,
            trace_id,
            flow,
            route,
            status: TaskStatus::Pending,
            actors_completed: 0,
            result: None,
            error: None,
            created_at: now.clone(),
            updated_at: now,
            deadline_at,
            outstanding: 1,
            hops_seen: BTreeSet::new(),
            counted: BTreeSet::new(),
            parents: BTreeSet::new(),
            results: Vec::new(),
            fanned_out: false,
            timeline: Vec::new(),
            pause_metadata: None,
            parked: None,
            paused_at: None,
            pause_until: None,
            resumed: 0,
        }
    }

    pub fn view(&self) -> TaskView {
        TaskView {
            id: self.id.clone(),
            status: self.status,
            current_actor_name: self.current_actor_name.clone(),
            actors_completed: self.actors_completed,
            total_actors: self.total_actors,
            result: self.result.clone(),
            error: self.error.clone(),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            trace_id: self.trace_id.clone(),
            flow: self.flow.clone(),
            deadline_at: self.deadline_at.clone(),
            pause_metadata: self.pause_metadata.clone(),
        }
    }

    fn push_entry(&mut self, e: HopEntry) {
        if self.timeline.len() < MAX_TIMELINE {
            self.timeline.push(e);
        }
    }

    /// Apply a hop report.
    pub fn apply_hop(&mut self, h: HopUpdate) {
        self.updated_at = now_rfc3339();
        let retried = h.entry.retried;
        let envelope_id = h.entry.envelope_id.clone();
        let parent = h.entry.parent_id.clone();
        let key = format!("{}:{}:{envelope_id}", h.entry.actor, h.actors_completed);
        // Every report shows in the timeline, a redelivered one too.
        self.push_entry(h.entry);
        if retried {
            // The same delivery comes back; it is counted when it is finally settled.
            return;
        }
        if !self.counted.insert(key) {
            return;
        }
        if !self.hops_seen.insert(envelope_id) {
            // A later hop of the same branch: the branch count only changes by fan-out.
        }
        if let Some(p) = parent {
            self.parents.insert(p);
        }
        // Saturating: a report is checked at the HTTP edge, this keeps any other caller
        // from overflowing the count.
        let sent = i64::try_from(h.sent).unwrap_or(i64::MAX);
        self.outstanding = self.outstanding.saturating_add(sent).saturating_sub(1);
        if h.sent > 1 {
            self.fanned_out = true;
        }
        if self.status.is_final() {
            return;
        }
        if self.status == TaskStatus::Pending {
            self.status = TaskStatus::Running;
        }
        if let Some(meta) = h.pause {
            // The parked frame stays an outstanding branch: the task cannot finish while
            // paused. (A report that arrives after a resume does not pause again: the
            // gateway's parking pauses a resumed task, when it pauses anew.)
            if self.resumed == 0 || self.parked.is_some() {
                self.status = TaskStatus::Paused;
                self.pause_metadata = Some(meta);
            }
        }
        if h.actors_completed >= self.actors_completed {
            self.actors_completed = h.actors_completed;
            self.total_actors = h.total_actors.max(h.actors_completed);
            if let Some(n) = h.next_actor {
                self.current_actor_name = Some(n);
            }
        }
        self.maybe_finish();
    }

    /// Apply a final (x-sink / x-sump) report.
    pub fn apply_final(&mut self, f: FinalUpdate) {
        // The first frame of a call keeps the input's id, so one id can end twice: a streamed
        // frame at x-sink and the input at x-sump when the stream then failed. The end actor
        // and the reason tell them apart; a redelivered copy has the same ones.
        let key = format!("final:{}:{}:{:?}", f.actor, f.envelope_id, f.reason);
        if !self.counted.insert(key) {
            return;
        }
        self.updated_at = now_rfc3339();
        let failed = f.to_sump || f.phase == Some(Phase::Failed);
        self.push_entry(HopEntry {
            actor: f.actor.clone(),
            envelope_id: f.envelope_id.clone(),
            parent_id: f.parent_id.clone(),
            received_at: f.received_at.clone(),
            duration_ms: 0.0,
            runtime_ms: None,
            routed_to: Vec::new(),
            attempt: 0,
            retried: false,
            error: f.error.clone(),
            kind: Some("final".into()),
        });
        if let Some(p) = &f.parent_id {
            self.parents.insert(p.clone());
        }
        self.outstanding = self.outstanding.saturating_sub(1);
        if self.status.is_final() {
            return;
        }
        if self.status == TaskStatus::Pending {
            self.status = TaskStatus::Running;
        }
        if f.phase == Some(Phase::Paused) {
            self.status = TaskStatus::Paused;
        }
        if failed {
            if self.error.is_none() {
                let mut err = f.error.clone().unwrap_or_else(|| {
                    ErrorInfo::new(
                        f.reason
                            .map(|r| format!("{r:?}"))
                            .unwrap_or_else(|| "Failed".into()),
                        "task failed",
                    )
                });
                if err.kind.is_empty() {
                    if let Some(r) = f.reason {
                        err.kind = format!("{r:?}");
                    }
                }
                self.error = Some(err);
            }
            if let Some(a) = f.status_actor {
                self.current_actor_name = Some(a);
            }
        } else {
            self.results.push(f.payload);
            self.actors_completed = self.actors_completed.max(f.actors_completed);
            self.total_actors = self.total_actors.max(f.total_actors);
        }
        self.maybe_finish();
    }

    fn parents_known(&self) -> bool {
        self.parents.iter().all(|p| self.hops_seen.contains(p))
    }

    fn maybe_finish(&mut self) {
        if self.outstanding > 0 || !self.parents_known() {
            return;
        }
        // Every branch has ended.
        if self.error.is_some() {
            self.status = TaskStatus::Failed;
        } else {
            self.status = TaskStatus::Succeeded;
            self.actors_completed = self.actors_completed.max(self.total_actors);
            self.current_actor_name = None;
        }
        self.result = if self.fanned_out {
            Some(Value::Array(std::mem::take(&mut self.results)))
        } else {
            std::mem::take(&mut self.results).into_iter().next()
        };
        if self.status == TaskStatus::Failed && self.result == Some(Value::Array(vec![])) {
            self.result = None;
        }
    }

    /// Cancel (no effect on a final task). Returns whether it changed.
    pub fn cancel(&mut self) -> bool {
        if self.status.is_final() {
            return false;
        }
        self.status = TaskStatus::Canceled;
        self.updated_at = now_rfc3339();
        true
    }

    /// Park a paused frame (`frame`: its envelope JSON; `meta`: its `x-asya-pause` value):
    /// the task is paused from `now`, until the metadata's `timeout` (seconds, or a duration
    /// such as `"30s"`) when it has one. False when the task is final already.
    pub fn park(&mut self, frame: String, meta: Value, now: chrono::DateTime<chrono::Utc>) -> bool {
        if self.status.is_final() {
            return false;
        }
        let timeout = match meta.get("timeout") {
            Some(Value::Number(n)) => n.as_f64().filter(|s| *s > 0.0 && s.is_finite()).map(|s| {
                std::time::Duration::from_secs_f64(s.min(super::MAX_TIMEOUT.as_secs_f64()))
            }),
            Some(Value::String(t)) => crate::config::parse_duration(t).ok(),
            _ => None,
        };
        self.pause_until = timeout
            .and_then(|t| chrono::Duration::from_std(t).ok())
            .and_then(|t| now.checked_add_signed(t))
            .map(rfc3339);
        self.paused_at = Some(rfc3339(now));
        self.parked = Some(frame);
        self.pause_metadata = Some(meta);
        self.status = TaskStatus::Paused;
        self.updated_at = now_rfc3339();
        true
    }

    /// Fail with Timeout a task paused past its pause timeout.
    pub fn pause_expire(&mut self, now: chrono::DateTime<chrono::Utc>) -> bool {
        if self.status != TaskStatus::Paused {
            return false;
        }
        let Some(until) = self
            .pause_until
            .as_deref()
            .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
        else {
            return false;
        };
        if now < until.with_timezone(&chrono::Utc) {
            return false;
        }
        self.status = TaskStatus::Failed;
        self.error = Some(ErrorInfo::new(
            "Timeout",
            "the task was paused longer than its pause timeout and was not resumed",
        ));
        self.parked = None;
        self.updated_at = now_rfc3339();
        true
    }

    /// Mark failed with Timeout when the deadline passed long ago and no final arrived
    /// (never while paused: the SLA clock is frozen then; resume shifts the deadline).
    pub fn expire(&mut self, grace: chrono::Duration) -> bool {
        if self.status.is_final() || self.status == TaskStatus::Paused {
            return false;
        }
        let Some(d) = self
            .deadline_at
            .as_deref()
            .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok())
        else {
            return false;
        };
        let Some(limit) = d.with_timezone(&chrono::Utc).checked_add_signed(grace) else {
            return false;
        };
        if chrono::Utc::now() < limit {
            return false;
        }
        self.status = TaskStatus::Failed;
        self.error = Some(ErrorInfo::new(
            "Timeout",
            "deadline passed and no actor reported a final state",
        ));
        self.updated_at = now_rfc3339();
        true
    }
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(id: &str, parent: Option<&str>, actor: &str, sent: usize, done: usize) -> HopUpdate {
        HopUpdate {
            entry: HopEntry {
                actor: actor.into(),
                envelope_id: id.into(),
                parent_id: parent.map(Into::into),
                received_at: now_rfc3339(),
                duration_ms: 1.0,
                runtime_ms: Some(0.5),
                routed_to: vec![],
                attempt: 1,
                retried: false,
                error: None,
                kind: None,
            },
            sent,
            next_actor: None,
            actors_completed: done,
            total_actors: 2,
            pause: None,
        }
    }

    fn fin(id: &str, parent: Option<&str>, payload: Value, fail: bool) -> FinalUpdate {
        FinalUpdate {
            actor: if fail { "x-sump" } else { "x-sink" }.into(),
            envelope_id: id.into(),
            parent_id: parent.map(Into::into),
            phase: Some(if fail {
                Phase::Failed
            } else {
                Phase::Succeeded
            }),
            reason: None,
            error: fail.then(|| ErrorInfo::new("ValueError", "boom")),
            payload,
            actors_completed: 2,
            total_actors: 2,
            status_actor: None,
            received_at: now_rfc3339(),
            to_sump: fail,
        }
    }

    fn task() -> Task {
        Task::new(
            "t".into(),
            "tr".into(),
            None,
            vec!["a".into(), "b".into()],
            None,
        )
    }

    #[test]
    fn linear_task_succeeds_in_any_order() {
        let mut t = task();
        t.apply_hop(hop("t", None, "a", 1, 1));
        assert_eq!(t.status, TaskStatus::Running);
        t.apply_final(fin("t", None, Value::from(7), false));
        assert_eq!(t.status, TaskStatus::Succeeded);
        t.apply_hop(hop("t", None, "b", 1, 2));
        assert_eq!(t.status, TaskStatus::Succeeded);
        assert_eq!(t.result, Some(Value::from(7)));
        assert_eq!(t.actors_completed, 2);
        assert_eq!(t.timeline.len(), 3);
    }

    #[test]
    fn fan_out_waits_for_the_parent_hop_and_every_branch() {
        let mut t = task();
        t.apply_final(fin("c1", Some("t"), Value::from(1), false));
        t.apply_final(fin("c2", Some("t"), Value::from(2), false));
        assert_eq!(t.status, TaskStatus::Running);
        t.apply_hop(hop("t", None, "a", 2, 1));
        assert_eq!(t.status, TaskStatus::Succeeded);
        assert_eq!(t.result, Some(serde_json::json!([1, 2])));
    }

    #[test]
    fn final_state_is_never_overwritten() {
        let mut t = task();
        t.apply_final(fin("t", None, Value::Null, true));
        assert_eq!(t.status, TaskStatus::Failed);
        t.apply_final(fin("t", None, Value::from(1), false));
        assert_eq!(t.status, TaskStatus::Failed);
        assert!(!t.cancel());
        assert_eq!(t.error.as_ref().unwrap().kind, "ValueError");
    }

    #[test]
    fn redelivered_reports_are_counted_once() {
        // At-least-once transports can deliver a hop's input or a final envelope twice.
        let mut t = task();
        t.apply_hop(hop("t", None, "a", 2, 1));
        t.apply_hop(hop("t", None, "a", 2, 1));
        t.apply_final(fin("c1", Some("t"), Value::from(1), false));
        t.apply_final(fin("c1", Some("t"), Value::from(1), false));
        assert_eq!(t.status, TaskStatus::Running, "c2 is still outstanding");
        t.apply_final(fin("c2", Some("t"), Value::from(2), false));
        assert_eq!(t.status, TaskStatus::Succeeded);
        assert_eq!(t.result, Some(serde_json::json!([1, 2])));
    }

    #[test]
    fn retried_hops_do_not_count() {
        let mut t = task();
        let mut h = hop("t", None, "a", 0, 1);
        h.entry.retried = true;
        t.apply_hop(h);
        assert_eq!(t.outstanding, 1);
    }

    #[test]
    fn a_parked_task_is_paused_its_sla_frozen_and_its_pause_timeout_fails_it() {
        let mut t = Task::new(
            "t".into(),
            "t".into(),
            None,
            vec!["a".into()],
            Some("2000-01-01T00:00:00Z".into()),
        );
        let now = chrono::Utc::now();
        assert!(t.park("{}".into(), serde_json::json!({"timeout": "10s"}), now));
        assert_eq!(t.status, TaskStatus::Paused);
        assert!(
            !t.clone().expire(chrono::Duration::zero()),
            "SLA frozen while paused"
        );
        assert!(!t.pause_expire(now + chrono::Duration::seconds(9)));
        assert!(t.pause_expire(now + chrono::Duration::seconds(10)));
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.error.as_ref().unwrap().kind, "Timeout");
        assert!(t.parked.is_none());
        assert!(
            !t.park("{}".into(), Value::Null, now),
            "a final task stays final"
        );
        // Without a timeout, a pause lasts.
        let mut t = Task::new("u".into(), "u".into(), None, vec!["a".into()], None);
        assert!(t.park("{}".into(), serde_json::json!({"timeout": "soon"}), now));
        assert!(!t.pause_expire(now + chrono::Duration::days(365)));
    }
}
