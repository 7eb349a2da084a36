//! `asya-host provision`: create a namespace's queues on the configured transport, x-sink
//! and x-sump included (idempotent).
//!
//! - `nats`: the JetStream stream and durable consumers ([`nats::provision`]).
//! - `wasm`: [`Transport::ensure_queues`], i.e. `receive(queue, 0, 0)` per queue, the
//!   transport contract's "make sure it exists" (`wit/transport.wit`). The component
//!   creates its own layout: RabbitMQ's topic exchange, durable queue and binding by actor
//!   (or, with `"declare": false`, checks that the operator created them).

use crate::config::ConfigError;
use crate::queue::{EndActors, InvalidName, QueueName};
use crate::transport::nats;
use crate::transport::{wasm, Transport, TransportError, TransportSettings};

/// Why `provision` failed. One line each.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Name(#[from] InvalidName),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Nats(#[from] nats::ProvisionError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("ASYA_TRANSPORT=memory has no queues to provision (use nats or wasm)")]
    Memory,
}

/// The queues of `actors` of `namespace`, then those of the end actors.
pub fn queues(
    namespace: &str,
    actors: &[String],
    ends: &EndActors,
) -> Result<Vec<QueueName>, InvalidName> {
    ends.with_actors(actors.iter().map(String::as_str))
        .iter()
        .map(|a| QueueName::new(namespace, a))
        .collect()
}

/// Create the queues of `actors` and of `ends` in `namespace`; one line per queue created
/// or checked, for the operator.
pub async fn provision(
    transport: &TransportSettings,
    namespace: &str,
    actors: &[String],
    ends: &EndActors,
) -> Result<Vec<String>, ProvisionError> {
    match transport {
        TransportSettings::Memory => Err(ProvisionError::Memory),
        TransportSettings::Nats(cfg) => {
            let locs = nats::provision(cfg.clone(), namespace, actors, ends).await?;
            Ok(locs
                .into_iter()
                .map(|l| {
                    format!(
                        "stream {} subject {} consumer {}",
                        l.stream, l.subject, l.consumer
                    )
                })
                .collect())
        }
        TransportSettings::Wasm(settings) => {
            let queues = queues(namespace, actors, ends)?;
            let t = wasm::WasmTransport::connect(settings.resolve().await?).await?;
            t.ensure_queues(&queues).await?;
            Ok(queues.iter().map(|q| format!("queue {q}")).collect())
        }
    }
}
