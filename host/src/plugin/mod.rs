//! Route policies as seen by the sidecar: a policy looks at the input envelope and one
//! outgoing frame and decides what happens to the frame (SPEC §7). The WebAssembly engine
//! that runs policy components implements [`RoutePolicy`].

use async_trait::async_trait;

use crate::envelope::{Envelope, Route};

/// What a policy decided for one outgoing frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Route the frame as it is.
    Keep,
    /// Route the frame with this route (the host re-checks the route rules).
    ReplaceRoute(Route),
    /// Send the frame to x-sump with `PolicyRejected` and this reason.
    Reject(String),
    /// End the frame's journey successfully: send it to x-sink.
    SendToSink,
    /// Send the frame to x-sump with this reason.
    SendToSump(String),
}

/// A policy failed to decide (trap, deadline, memory limit, bad answer).
#[derive(Debug, thiserror::Error)]
#[error("policy {plugin} failed: {message}")]
pub struct PolicyError {
    pub plugin: String,
    pub message: String,
}

/// Decides the fate of outgoing frames. Implementations must be cheap to call per frame.
#[async_trait]
pub trait RoutePolicy: Send + Sync {
    async fn decide(&self, input: &Envelope, frame: &Envelope) -> Result<Decision, PolicyError>;
}
