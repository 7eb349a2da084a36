//! Route policies as seen by the sidecar: a policy looks at the input envelope and one
//! outgoing frame and decides what happens to the frame (SPEC §7). The WebAssembly engine
//! that runs policy components implements [`RoutePolicy`] with [`PolicyChain`].
//!
//! - [`engine`]: wasmtime engine, compiled-code cache, epoch ticker, store limits, sandbox
//! - `bindings`: the one `bindgen!` site (WIT in `wit/`), converted to domain types there
//! - [`policy`]: `ASYA_ROUTE_POLICIES`, instance pools, the chain
//! - [`check()`]: `asya-host plugin check`
//! - [`scaffold`]: `asya-host plugin new`

use std::borrow::Cow;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::envelope::{Envelope, Route};

pub(crate) mod bindings;
pub mod check;
pub mod engine;
mod json_path;
pub mod policy;
pub mod scaffold;

pub use check::{check, CheckReport, World};
pub use engine::PluginEngine;
pub use policy::{PolicyChain, PolicyOptions, PolicyPlugin, PolicySpec};

/// Variables read by the plugin engine.
pub mod vars {
    /// Ordered route policies: a JSON array `[{"path": ..., "config": ...}]` or
    /// comma-separated `.wasm` paths.
    pub const ROUTE_POLICIES: &str = "ASYA_ROUTE_POLICIES";
    /// Where compiled components are cached (default `$XDG_CACHE_HOME/asya` or
    /// `~/.cache/asya`).
    pub const PLUGIN_CACHE_DIR: &str = "ASYA_PLUGIN_CACHE_DIR";
    /// CPU deadline per plugin call (default 50ms).
    pub const PLUGIN_DEADLINE: &str = "ASYA_PLUGIN_DEADLINE";
    /// Memory limit per plugin instance (default 32MiB).
    pub const PLUGIN_MEMORY_LIMIT: &str = "ASYA_PLUGIN_MEMORY_LIMIT";
}

/// Longest reason text kept from a guest.
pub(crate) const MAX_REASON: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}...", &s[..end]))
}

/// A plugin that cannot be loaded or does not fit the contract. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a WebAssembly component: {message}", path.display())]
    NotComponent { path: PathBuf, message: String },
    #[error("{}: cannot compile: {message}", path.display())]
    Compile { path: PathBuf, message: String },
    #[error("{}: wrong world: {message}", path.display())]
    WrongWorld { path: PathBuf, message: String },
    #[error("{}: imports this host cannot satisfy: {message}", path.display())]
    Imports { path: PathBuf, message: String },
    #[error("{}: exports do not match the contract: {message}", path.display())]
    Exports { path: PathBuf, message: String },
    #[error("{}: cannot instantiate: {message}", path.display())]
    Instantiate { path: PathBuf, message: String },
    #[error("{}: configure failed: {message}", path.display())]
    Configure { path: PathBuf, message: String },
    #[error("plugin engine: {0}")]
    Engine(String),
}

/// Loading the policy chain from configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

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
