//! Queue transports (SPEC §8). The sidecar loop only sees [`Transport`], [`Receiver`] and
//! [`Delivery`]; `memory`, `nats` and `wasm` implement them.
//!
//! Semantics every transport provides (the conformance suite checks them):
//! - `send` returns once the broker has accepted the message (durably, where it can).
//! - A delivery is redelivered unless it is acked; `nack(delay)` redelivers after `delay`.
//! - `Delivery::attempt` counts deliveries of the same message, starting at 1.
//! - Messages carry an id; transports that deduplicate drop a second send of the same id.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use crate::queue::QueueName;

pub mod conformance;
pub mod memory;
pub mod nats;
pub mod wasm;

pub use crate::config::TransportKind;

/// A failure of the broker or of the transport plugin. [`TransportError::is_retryable`]
/// tells "try again later" (broker down, timeout) from "never" (this message is too large
/// or malformed for the broker): the sidecar retries the first and sends the input of the
/// second to x-sump at once.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("transport is closed")]
    Closed,
    #[error("queue {queue}: {message}")]
    Queue { queue: String, message: String },
    /// The broker can never accept this message (too large, invalid); retrying is useless.
    #[error("queue {queue}: message rejected: {message}")]
    Rejected { queue: String, message: String },
    /// A transport component's error, with its own verdict on retrying (the WIT
    /// `plugin-error.retryable`).
    #[error("wasm transport: {op} failed: {message}")]
    Plugin {
        op: &'static str,
        message: String,
        retryable: bool,
    },
    /// This transport cannot be used as configured.
    #[error("{0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Broker {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl TransportError {
    /// False when trying again cannot help: the message itself is the problem (or the
    /// transport cannot be used as configured).
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Rejected { .. } | TransportError::Unavailable(_) => false,
            TransportError::Plugin { retryable, .. } => *retryable,
            TransportError::Closed
            | TransportError::Queue { .. }
            | TransportError::Broker { .. } => true,
        }
    }

    pub fn broker(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        TransportError::Broker {
            context,
            source: source.into(),
        }
    }
}

/// What the broker said about a batch of accepted messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sent {
    /// Indexes of the messages the broker dropped as duplicates of one it already stored.
    pub duplicates: Vec<usize>,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct OutMessage {
    /// Destination queue.
    pub queue: QueueName,
    /// Deterministic message id, used for deduplication where the transport supports it.
    pub id: String,
    pub body: Bytes,
}

/// Publish and subscribe.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    fn kind(&self) -> TransportKind;

    /// Start consuming `queue`; at most `prefetch` deliveries are outstanding: buffered or
    /// handed out, and not yet being settled. A transport may take the next delivery once
    /// [`Acker::ack`] or [`Acker::nack`] has started (NATS does, so the next pull overlaps
    /// the confirmation of the last ack); the sidecar settles at most one delivery per
    /// worker in the background.
    async fn subscribe(
        &self,
        queue: &QueueName,
        prefetch: usize,
    ) -> Result<Box<dyn Receiver>, TransportError>;

    /// Publish one message; returns when the broker accepted it.
    async fn send(&self, msg: OutMessage) -> Result<(), TransportError>;

    /// Publish several messages; returns when all were accepted, with the number the
    /// broker recognised as duplicates of messages it already had (same id within its
    /// deduplication window) and dropped. Transports that can pipeline publishes override
    /// this.
    async fn send_all(&self, msgs: Vec<OutMessage>) -> Result<Sent, TransportError> {
        for m in msgs {
            self.send(m).await?;
        }
        Ok(Sent::default())
    }

    /// The largest message (body bytes) the broker accepts, when the transport knows it.
    /// The sidecar cuts an x-sump copy down to fit it.
    fn max_message_bytes(&self) -> Option<usize> {
        None
    }

    /// Make sure `queues` exist (idempotent).
    async fn ensure_queues(&self, _queues: &[QueueName]) -> Result<(), TransportError> {
        Ok(())
    }

    /// True while connected to the broker (for `/readyz`).
    fn is_connected(&self) -> bool {
        true
    }

    /// Messages of `queue` not yet acknowledged: waiting plus delivered and unacked
    /// (`asya_actor_queue_depth`, the autoscaling signal). `Ok(None)`: this transport cannot
    /// tell, or the queue does not exist yet (the default).
    async fn queue_depth(&self, _queue: &QueueName) -> Result<Option<u64>, TransportError> {
        Ok(None)
    }

    /// The sidecar's metrics, for transports that count their own failures (a transport
    /// component's traps and deadlines). Default: nothing to count.
    fn attach_metrics(&self, _metrics: std::sync::Arc<crate::metrics::Metrics>) {}
}

/// The consuming side of one queue.
#[async_trait]
pub trait Receiver: Send {
    /// Wait for the next delivery. Cancel-safe: dropping the future loses nothing.
    async fn recv(&mut self) -> Result<Delivery, TransportError>;
}

/// Acknowledgement of one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message is done; it will not be delivered again.
    async fn ack(self: Box<Self>) -> Result<(), TransportError>;
    /// Deliver the message again after `delay`.
    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), TransportError>;
    /// Still working on it: extend the redelivery timer.
    async fn in_progress(&self) -> Result<(), TransportError> {
        Ok(())
    }
    /// How often the loop calls [`Acker::in_progress`] while the runtime works on the
    /// message (`None`: the transport has no redelivery timer to extend).
    fn progress_interval(&self) -> Option<Duration> {
        None
    }
}

/// A received message.
pub struct Delivery {
    pub body: Bytes,
    /// 1 for the first delivery, +1 for every redelivery.
    pub attempt: u32,
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("len", &self.body.len())
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// A standalone sidecar's transport as configured (`ASYA_TRANSPORT` and its variables).
#[derive(Debug, Clone, PartialEq)]
// Built once at start-up and moved, never copied per message: the size gap is harmless.
#[allow(clippy::large_enum_variant)]
pub enum TransportSettings {
    /// Only inside one process (`asya-host up`); refused by [`connect`].
    Memory,
    Nats(nats::NatsConfig),
    Wasm(wasm::WasmSettings),
}

impl TransportSettings {
    /// The variables of `kind`'s transport from `src`.
    pub fn from_source(
        kind: TransportKind,
        src: &dyn crate::config::Source,
    ) -> Result<TransportSettings, crate::config::ConfigError> {
        Ok(match kind {
            TransportKind::Memory => TransportSettings::Memory,
            TransportKind::Nats => TransportSettings::Nats(nats::NatsConfig::from_source(src)?),
            TransportKind::Wasm => TransportSettings::Wasm(wasm::WasmSettings::from_source(src)?),
        })
    }
}

/// Connect the transport of a standalone sidecar.
pub async fn connect(
    settings: &TransportSettings,
) -> Result<std::sync::Arc<dyn Transport>, TransportError> {
    match settings {
        TransportSettings::Memory => Err(TransportError::Unavailable(
            "ASYA_TRANSPORT=memory only works inside one process (`asya-host up`); use nats or wasm for a standalone sidecar".into(),
        )),
        TransportSettings::Nats(cfg) => Ok(std::sync::Arc::new(
            nats::NatsTransport::connect(cfg.clone()).await?,
        )),
        TransportSettings::Wasm(settings) => {
            let cfg = settings
                .resolve()
                .await
                .map_err(|e| TransportError::Unavailable(e.to_string()))?;
            Ok(std::sync::Arc::new(wasm::WasmTransport::connect(cfg).await?))
        }
    }
}
