//! Queue transports as WebAssembly components (docs/SPEC.md §8): implement [`Transport`]
//! and call [`export_transport!`](crate::export_transport) once. What each operation must
//! do (message ids and delivery counts on a broker without them, acks of deliveries taken
//! over elsewhere, where a nack re-enters, `close`): `docs/writing-a-transport.md`.
//!
//! The host creates one component instance per broker connection and calls it from one
//! task at a time. The component reaches the network through `std::net` (WASI sockets);
//! only the addresses the operator lists in `ASYA_TRANSPORT_ALLOW` connect.

use std::time::Duration;

use crate::{Config, Error};

/// One message delivered from a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Opaque token naming this delivery for [`Transport::ack`] / [`Transport::nack`].
    pub tag: String,
    /// The message body (an envelope as JSON bytes).
    pub body: Vec<u8>,
    /// How many times this message has been delivered, this one included (1 = first).
    pub delivery_count: u32,
    /// The message id the sender gave, if the transport keeps it.
    pub message_id: Option<String>,
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Destination queue name (`asya-<namespace>-<actor>`).
    pub queue: String,
    /// Deterministic id: a transport that deduplicates drops a second message with it.
    pub message_id: String,
    /// The message body.
    pub body: Vec<u8>,
}

/// An open connection to a broker. One value per component instance, created by
/// [`Transport::connect`]; the host calls it from one task at a time.
///
/// Errors are expected failures (the broker refused, a tag is unknown): say whether a retry
/// can help with [`Error::retryable`]. A panic traps: the host discards the instance,
/// creates a new one and connects again; unacknowledged deliveries must then come back from
/// the broker.
pub trait Transport: Sized + 'static {
    /// Open a connection with the operator's configuration (`ASYA_TRANSPORT_CONFIG`).
    fn connect(config: &Config) -> Result<Self, Error>;

    /// Receive up to `max` messages from `queue`, waiting at most `wait` for the first one.
    /// An empty list means nothing arrived in time. `max == 0` delivers nothing: only make
    /// sure `queue` exists (as `send`/`receive` would create it) and return at once
    /// (`asya-host provision`).
    fn receive(&mut self, queue: &str, max: u32, wait: Duration) -> Result<Vec<Delivery>, Error>;

    /// Publish messages; return only after the broker accepted all of them.
    fn send(&mut self, messages: Vec<Outgoing>) -> Result<(), Error>;

    /// Acknowledge a delivery: it is not delivered again.
    fn ack(&mut self, tag: &str) -> Result<(), Error>;

    /// Give a delivery back: deliver it again after `delay`.
    fn nack(&mut self, tag: &str, delay: Duration) -> Result<(), Error>;

    /// Work on a delivery is still in progress: extend its redelivery deadline.
    fn in_progress(&mut self, tag: &str) -> Result<(), Error> {
        let _ = tag;
        Ok(())
    }

    /// Close the connection; unacknowledged deliveries are redelivered later.
    fn close(&mut self) {}
}

/// Glue called by [`export_transport!`](crate::export_transport); not part of the API.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __rt {
    use std::cell::RefCell;
    use std::time::Duration;

    use super::{Delivery, Outgoing, Transport};
    use crate::__bindings::asya::plugin::types::PluginError;
    use crate::__transport_bindings::exports::asya::plugin::transport as wit;
    use crate::{Config, Error};

    pub use wit::{Connection, Guest, GuestConnection};
    pub type WitError = PluginError;
    pub type WitDelivery = wit::Delivery;
    pub type WitOutgoing = wit::Outgoing;

    fn to_wit(e: Error) -> PluginError {
        PluginError {
            message: e.message,
            retryable: e.retryable,
        }
    }

    /// The value behind a `connection` resource.
    pub struct Conn<T>(RefCell<T>);

    fn with<T, R>(
        c: &Conn<T>,
        f: impl FnOnce(&mut T) -> Result<R, Error>,
    ) -> Result<R, PluginError> {
        let mut t =
            c.0.try_borrow_mut()
                .map_err(|_| to_wit(Error::new("connection re-entered")))?;
        f(&mut t).map_err(to_wit)
    }

    pub fn connect<T: Transport>(config: String) -> Result<Conn<T>, PluginError> {
        let cfg = Config::parse(&config).map_err(to_wit)?;
        T::connect(&cfg)
            .map(|t| Conn(RefCell::new(t)))
            .map_err(to_wit)
    }

    pub fn receive<T: Transport>(
        c: &Conn<T>,
        queue: String,
        max: u32,
        wait_ms: u32,
    ) -> Result<Vec<WitDelivery>, PluginError> {
        let got = with(c, |t| {
            t.receive(&queue, max, Duration::from_millis(wait_ms.into()))
        })?;
        Ok(got
            .into_iter()
            .map(|d: Delivery| WitDelivery {
                tag: d.tag,
                body: d.body,
                delivery_count: d.delivery_count,
                message_id: d.message_id,
            })
            .collect())
    }

    pub fn send<T: Transport>(c: &Conn<T>, messages: Vec<WitOutgoing>) -> Result<(), PluginError> {
        let msgs = messages
            .into_iter()
            .map(|m| Outgoing {
                queue: m.queue,
                message_id: m.message_id,
                body: m.body,
            })
            .collect();
        with(c, |t| t.send(msgs))
    }

    pub fn ack<T: Transport>(c: &Conn<T>, tag: String) -> Result<(), PluginError> {
        with(c, |t| t.ack(&tag))
    }

    pub fn nack<T: Transport>(c: &Conn<T>, tag: String, delay_ms: u32) -> Result<(), PluginError> {
        with(c, |t| t.nack(&tag, Duration::from_millis(delay_ms.into())))
    }

    pub fn in_progress<T: Transport>(c: &Conn<T>, tag: String) -> Result<(), PluginError> {
        with(c, |t| t.in_progress(&tag))
    }

    pub fn close<T: Transport>(c: &Conn<T>) {
        if let Ok(mut t) = c.0.try_borrow_mut() {
            t.close();
        }
    }
}

/// Export a [`Transport`] implementation as this component's `transport`. Call it once,
/// at the crate root of a `cdylib` built for `wasm32-wasip2`. On other targets it expands
/// to nothing, so the transport can be unit-tested natively.
#[macro_export]
macro_rules! export_transport {
    ($transport:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __AsyaTransport;
            struct __AsyaConnection($crate::transport::__rt::Conn<$transport>);
            impl $crate::transport::__rt::Guest for __AsyaTransport {
                type Connection = __AsyaConnection;
            }
            impl $crate::transport::__rt::GuestConnection for __AsyaConnection {
                fn connect(
                    config: ::std::string::String,
                ) -> ::core::result::Result<
                    $crate::transport::__rt::Connection,
                    $crate::transport::__rt::WitError,
                > {
                    $crate::transport::__rt::connect::<$transport>(config)
                        .map(|c| $crate::transport::__rt::Connection::new(__AsyaConnection(c)))
                }
                fn receive(
                    &self,
                    queue: ::std::string::String,
                    max: u32,
                    wait_ms: u32,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<$crate::transport::__rt::WitDelivery>,
                    $crate::transport::__rt::WitError,
                > {
                    $crate::transport::__rt::receive(&self.0, queue, max, wait_ms)
                }
                fn send(
                    &self,
                    messages: ::std::vec::Vec<$crate::transport::__rt::WitOutgoing>,
                ) -> ::core::result::Result<(), $crate::transport::__rt::WitError> {
                    $crate::transport::__rt::send(&self.0, messages)
                }
                fn ack(
                    &self,
                    tag: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::transport::__rt::WitError> {
                    $crate::transport::__rt::ack(&self.0, tag)
                }
                fn nack(
                    &self,
                    tag: ::std::string::String,
                    delay_ms: u32,
                ) -> ::core::result::Result<(), $crate::transport::__rt::WitError> {
                    $crate::transport::__rt::nack(&self.0, tag, delay_ms)
                }
                fn in_progress(
                    &self,
                    tag: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::transport::__rt::WitError> {
                    $crate::transport::__rt::in_progress(&self.0, tag)
                }
                fn close(&self) {
                    $crate::transport::__rt::close(&self.0)
                }
            }
            $crate::__transport_bindings::__export_transport_world!(
                __AsyaTransport with_types_in $crate::__transport_bindings
            );
        };
    };
}
