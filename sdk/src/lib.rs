#![doc = include_str!("../README.md")]
// The README's examples are whole files (`src/lib.rs` with its `#[cfg(test)]` module):
// rustdoc compiles them, and `sdk/tests/readme.rs` builds them as a crate and runs their
// tests.
#![allow(clippy::test_attr_in_doctest)]

use std::fmt;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __bindings {
    //! The one guest bindgen site: generated types stay in here and in [`crate::__rt`].
    wit_bindgen::generate!({
        path: "../wit",
        world: "route-policy-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_route_policy_world",
        default_bindings_module: "asya_sdk::__bindings",
    });
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __transport_bindings {
    //! Guest bindings of the `transport-plugin` world (its exports are only linked by
    //! [`crate::export_transport!`], so a policy never carries them).
    wit_bindgen::generate!({
        path: "../wit",
        world: "transport-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_transport_world",
        default_bindings_module: "asya_sdk::__transport_bindings",
        with: {
            "asya:plugin/types@0.1.0": crate::__bindings::asya::plugin::types,
            "asya:plugin/log@0.1.0": crate::__bindings::asya::plugin::log,
        },
    });
}

pub mod log;
pub mod transport;

/// Re-exported so that policies parse configuration and payload fields with the same
/// `serde_json` the SDK uses.
pub use serde_json;

/// The route of an envelope: processed actors (history, never changed), the actor that
/// must process it now (`""` = end of route), and the actors after it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    pub prev: Vec<String>,
    pub curr: String,
    pub next: Vec<String>,
}

impl Route {
    /// A route from string slices: `Route::new(&["a"], "b", &["c"])` (handy in tests).
    pub fn new(prev: &[&str], curr: &str, next: &[&str]) -> Route {
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        Route {
            prev: owned(prev),
            curr: curr.to_owned(),
            next: owned(next),
        }
    }

    /// Every actor the route names (processed, current, future), skipping an empty `curr`.
    pub fn actors(&self) -> impl Iterator<Item = &str> {
        self.prev
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(self.curr.as_str()).filter(|c| !c.is_empty()))
            .chain(self.next.iter().map(String::as_str))
    }
}

/// What happens to an outgoing frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Route the frame as it is.
    Keep,
    /// Route the frame with this `curr` (`""` = end of route) and `next`. The frame's
    /// `prev` is history and stays as it is.
    ReplaceRoute { curr: String, next: Vec<String> },
    /// Refuse the frame: x-sump with reason `PolicyRejected` and this text.
    Reject(String),
    /// End the journey successfully: x-sink.
    SendToSink,
    /// Send the frame to x-sump with this text.
    SendToSump(String),
}

/// An expected failure of a policy: the frame goes to x-sump with this message.
/// (A panic is not an error: it traps, and the host re-creates the instance.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub message: String,
    /// True when trying again later may succeed.
    pub retryable: bool,
}

impl Error {
    /// A permanent error.
    pub fn new(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            retryable: false,
        }
    }

    /// An error that may go away when retried.
    pub fn retryable(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            retryable: true,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::new(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::new(message)
    }
}

/// The operator's configuration of one policy instance (`"config"` in
/// `ASYA_ROUTE_POLICIES`; `null` when none was given).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config(serde_json::Value);

impl Config {
    /// Parse configuration text (what the host passes to `configure`).
    pub fn parse(text: &str) -> Result<Config, Error> {
        serde_json::from_str(text)
            .map(Config)
            .map_err(|e| Error::new(format!("config is not JSON: {e}")))
    }

    /// The configuration as a JSON value.
    pub fn value(&self) -> &serde_json::Value {
        &self.0
    }

    /// A string setting, or `default` when absent; an error when present but not a string.
    pub fn str_or(&self, key: &str, default: &str) -> Result<String, Error> {
        match self.0.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default.to_owned()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(Error::new(format!(
                "config {key:?} must be a string, got {other}"
            ))),
        }
    }

    /// A number setting, or `default` when absent; an error when present but not a number.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64, Error> {
        self.typed_or(key, default, "a number", serde_json::Value::as_f64)
    }

    /// An integer setting, or `default` when absent; an error when present but not an
    /// integer that fits `i64` (`2.5` and `"2"` are errors).
    pub fn i64_or(&self, key: &str, default: i64) -> Result<i64, Error> {
        self.typed_or(key, default, "an integer", serde_json::Value::as_i64)
    }

    /// A non-negative integer setting (sizes, milliseconds), or `default` when absent; an
    /// error when present but not an integer in `0..=u64::MAX`.
    pub fn u64_or(&self, key: &str, default: u64) -> Result<u64, Error> {
        self.typed_or(
            key,
            default,
            "a non-negative integer",
            serde_json::Value::as_u64,
        )
    }

    /// A boolean setting, or `default` when absent; an error when present but not `true`
    /// or `false`.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, Error> {
        self.typed_or(key, default, "true or false", serde_json::Value::as_bool)
    }

    fn typed_or<T>(
        &self,
        key: &str,
        default: T,
        what: &str,
        get: impl Fn(&serde_json::Value) -> Option<T>,
    ) -> Result<T, Error> {
        match self.0.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => {
                get(v).ok_or_else(|| Error::new(format!("config {key:?} must be {what}, got {v}")))
            }
        }
    }

    /// A list-of-strings setting, or `None` when absent; an error when of another type.
    pub fn str_list(&self, key: &str) -> Result<Option<Vec<String>>, Error> {
        match self.0.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_owned).ok_or_else(|| {
                        Error::new(format!("config {key:?} must be a list of strings"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(Error::new(format!(
                "config {key:?} must be a list of strings"
            ))),
        }
    }
}

/// A route policy. Implement this and call [`export_route_policy!`] once.
///
/// One value is created per instance by [`RoutePolicy::configure`]; the host reuses the
/// instance for many frames, one call at a time.
pub trait RoutePolicy: Sized + 'static {
    /// Build the policy from its configuration. An error stops the host at startup.
    fn configure(config: &Config) -> Result<Self, Error>;

    /// Decide what happens to `frame`, an outgoing envelope produced while processing
    /// `input`. Read only what you need: every accessor is a call into the host.
    fn decide(&self, input: &Envelope<'_>, frame: &Envelope<'_>) -> Result<Decision, Error>;
}

/// An envelope the host lends to a policy for one call. Every accessor copies only the
/// part it returns.
pub struct Envelope<'a>(Repr<'a>);

enum Repr<'a> {
    #[cfg(target_arch = "wasm32")]
    Host(&'a __bindings::asya::plugin::envelope::Envelope),
    Local(&'a LocalEnvelope),
}

impl Envelope<'_> {
    /// The envelope id.
    pub fn id(&self) -> String {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => e.id(),
            Repr::Local(e) => e.id.clone(),
        }
    }

    /// The parent id of a fan-out child.
    pub fn parent_id(&self) -> Option<String> {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => e.parent_id(),
            Repr::Local(e) => e.parent_id.clone(),
        }
    }

    /// The whole route.
    pub fn route(&self) -> Route {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => {
                let r = e.route();
                Route {
                    prev: r.prev,
                    curr: r.curr,
                    next: r.next,
                }
            }
            Repr::Local(e) => e.route.clone(),
        }
    }

    /// The actor that must process the envelope now (`""` = end of route).
    pub fn route_curr(&self) -> String {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => e.route_curr(),
            Repr::Local(e) => e.route.curr.clone(),
        }
    }

    /// Actors already processed.
    pub fn route_prev(&self) -> Vec<String> {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => e.route_prev(),
            Repr::Local(e) => e.route.prev.clone(),
        }
    }

    /// Actors still to come.
    pub fn route_next(&self) -> Vec<String> {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => e.route_next(),
            Repr::Local(e) => e.route.next.clone(),
        }
    }

    /// A header as JSON text.
    pub fn header(&self, name: &str) -> Option<String> {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => e.header(name),
            Repr::Local(e) => e.headers.get(name).map(|v| v.to_string()),
        }
    }

    /// A header that is a JSON string, unquoted.
    pub fn header_str(&self, name: &str) -> Option<String> {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => e.header_str(name),
            Repr::Local(e) => e.headers.get(name)?.as_str().map(str::to_owned),
        }
    }

    /// The whole payload as JSON text (copies it: prefer [`Envelope::payload_field`]).
    pub fn payload_json(&self) -> String {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => e.payload_json(),
            Repr::Local(e) => e.payload.to_string(),
        }
    }

    /// The payload field at a dot-separated path of object keys, as JSON text.
    pub fn payload_field(&self, path: &str) -> Option<String> {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => e.payload_field(path),
            Repr::Local(e) => local_field(&e.payload, path).map(|v| v.to_string()),
        }
    }

    /// The payload field at a dot-separated path when it is a JSON string, unquoted.
    pub fn payload_str(&self, path: &str) -> Option<String> {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => e.payload_field_str(path),
            Repr::Local(e) => local_field(&e.payload, path)?.as_str().map(str::to_owned),
        }
    }

    /// The payload field at a dot-separated path when it is a JSON number, as `f64`
    /// (`None` when absent or not a number; a string `"3"` is not a number).
    pub fn payload_f64(&self, path: &str) -> Option<f64> {
        self.payload_value(path)?.as_f64()
    }

    /// The payload field at a dot-separated path when it is a JSON integer that fits `i64`
    /// (`None` when absent, not a number, or not an integer such as `2.5`).
    pub fn payload_i64(&self, path: &str) -> Option<i64> {
        self.payload_value(path)?.as_i64()
    }

    /// The payload field at a dot-separated path when it is `true` or `false`.
    pub fn payload_bool(&self, path: &str) -> Option<bool> {
        self.payload_value(path)?.as_bool()
    }

    /// The payload field at a dot-separated path, parsed (one field is copied and parsed,
    /// not the payload).
    pub fn payload_value(&self, path: &str) -> Option<serde_json::Value> {
        match &self.0 {
            #[cfg(target_arch = "wasm32")]
            Repr::Host(e) => serde_json::from_str(&e.payload_field(path)?).ok(),
            Repr::Local(e) => local_field(&e.payload, path).cloned(),
        }
    }
}

fn local_field<'v>(root: &'v serde_json::Value, path: &str) -> Option<&'v serde_json::Value> {
    if path.is_empty() {
        return Some(root);
    }
    path.split('.')
        .try_fold(root, |v, key| v.as_object()?.get(key))
}

/// An envelope built in memory, to unit-test a policy natively (`cargo test`) without a
/// host: `policy.decide(&input.view(), &frame.view())`.
#[derive(Debug, Clone, Default)]
pub struct LocalEnvelope {
    pub id: String,
    pub parent_id: Option<String>,
    pub route: Route,
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub payload: serde_json::Value,
}

impl LocalEnvelope {
    /// An envelope with this id, route and payload, no headers.
    pub fn new(id: &str, route: Route, payload: serde_json::Value) -> Self {
        LocalEnvelope {
            id: id.to_owned(),
            route,
            payload,
            ..LocalEnvelope::default()
        }
    }

    /// The view a policy receives.
    pub fn view(&self) -> Envelope<'_> {
        Envelope(Repr::Local(self))
    }
}

/// Glue called by [`export_route_policy!`]; not part of the API.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __rt {
    use std::cell::RefCell;
    use std::thread::LocalKey;

    use super::__bindings::asya::plugin::envelope::Envelope as HostEnvelope;
    use super::__bindings::asya::plugin::types::PluginError;
    use super::__bindings::exports::asya::plugin::route_policy::{
        Decision as WitDecision, RouteAhead,
    };
    use super::{Config, Decision, Envelope, Error, Repr, RoutePolicy};

    pub use super::__bindings::exports::asya::plugin::route_policy::Guest;
    pub type Slot<P> = LocalKey<RefCell<Option<P>>>;
    pub type HostEnv = HostEnvelope;
    pub type WitError = PluginError;
    pub type WitDecisionT = WitDecision;

    fn to_wit(e: Error) -> PluginError {
        PluginError {
            message: e.message,
            retryable: e.retryable,
        }
    }

    pub fn configure<P: RoutePolicy>(
        slot: &'static Slot<P>,
        config: String,
    ) -> Result<(), PluginError> {
        let cfg = Config::parse(&config).map_err(to_wit)?;
        let policy = P::configure(&cfg).map_err(to_wit)?;
        slot.with(|s| *s.borrow_mut() = Some(policy));
        Ok(())
    }

    pub fn decide<P: RoutePolicy>(
        slot: &'static Slot<P>,
        input: &HostEnvelope,
        frame: &HostEnvelope,
    ) -> Result<WitDecision, PluginError> {
        slot.with(|s| {
            let guard = s.borrow();
            let policy = guard
                .as_ref()
                .ok_or_else(|| to_wit(Error::new("policy used before configure")))?;
            let d = policy
                .decide(&Envelope(Repr::Host(input)), &Envelope(Repr::Host(frame)))
                .map_err(to_wit)?;
            Ok(match d {
                Decision::Keep => WitDecision::Keep,
                Decision::ReplaceRoute { curr, next } => {
                    WitDecision::ReplaceRoute(RouteAhead { curr, next })
                }
                Decision::Reject(why) => WitDecision::Reject(why),
                Decision::SendToSink => WitDecision::SendToSink,
                Decision::SendToSump(why) => WitDecision::SendToSump(why),
            })
        })
    }
}

/// Export a [`RoutePolicy`] implementation as this component's `route-policy`.
/// Call it once, at the crate root of a `cdylib` built for `wasm32-wasip2`. On other
/// targets it expands to nothing, so the policy can be unit-tested natively.
#[macro_export]
macro_rules! export_route_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static __ASYA_POLICY: ::core::cell::RefCell<::core::option::Option<$policy>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            struct __AsyaRoutePolicy;
            impl $crate::__rt::Guest for __AsyaRoutePolicy {
                fn configure(
                    config: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::__rt::WitError> {
                    $crate::__rt::configure(&__ASYA_POLICY, config)
                }
                fn decide(
                    input: &$crate::__rt::HostEnv,
                    frame: &$crate::__rt::HostEnv,
                ) -> ::core::result::Result<$crate::__rt::WitDecisionT, $crate::__rt::WitError>
                {
                    $crate::__rt::decide(&__ASYA_POLICY, input, frame)
                }
            }
            $crate::__bindings::__export_route_policy_world!(
                __AsyaRoutePolicy with_types_in $crate::__bindings
            );
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(payload: serde_json::Value) -> LocalEnvelope {
        LocalEnvelope::new("e1", Route::default(), payload)
    }

    #[test]
    fn payload_numbers_and_booleans() {
        let e = envelope(json!({
            "score": 0.75, "count": 3, "big": 18446744073709551615u64, "neg": -4,
            "ok": true, "text": "3", "nested": {"n": 2.5, "flag": false}
        }));
        let v = e.view();
        assert_eq!(v.payload_f64("score"), Some(0.75));
        assert_eq!(v.payload_f64("count"), Some(3.0));
        assert_eq!(v.payload_f64("nested.n"), Some(2.5));
        assert_eq!(v.payload_i64("count"), Some(3));
        assert_eq!(v.payload_i64("neg"), Some(-4));
        assert_eq!(v.payload_i64("nested.n"), None, "2.5 is not an integer");
        assert_eq!(v.payload_i64("big"), None, "does not fit i64");
        assert_eq!(v.payload_f64("text"), None, "a string is not a number");
        assert_eq!(v.payload_f64("missing"), None);
        assert_eq!(v.payload_bool("ok"), Some(true));
        assert_eq!(v.payload_bool("nested.flag"), Some(false));
        assert_eq!(v.payload_bool("count"), None);
        assert_eq!(
            v.payload_value("nested"),
            Some(json!({"n": 2.5, "flag": false}))
        );
    }

    #[test]
    fn config_numbers_and_booleans() {
        let c = Config::parse(
            r#"{"ratio": 0.5, "n": 7, "neg": -1, "on": true, "s": "7", "none": null}"#,
        )
        .unwrap();
        assert_eq!(c.f64_or("ratio", 1.0), Ok(0.5));
        assert_eq!(c.f64_or("n", 1.0), Ok(7.0));
        assert_eq!(c.f64_or("absent", 1.5), Ok(1.5));
        assert_eq!(c.i64_or("neg", 0), Ok(-1));
        assert_eq!(c.i64_or("none", 9), Ok(9), "null means absent");
        assert_eq!(c.u64_or("n", 0), Ok(7));
        assert_eq!(c.bool_or("on", false), Ok(true));
        assert_eq!(c.bool_or("absent", true), Ok(true));
        let err = c.u64_or("neg", 0).unwrap_err();
        assert_eq!(
            err.message,
            r#"config "neg" must be a non-negative integer, got -1"#
        );
        assert!(c.i64_or("ratio", 0).is_err());
        assert!(c.f64_or("s", 0.0).is_err());
        assert_eq!(
            c.bool_or("n", false).unwrap_err().message,
            r#"config "n" must be true or false, got 7"#
        );
    }
}
