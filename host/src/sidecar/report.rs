//! What a sidecar tells the gateway (progress, hop timings, final states). Reporting never
//! blocks or fails routing: a [`Reporter`] must return at once (queue and drop when full).

use std::time::Duration;

use serde_json::Value;

use crate::envelope::{Envelope, ErrorInfo};
use crate::metrics::MessageType;
use crate::queue::QueueName;

/// Receives reports from the sidecar loop. Must not block.
pub trait Reporter: Send + Sync {
    fn report(&self, report: Report);
}

/// One report.
#[derive(Debug)]
pub enum Report {
    /// A routing actor finished one delivery.
    Hop(HopReport),
    /// Progress or partial output from a streaming handler (SSE `upstream`).
    Upstream {
        envelope_id: String,
        trace_id: String,
        actor: String,
        payload: Value,
    },
    /// An end actor (x-sink / x-sump) received a final envelope.
    Final { actor: String, envelope: Envelope },
}

/// Timeline entry of one hop.
#[derive(Debug)]
pub struct HopReport {
    pub envelope_id: String,
    pub parent_id: Option<String>,
    pub trace_id: String,
    pub actor: String,
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// Receive to last send.
    pub duration: Duration,
    /// The runtime call alone, when one was made.
    pub runtime: Option<Duration>,
    /// Destination queues and why each message was sent.
    pub sent: Vec<(QueueName, MessageType)>,
    /// The delivery was handed back for a retry.
    pub retried: bool,
    /// Delivery count of the input.
    pub attempt: u32,
    pub error: Option<ErrorInfo>,
    /// A frame carried `x-asya-pause`: its metadata (the task is paused; the frame is parked
    /// on the `x-pause` queue instead of being routed).
    pub paused: Option<Value>,
    /// Actors that have processed the envelope, this one included.
    pub actors_completed: usize,
    /// Actors named by the input route.
    pub total_actors: usize,
}

/// What one delivery did, collected as it goes.
#[derive(Debug, Default)]
pub(super) struct HopLog {
    pub sent: Vec<(QueueName, MessageType)>,
    pub runtime: Option<Duration>,
    pub error: Option<ErrorInfo>,
    pub paused: Option<Value>,
}
