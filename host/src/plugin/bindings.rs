//! The one host-side `bindgen!` site. Generated types stay in this file: everything that
//! leaves it is a domain type ([`crate::envelope::Route`], [`crate::plugin::Decision`]).

use std::borrow::Cow;

use wasmtime::component::Resource;

use crate::envelope::Route;
use crate::plugin::engine::StoreState;

/// The `route-policy-plugin` world.
pub(crate) mod policy {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "route-policy-plugin",
        exports: { default: async },
        with: {
            "asya:plugin/envelope.envelope": super::EnvelopeHandle,
        },
    });
}

/// The `transport-plugin` world (contract checks; the adapter lives in `transport/`).
pub(crate) mod transport {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "transport-plugin",
        exports: { default: async },
        with: {
            "asya:plugin/types": super::policy::asya::plugin::types,
            "asya:plugin/log": super::policy::asya::plugin::log,
        },
    });
}

pub(crate) use policy::exports::asya::plugin::route_policy::Decision as WitDecision;
pub(crate) use policy::RoutePolicyPlugin;
pub(crate) use policy::RoutePolicyPluginPre;
pub(crate) use transport::TransportPluginPre;

/// Marker type of the envelope resource: the host never puts envelopes in the resource
/// table; a handle's rep names a slot of [`StoreState`] (see [`Slot`]).
pub struct EnvelopeHandle;

/// Which envelope a handle names.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slot {
    Input = 0,
    Frame = 1,
}

impl Slot {
    pub(crate) fn handle(self) -> Resource<EnvelopeHandle> {
        Resource::new_borrow(self as u32)
    }
}

/// The parts of an envelope a policy may read, owned by the store. Refilled before every
/// call, reusing its buffers (a pooled instance keeps them between calls).
#[derive(Debug, Default)]
pub(crate) struct EnvelopeView {
    pub id: String,
    pub parent_id: Option<String>,
    pub route: Route,
    pub headers: crate::envelope::Headers,
    /// The payload's JSON text.
    pub payload: String,
}

/// Buffers larger than this are released after a call rather than kept in the pool.
const KEEP_PAYLOAD_CAPACITY: usize = 256 << 10;

impl EnvelopeView {
    /// Copy `env` (with `route` as its route) into this view, reusing allocations.
    pub(crate) fn fill(&mut self, env: &crate::envelope::Envelope, route: &Route) {
        self.id.clone_from(&env.id);
        self.parent_id.clone_from(&env.parent_id);
        self.route.prev.clone_from(&route.prev);
        self.route.curr.clone_from(&route.curr);
        self.route.next.clone_from(&route.next);
        self.headers.clone_from(&env.headers);
        self.payload.clear();
        self.payload.push_str(env.payload.get());
    }

    /// Drop oversized buffers after a call.
    pub(crate) fn trim(&mut self) {
        if self.payload.capacity() > KEEP_PAYLOAD_CAPACITY {
            self.payload = String::new();
        }
    }
}

impl StoreState {
    fn view(&self, r: &Resource<EnvelopeHandle>) -> &EnvelopeView {
        if r.rep() == Slot::Input as u32 {
            &self.input
        } else {
            &self.frame
        }
    }
}

impl policy::asya::plugin::types::Host for StoreState {}

impl policy::asya::plugin::envelope::Host for StoreState {}

impl policy::asya::plugin::envelope::HostEnvelope for StoreState {
    fn id(&mut self, e: Resource<EnvelopeHandle>) -> String {
        self.view(&e).id.clone()
    }

    fn parent_id(&mut self, e: Resource<EnvelopeHandle>) -> Option<String> {
        self.view(&e).parent_id.clone()
    }

    fn route(&mut self, e: Resource<EnvelopeHandle>) -> policy::asya::plugin::types::Route {
        let r = &self.view(&e).route;
        policy::asya::plugin::types::Route {
            prev: r.prev.clone(),
            curr: r.curr.clone(),
            next: r.next.clone(),
        }
    }

    fn route_curr(&mut self, e: Resource<EnvelopeHandle>) -> String {
        self.view(&e).route.curr.clone()
    }

    fn route_prev(&mut self, e: Resource<EnvelopeHandle>) -> Vec<String> {
        self.view(&e).route.prev.clone()
    }

    fn route_next(&mut self, e: Resource<EnvelopeHandle>) -> Vec<String> {
        self.view(&e).route.next.clone()
    }

    fn header(&mut self, e: Resource<EnvelopeHandle>, name: String) -> Option<String> {
        self.view(&e).headers.raw(&name).map(str::to_owned)
    }

    fn header_str(&mut self, e: Resource<EnvelopeHandle>, name: String) -> Option<String> {
        self.view(&e).headers.str(&name).map(Cow::into_owned)
    }

    fn payload_json(&mut self, e: Resource<EnvelopeHandle>) -> String {
        self.view(&e).payload.clone()
    }

    fn payload_field(&mut self, e: Resource<EnvelopeHandle>, path: String) -> Option<String> {
        super::json_path::field(&self.view(&e).payload, &path).map(str::to_owned)
    }

    fn payload_field_str(&mut self, e: Resource<EnvelopeHandle>, path: String) -> Option<String> {
        let raw = super::json_path::field(&self.view(&e).payload, &path)?;
        if !raw.starts_with('"') {
            return None;
        }
        serde_json::from_str::<String>(raw).ok()
    }

    fn drop(&mut self, _e: Resource<EnvelopeHandle>) -> wasmtime::Result<()> {
        // Handles are borrows of store slots: nothing to free.
        Ok(())
    }
}

/// Longest log line kept from a guest.
const MAX_LOG_LINE: usize = 4096;

impl policy::asya::plugin::log::Host for StoreState {
    fn enabled(&mut self, level: policy::asya::plugin::log::Level) -> bool {
        use policy::asya::plugin::log::Level as L;
        match level {
            L::Trace => tracing::enabled!(tracing::Level::TRACE),
            L::Debug => tracing::enabled!(tracing::Level::DEBUG),
            L::Info => tracing::enabled!(tracing::Level::INFO),
            L::Warn => tracing::enabled!(tracing::Level::WARN),
            L::Error => tracing::enabled!(tracing::Level::ERROR),
        }
    }

    fn log(&mut self, level: policy::asya::plugin::log::Level, message: String) {
        use policy::asya::plugin::log::Level as L;
        let msg = super::truncate(&message, MAX_LOG_LINE);
        let plugin = &*self.plugin;
        match level {
            L::Trace => tracing::trace!(plugin, "{msg}"),
            L::Debug => tracing::debug!(plugin, "{msg}"),
            L::Info => tracing::info!(plugin, "{msg}"),
            L::Warn => tracing::warn!(plugin, "{msg}"),
            L::Error => tracing::error!(plugin, "{msg}"),
        }
    }
}

/// A guest's decision, bounded and converted to the domain type. A replaced route keeps
/// `prev`, the frame's processed history.
pub(crate) fn decision_from_wit(d: WitDecision, prev: &[String]) -> super::Decision {
    use super::{truncate, Decision, MAX_REASON};
    match d {
        WitDecision::Keep => Decision::Keep,
        WitDecision::ReplaceRoute(r) => Decision::ReplaceRoute(Route {
            prev: prev.to_vec(),
            curr: r.curr,
            next: r.next,
        }),
        WitDecision::Reject(why) => Decision::Reject(truncate(&why, MAX_REASON).into_owned()),
        WitDecision::SendToSink => Decision::SendToSink,
        WitDecision::SendToSump(why) => {
            Decision::SendToSump(truncate(&why, MAX_REASON).into_owned())
        }
    }
}

/// A guest's error as text (bounded).
pub(crate) fn guest_error(e: policy::asya::plugin::types::PluginError) -> String {
    let retry = if e.retryable { " (retryable)" } else { "" };
    format!("{}{retry}", super::truncate(&e.message, super::MAX_REASON))
}

// ---------------------------------------------------------------------------------------
// Transport calls (used by `crate::transport::wasm`): generated types stay here.

use transport::exports::asya::plugin::transport as wit_transport;
pub(crate) use transport::TransportPlugin;
use wasmtime::component::ResourceAny;
use wasmtime::Store;

/// An expected failure a transport component returned.
#[derive(Debug, Clone)]
pub(crate) struct GuestError {
    pub message: String,
    pub retryable: bool,
}

impl From<policy::asya::plugin::types::PluginError> for GuestError {
    fn from(e: policy::asya::plugin::types::PluginError) -> Self {
        GuestError {
            message: super::truncate(&e.message, super::MAX_REASON).into_owned(),
            retryable: e.retryable,
        }
    }
}

/// One delivery a transport component returned.
#[derive(Debug)]
pub(crate) struct GuestDelivery {
    pub tag: String,
    pub body: Vec<u8>,
    pub delivery_count: u32,
}

/// The calls of one transport instance (`conn` is its `connection` resource).
pub(crate) struct TransportCalls<'a> {
    pub bindings: &'a TransportPlugin,
    pub store: &'a mut Store<StoreState>,
}

type Call<T> = wasmtime::Result<Result<T, GuestError>>;

fn guest(b: &TransportPlugin) -> wit_transport::GuestConnection<'_> {
    b.asya_plugin_transport().connection()
}

impl TransportCalls<'_> {
    pub async fn connect(&mut self, config: &str) -> Call<ResourceAny> {
        let r = guest(self.bindings)
            .call_connect(&mut *self.store, config)
            .await?;
        Ok(r.map_err(GuestError::from))
    }

    pub async fn receive(
        &mut self,
        conn: ResourceAny,
        queue: &str,
        max: u32,
        wait_ms: u32,
    ) -> Call<Vec<GuestDelivery>> {
        let r = guest(self.bindings)
            .call_receive(&mut *self.store, conn, queue, max, wait_ms)
            .await?;
        Ok(r.map_err(GuestError::from).map(|ds| {
            ds.into_iter()
                .map(|d| GuestDelivery {
                    tag: d.tag,
                    body: d.body,
                    delivery_count: d.delivery_count,
                })
                .collect()
        }))
    }

    /// `msgs`: (queue, message id, body).
    pub async fn send(&mut self, conn: ResourceAny, msgs: &[(&str, &str, &[u8])]) -> Call<()> {
        let out: Vec<wit_transport::Outgoing> = msgs
            .iter()
            .map(|(q, id, body)| wit_transport::Outgoing {
                queue: (*q).to_owned(),
                message_id: (*id).to_owned(),
                body: body.to_vec(),
            })
            .collect();
        let r = guest(self.bindings)
            .call_send(&mut *self.store, conn, &out)
            .await?;
        Ok(r.map_err(GuestError::from))
    }

    pub async fn ack(&mut self, conn: ResourceAny, tag: &str) -> Call<()> {
        let r = guest(self.bindings)
            .call_ack(&mut *self.store, conn, tag)
            .await?;
        Ok(r.map_err(GuestError::from))
    }

    pub async fn nack(&mut self, conn: ResourceAny, tag: &str, delay_ms: u32) -> Call<()> {
        let r = guest(self.bindings)
            .call_nack(&mut *self.store, conn, tag, delay_ms)
            .await?;
        Ok(r.map_err(GuestError::from))
    }

    pub async fn in_progress(&mut self, conn: ResourceAny, tag: &str) -> Call<()> {
        let r = guest(self.bindings)
            .call_in_progress(&mut *self.store, conn, tag)
            .await?;
        Ok(r.map_err(GuestError::from))
    }

    pub async fn close(&mut self, conn: ResourceAny) -> wasmtime::Result<()> {
        guest(self.bindings)
            .call_close(&mut *self.store, conn)
            .await
    }
}
