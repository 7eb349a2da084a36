//! Reports in the gateway's own form ([`WireReport`], also the body of `POST /reports`) and
//! the in-process reporter.

use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::task::{FinalUpdate, HopEntry, HopUpdate};
use super::Gateway;
use crate::envelope::{now_rfc3339, Phase};
use crate::metrics::MessageType;
use crate::queue::QueueName;
use crate::sidecar::{Report, Reporter};

/// One report, as sent to `POST /reports` (a JSON array of these).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WireReport {
    Hop {
        trace_id: String,
        hop: HopUpdate,
    },
    Final {
        trace_id: String,
        fin: FinalUpdate,
    },
    Upstream {
        envelope_id: String,
        trace_id: String,
        actor: String,
        payload: Value,
    },
}

/// Bound on the counts a report may carry (messages sent by one hop, actors of a route):
/// far above any real value, far below what could overflow the task's arithmetic.
pub const MAX_REPORT_COUNT: usize = 1 << 20;

impl WireReport {
    /// Check the numbers of a report received over HTTP; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let check = |field: &str, v: usize| {
            if v > MAX_REPORT_COUNT {
                Err(format!(
                    "{field}: {v} is out of range (at most {MAX_REPORT_COUNT})"
                ))
            } else {
                Ok(())
            }
        };
        match self {
            WireReport::Hop { hop, .. } => {
                check("hop.sent", hop.sent)?;
                check("hop.actors_completed", hop.actors_completed)?;
                check("hop.total_actors", hop.total_actors)
            }
            WireReport::Final { fin, .. } => {
                check("fin.actors_completed", fin.actors_completed)?;
                check("fin.total_actors", fin.total_actors)
            }
            WireReport::Upstream { .. } => Ok(()),
        }
    }
}

/// Names a report needs: which end actor is the sump.
#[derive(Debug, Clone)]
pub struct Naming {
    pub sump: String,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl WireReport {
    /// Convert a sidecar report.
    pub fn from_report(r: Report, naming: &Naming) -> WireReport {
        match r {
            Report::Hop(h) => {
                let sent: Vec<&(QueueName, MessageType)> = h
                    .sent
                    .iter()
                    .filter(|(_, t)| *t != MessageType::Retry)
                    .collect();
                let next_actor = sent
                    .iter()
                    .find(|(_, t)| *t == MessageType::Routing)
                    .map(|(q, _)| q.actor().to_owned());
                let routed_to = sent.iter().map(|(q, _)| q.actor().to_owned()).collect();
                WireReport::Hop {
                    trace_id: h.trace_id,
                    hop: HopUpdate {
                        sent: sent.len(),
                        next_actor,
                        actors_completed: h.actors_completed,
                        total_actors: h.total_actors,
                        pause: h.paused,
                        entry: HopEntry {
                            actor: h.actor,
                            envelope_id: h.envelope_id,
                            parent_id: h.parent_id,
                            received_at: h
                                .received_at
                                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                            duration_ms: ms(h.duration),
                            runtime_ms: h.runtime.map(ms),
                            routed_to,
                            attempt: h.attempt,
                            retried: h.retried,
                            error: h.error,
                            kind: None,
                        },
                    },
                }
            }
            Report::Upstream {
                envelope_id,
                trace_id,
                actor,
                payload,
            } => WireReport::Upstream {
                envelope_id,
                trace_id,
                actor,
                payload,
            },
            Report::Final { actor, envelope } => {
                let st = envelope.status.clone().unwrap_or_default();
                let payload = serde_json::from_str(envelope.payload.get()).unwrap_or(Value::Null);
                let to_sump = actor == naming.sump;
                let payload = if to_sump {
                    unwrap_sump_payload(payload)
                } else {
                    payload
                };
                let processed =
                    envelope.route.prev.len() + usize::from(!envelope.route.curr.is_empty());
                WireReport::Final {
                    trace_id: envelope.trace_id().into_owned(),
                    fin: FinalUpdate {
                        to_sump,
                        actor,
                        envelope_id: envelope.id.clone(),
                        parent_id: envelope.parent_id.clone(),
                        phase: st.phase.or(Some(Phase::Succeeded)),
                        reason: st.reason,
                        error: st.error,
                        payload,
                        actors_completed: processed,
                        total_actors: envelope.route.actors().count(),
                        status_actor: st.actor,
                        received_at: now_rfc3339(),
                    },
                }
            }
        }
    }
}

/// The payload an x-sump envelope failed with: x-sump payloads have upstream's shape
/// `{"error", "details", "original_payload"}`; anything else is taken as it is.
pub fn unwrap_sump_payload(payload: Value) -> Value {
    match payload {
        Value::Object(mut m) if m.contains_key("original_payload") && m.contains_key("error") => {
            m.remove("original_payload").unwrap_or(Value::Null)
        }
        other => other,
    }
}

/// Reporter for sidecars and end actors in the gateway's process.
pub(super) struct InProcess {
    pub gw: Weak<Gateway>,
}

impl Reporter for InProcess {
    fn report(&self, report: Report) {
        if let Some(gw) = self.gw.upgrade() {
            let naming = Naming {
                sump: gw.sump().to_owned(),
            };
            gw.enqueue(WireReport::from_report(report, &naming));
        }
    }
}

/// Sends every report to each of several reporters (e.g. the gateway and OTLP).
pub struct Tee(pub Vec<Arc<dyn Reporter>>);

impl Reporter for Tee {
    fn report(&self, report: Report) {
        // Reports are not Clone; the ones we fan out are rebuilt from their parts.
        let n = self.0.len();
        if n == 0 {
            return;
        }
        let mut copies = clone_n(report, n);
        for r in self.0.iter().rev() {
            if let Some(c) = copies.pop() {
                r.report(c);
            }
        }
    }
}

fn clone_n(report: Report, n: usize) -> Vec<Report> {
    let mut out = Vec::with_capacity(n);
    for _ in 1..n {
        out.push(clone_report(&report));
    }
    out.push(report);
    out
}

fn clone_report(r: &Report) -> Report {
    match r {
        Report::Hop(h) => Report::Hop(crate::sidecar::HopReport {
            envelope_id: h.envelope_id.clone(),
            parent_id: h.parent_id.clone(),
            trace_id: h.trace_id.clone(),
            actor: h.actor.clone(),
            received_at: h.received_at,
            duration: h.duration,
            runtime: h.runtime,
            sent: h.sent.clone(),
            retried: h.retried,
            attempt: h.attempt,
            error: h.error.clone(),
            paused: h.paused.clone(),
            actors_completed: h.actors_completed,
            total_actors: h.total_actors,
        }),
        Report::Upstream {
            envelope_id,
            trace_id,
            actor,
            payload,
        } => Report::Upstream {
            envelope_id: envelope_id.clone(),
            trace_id: trace_id.clone(),
            actor: actor.clone(),
            payload: payload.clone(),
        },
        Report::Final { actor, envelope } => Report::Final {
            actor: actor.clone(),
            envelope: envelope.clone(),
        },
    }
}
