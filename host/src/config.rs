//! Typed configuration from `ASYA_*` variables, read once through an injectable [`Source`]
//! so tests never touch the process environment. A leaf: it uses no other module of the
//! crate except the leaf [`crate::queue`].
//!
//! Every variable is a [`Var`] constant written once: its name, its default and a one-line
//! doc. The parsers take defaults from it (a default is parsed by the same code as a set
//! value), and `asya-host sidecar|gateway|up --help` lists it. The sidecar's own variables
//! are in [`vars`]; each module with variables of its own defines them the same way next to
//! its parser ([`crate::transport::nats::vars`], [`crate::transport::wasm::vars`],
//! [`crate::plugin::vars`], [`crate::gateway::cli::gvars`]); [`crate::settings`] gathers
//! them per command and parses each command's settings in one place.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::queue::{EndActors, InvalidName, QueueName};

/// What an unset variable means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// It must be set.
    Required,
    /// Unset: the feature is off or the value absent.
    Unset,
    /// This text, parsed like a set value.
    Value(&'static str),
    /// Derived from other settings; the text says how (shown by `--help`).
    Derived(&'static str),
}

/// One configuration variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    pub fallback: Fallback,
    /// One line: what it sets.
    pub doc: &'static str,
}

impl Var {
    /// A variable with a default value (parsed like a set value).
    pub const fn new(name: &'static str, default: &'static str, doc: &'static str) -> Var {
        Var {
            name,
            fallback: Fallback::Value(default),
            doc,
        }
    }

    /// A variable that must be set.
    pub const fn required(name: &'static str, doc: &'static str) -> Var {
        Var {
            name,
            fallback: Fallback::Required,
            doc,
        }
    }

    /// A variable whose absence means "off" or "none".
    pub const fn optional(name: &'static str, doc: &'static str) -> Var {
        Var {
            name,
            fallback: Fallback::Unset,
            doc,
        }
    }

    /// A variable whose default is derived from other settings (`how` says from what).
    pub const fn derived(name: &'static str, how: &'static str, doc: &'static str) -> Var {
        Var {
            name,
            fallback: Fallback::Derived(how),
            doc,
        }
    }

    /// The default value, when it is a fixed one.
    pub fn default_value(&self) -> Option<&'static str> {
        match self.fallback {
            Fallback::Value(v) => Some(v),
            _ => None,
        }
    }

    /// A configuration error naming this variable.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            var: self.name,
            message: message.into(),
        }
    }
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq<Var> for &str {
    fn eq(&self, other: &Var) -> bool {
        *self == other.name
    }
}

/// The `--help` text listing `groups` of variables: name, default, doc; one line each.
pub fn help_table(groups: &[(&str, &[Var])]) -> String {
    let width = groups
        .iter()
        .flat_map(|(_, vs)| vs.iter())
        .map(|v| v.name.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (title, vs) in groups {
        out.push_str(title);
        out.push_str(":\n");
        for v in *vs {
            let default = match v.fallback {
                Fallback::Required => "required".to_owned(),
                Fallback::Unset | Fallback::Value("") => "unset".to_owned(),
                Fallback::Value(d) => format!("default {d}"),
                Fallback::Derived(how) => format!("default {how}"),
            };
            out.push_str(&format!("  {:width$}  [{default}] {}\n", v.name, v.doc));
        }
        out.push('\n');
    }
    out.truncate(out.trim_end().len());
    out
}

/// Names of the sidecar's own variables (the transports', plugins' and gateway's are next
/// to their parsers).
pub mod vars {
    use super::Var;

    pub const ACTOR_NAME: Var = Var::required(
        "ASYA_ACTOR_NAME",
        "this actor; its queue is asya-<namespace>-<actor>",
    );
    pub const NAMESPACE: Var = Var::new("ASYA_NAMESPACE", "default", "namespace of every queue");
    pub const TRANSPORT: Var = Var::new(
        "ASYA_TRANSPORT",
        "nats",
        "nats, wasm, or memory (in-process only: asya-host up)",
    );
    pub const SOCKET_DIR: Var = Var::new(
        "ASYA_SOCKET_DIR",
        "/var/run/asya",
        "folder of the runtime's socket and its ready file runtime-ready",
    );
    pub const SOCKET_NAME: Var = Var::new(
        "ASYA_SOCKET_NAME",
        "asya-runtime.sock",
        "file name of the runtime's socket",
    );
    pub const RUNTIME_READY_TIMEOUT: Var = Var::new(
        "ASYA_RUNTIME_READY_TIMEOUT",
        "300s",
        "how long to wait for the runtime's socket and ready file",
    );
    pub const ACTOR_TIMEOUT: Var = Var::new(
        "ASYA_RESILIENCY_ACTOR_TIMEOUT",
        "300s",
        "runtime call timeout (cut shorter by the envelope's deadline)",
    );
    pub const MAX_ATTEMPTS: Var = Var::new(
        "ASYA_RESILIENCY_MAX_ATTEMPTS",
        "3",
        "deliveries of one envelope before x-sump (1 = no retry)",
    );
    pub const BACKOFF_INITIAL: Var =
        Var::new("ASYA_RESILIENCY_BACKOFF_INITIAL", "1s", "first retry delay");
    pub const BACKOFF_MAX: Var =
        Var::new("ASYA_RESILIENCY_BACKOFF_MAX", "60s", "longest retry delay");
    pub const BACKOFF_MULTIPLIER: Var = Var::new(
        "ASYA_RESILIENCY_BACKOFF_MULTIPLIER",
        "2",
        "retry delay growth per attempt (>= 1)",
    );
    pub const NON_RETRYABLE_ERRORS: Var = Var::optional(
        "ASYA_RESILIENCY_NON_RETRYABLE_ERRORS",
        "comma-separated error types that go straight to x-sump",
    );
    pub const CRASH_ON_TIMEOUT: Var = Var::new(
        "ASYA_RESILIENCY_CRASH_ON_TIMEOUT",
        "true",
        "after a runtime timeout: x-sump, ack, exit 3",
    );
    pub const CONCURRENCY: Var = Var::new(
        "ASYA_CONCURRENCY",
        "1",
        "envelopes in flight (1 to 10000); the transport's prefetch follows it",
    );
    pub const METRICS_ADDR: Var = Var::new(
        "ASYA_METRICS_ADDR",
        ":8080",
        "admin server: /metrics /healthz /readyz /debug/inflight (off disables)",
    );
    pub const METRICS_NAMESPACE: Var = Var::new(
        "ASYA_METRICS_NAMESPACE",
        "asya_actor",
        "prefix of the actor metrics",
    );
    pub const ACTOR_SINK: Var = Var::new(
        "ASYA_ACTOR_SINK",
        crate::queue::DEFAULT_SINK,
        "end actor of finished envelopes",
    );
    pub const ACTOR_SUMP: Var = Var::new(
        "ASYA_ACTOR_SUMP",
        crate::queue::DEFAULT_SUMP,
        "end actor of failed envelopes",
    );
    pub const IS_END_ACTOR: Var = Var::new(
        "ASYA_IS_END_ACTOR",
        "false",
        "run as an end actor (no runtime, no routing; reports final states)",
    );
    pub const SHUTDOWN_GRACE: Var = Var::new(
        "ASYA_SHUTDOWN_GRACE",
        "30s",
        "time to finish in-flight work on SIGTERM",
    );
    pub const MAX_MESSAGE_BYTES: Var = Var::new(
        "ASYA_MAX_MESSAGE_BYTES",
        "67108864",
        "cap on a received message and a runtime response body",
    );
    pub const MAX_HOPS: Var = Var::new(
        "ASYA_MAX_HOPS",
        "256",
        "longest route history (route.prev) accepted; longer is a validation_error",
    );
    pub const MAX_FRAMES: Var = Var::new(
        "ASYA_MAX_FRAMES",
        "1024",
        "most frames one runtime call may produce; past it the input goes to x-sump",
    );
    pub const LOG_LEVEL: Var = Var::derived(
        "ASYA_LOG_LEVEL",
        "info (up: warn)",
        "log level or filter; RUST_LOG overrides it",
    );
    pub const LOG_FORMAT: Var = Var::new("ASYA_LOG_FORMAT", "text", "text or json (JSON lines)");
    pub const RUST_LOG: Var = Var::optional("RUST_LOG", "tracing filter; overrides ASYA_LOG_LEVEL");

    /// The sidecar's own variables, in `--help` order.
    pub const SIDECAR: &[Var] = &[
        ACTOR_NAME,
        NAMESPACE,
        TRANSPORT,
        SOCKET_DIR,
        SOCKET_NAME,
        RUNTIME_READY_TIMEOUT,
        ACTOR_TIMEOUT,
        MAX_ATTEMPTS,
        BACKOFF_INITIAL,
        BACKOFF_MAX,
        BACKOFF_MULTIPLIER,
        NON_RETRYABLE_ERRORS,
        CRASH_ON_TIMEOUT,
        CONCURRENCY,
        METRICS_ADDR,
        METRICS_NAMESPACE,
        ACTOR_SINK,
        ACTOR_SUMP,
        IS_END_ACTOR,
        SHUTDOWN_GRACE,
        MAX_MESSAGE_BYTES,
        MAX_HOPS,
        MAX_FRAMES,
    ];
    /// The end actors' names (read by the sidecar, the gateway, `up` and `provision`).
    pub const END_ACTORS: &[Var] = &[ACTOR_SINK, ACTOR_SUMP];
    /// Logging (every command).
    pub const LOGGING: &[Var] = &[LOG_LEVEL, LOG_FORMAT, RUST_LOG];
}

/// A bad or missing variable. Displays as one line naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

/// Where variables come from: the process environment in `main`, a map in tests.
pub trait Source {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl<const N: usize> Source for [(&str, &str); N] {
    fn get(&self, key: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
}

/// Typed reads with one-line errors. Empty values count as unset; an unset variable takes
/// its [`Var`]'s default, parsed by the same code as a set value.
pub struct Reader<'a>(pub &'a dyn Source);

impl Reader<'_> {
    /// The value when set (and not empty).
    pub fn raw(&self, var: Var) -> Option<String> {
        self.0.get(var.name).filter(|v| !v.trim().is_empty())
    }

    /// The value, else the fixed default.
    fn text(&self, var: Var) -> Result<String, ConfigError> {
        match (self.raw(var), var.fallback) {
            (Some(v), _) => Ok(v),
            (None, Fallback::Value(d)) => Ok(d.to_owned()),
            (None, _) => Err(var.error("is required but not set")),
        }
    }

    /// The value or the default text (empty when the variable has no fixed default).
    pub fn string(&self, var: Var) -> String {
        self.text(var).unwrap_or_default()
    }

    pub fn required(&self, var: Var) -> Result<String, ConfigError> {
        self.raw(var)
            .ok_or_else(|| var.error("is required but not set"))
    }

    pub fn parse<T: std::str::FromStr>(&self, var: Var) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        let v = self.text(var)?;
        v.trim()
            .parse()
            .map_err(|e| var.error(format!("invalid value {v:?}: {e}")))
    }

    pub fn bool(&self, var: Var) -> Result<bool, ConfigError> {
        let v = self.text(var)?.trim().to_ascii_lowercase();
        match v.as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(var.error(format!("invalid boolean {v:?} (use true or false)"))),
        }
    }

    /// A duration: `30s`, `500ms`, `2m`, or a plain number of seconds (`1.5`).
    pub fn duration(&self, var: Var) -> Result<Duration, ConfigError> {
        let v = self.text(var)?;
        parse_duration(v.trim()).map_err(|e| var.error(format!("invalid duration {v:?}: {e}")))
    }

    /// A comma-separated list (empty when unset).
    pub fn list(&self, var: Var) -> Vec<String> {
        self.raw(var)
            .or_else(|| var.default_value().map(str::to_owned))
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `30s`, `500ms`, `1m30s`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| e.to_string());
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// An actor or namespace name usable in a queue name ([`crate::queue::check_name`]).
pub fn validate_actor_name(var: &'static str, name: &str) -> Result<(), ConfigError> {
    crate::queue::check_name("actor", name).map_err(|e| ConfigError {
        var,
        message: format!(
            "invalid actor name {:?} (letters, digits, '-' and '_' only)",
            e.name
        ),
    })
}

/// The end actors from `ASYA_ACTOR_SINK` and `ASYA_ACTOR_SUMP`.
pub fn end_actors(src: &dyn Source) -> Result<EndActors, ConfigError> {
    let r = Reader(src);
    let sink = r.string(vars::ACTOR_SINK);
    validate_actor_name(vars::ACTOR_SINK.name, &sink)?;
    let sump = r.string(vars::ACTOR_SUMP);
    validate_actor_name(vars::ACTOR_SUMP.name, &sump)?;
    Ok(EndActors { sink, sump })
}

/// Which transport a sidecar uses (`ASYA_TRANSPORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Memory,
    Nats,
    Wasm,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Memory => "memory",
            TransportKind::Nats => "nats",
            TransportKind::Wasm => "wasm",
        }
    }

    /// From `ASYA_TRANSPORT`.
    pub fn from_source(src: &dyn Source) -> Result<TransportKind, ConfigError> {
        match Reader(src)
            .string(vars::TRANSPORT)
            .to_ascii_lowercase()
            .as_str()
        {
            "memory" => Ok(TransportKind::Memory),
            "nats" => Ok(TransportKind::Nats),
            "wasm" => Ok(TransportKind::Wasm),
            other => Err(vars::TRANSPORT.error(format!(
                "unknown transport {other:?} (use nats, memory or wasm)"
            ))),
        }
    }
}

/// How logs are written (`ASYA_LOG_LEVEL`, `ASYA_LOG_FORMAT`, `RUST_LOG`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// `ASYA_LOG_LEVEL`, when set.
    pub level: Option<String>,
    /// JSON lines instead of text.
    pub json: bool,
    /// `RUST_LOG`, when set: overrides the level.
    pub filter: Option<String>,
}

impl LogSettings {
    /// Never fails: an unknown format means text, as it always did.
    pub fn from_source(src: &dyn Source) -> LogSettings {
        let r = Reader(src);
        LogSettings {
            level: r.raw(vars::LOG_LEVEL),
            json: r.string(vars::LOG_FORMAT).eq_ignore_ascii_case("json"),
            filter: r.raw(vars::RUST_LOG),
        }
    }

    /// The level filter: `ASYA_LOG_LEVEL`, else `default_level` (`RUST_LOG`, when set and
    /// valid, is used instead by `main`).
    pub fn level_or(&self, default_level: &str) -> String {
        self.level
            .as_deref()
            .unwrap_or(default_level)
            .to_ascii_lowercase()
    }
}

/// Retry policy (`ASYA_RESILIENCY_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct Resiliency {
    /// Runtime call timeout.
    pub actor_timeout: Duration,
    /// Deliveries of one envelope before it goes to x-sump (1 = no retry).
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub backoff_multiplier: f64,
    /// Error types (the runtime's `type`) that are never retried.
    pub non_retryable: Vec<String>,
    /// Exit after a runtime timeout so the orchestrator restarts the pair.
    pub crash_on_timeout: bool,
}

impl Default for Resiliency {
    /// The variables' defaults.
    fn default() -> Self {
        let unset: [(&str, &str); 0] = [];
        Resiliency::from_source(&unset).expect("the defaults of ASYA_RESILIENCY_* are valid")
    }
}

impl Resiliency {
    /// Read `ASYA_RESILIENCY_*` from `src`.
    pub fn from_source(src: &dyn Source) -> Result<Resiliency, ConfigError> {
        let r = Reader(src);
        let resiliency = Resiliency {
            actor_timeout: r.duration(vars::ACTOR_TIMEOUT)?,
            max_attempts: r.parse(vars::MAX_ATTEMPTS)?,
            backoff_initial: r.duration(vars::BACKOFF_INITIAL)?,
            backoff_max: r.duration(vars::BACKOFF_MAX)?,
            backoff_multiplier: r.parse(vars::BACKOFF_MULTIPLIER)?,
            non_retryable: r.list(vars::NON_RETRYABLE_ERRORS),
            crash_on_timeout: r.bool(vars::CRASH_ON_TIMEOUT)?,
        };
        if resiliency.max_attempts == 0 {
            return Err(vars::MAX_ATTEMPTS.error("must be at least 1"));
        }
        if resiliency.actor_timeout.is_zero() {
            return Err(vars::ACTOR_TIMEOUT.error("must be greater than zero"));
        }
        if !(resiliency.backoff_multiplier.is_finite() && resiliency.backoff_multiplier >= 1.0) {
            return Err(vars::BACKOFF_MULTIPLIER.error("must be a number >= 1"));
        }
        Ok(resiliency)
    }

    /// Delay before delivery number `attempt + 1`, after `attempt` failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = self.backoff_initial.as_secs_f64() * exp;
        Duration::try_from_secs_f64(secs)
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }

    pub fn is_retryable(&self, error_type: &str) -> bool {
        !self
            .non_retryable
            .iter()
            .any(|t| t == error_type || error_type.rsplit('.').next() == Some(t.as_str()))
    }
}

/// Everything one sidecar needs.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub actor: String,
    pub namespace: String,
    pub transport: TransportKind,
    pub socket_path: PathBuf,
    pub ready_file: PathBuf,
    pub ready_timeout: Duration,
    pub resiliency: Resiliency,
    pub concurrency: usize,
    /// `None` disables the admin server (in-process meshes run one for all actors).
    pub metrics_addr: Option<SocketAddr>,
    pub metrics_namespace: String,
    /// Where finished and failed envelopes go.
    pub ends: EndActors,
    pub is_end_actor: bool,
    pub shutdown_grace: Duration,
    /// Cap on a runtime response body and on a received message.
    pub max_message_bytes: usize,
    /// Longest `route.prev` accepted (`ASYA_MAX_HOPS`).
    pub max_hops: usize,
    /// Most frames one runtime call may produce (`ASYA_MAX_FRAMES`).
    pub max_frames: usize,
}

/// The file next to the runtime's socket that says the runtime is ready.
pub const READY_FILE: &str = "runtime-ready";

impl SidecarConfig {
    /// The variables' defaults for `actor` in `namespace` with its runtime socket in
    /// `socket_dir`, on the memory transport without an admin server (in-process use).
    pub fn new(actor: &str, namespace: &str, socket_dir: impl Into<PathBuf>) -> Self {
        let dir = socket_dir.into();
        let defaults = [
            (vars::ACTOR_NAME.name, actor),
            (vars::NAMESPACE.name, namespace),
            (vars::TRANSPORT.name, "memory"),
            (vars::METRICS_ADDR.name, "off"),
        ];
        let r = Reader(&defaults);
        let fixed = |var: Var| var.default_value().expect("a fixed default");
        SidecarConfig {
            actor: actor.to_owned(),
            namespace: namespace.to_owned(),
            transport: TransportKind::Memory,
            socket_path: dir.join(fixed(vars::SOCKET_NAME)),
            ready_file: dir.join(READY_FILE),
            ready_timeout: r
                .duration(vars::RUNTIME_READY_TIMEOUT)
                .expect("valid default"),
            resiliency: Resiliency::default(),
            concurrency: r.parse(vars::CONCURRENCY).expect("valid default"),
            metrics_addr: None,
            metrics_namespace: r.string(vars::METRICS_NAMESPACE),
            ends: EndActors::default(),
            is_end_actor: r.bool(vars::IS_END_ACTOR).expect("valid default"),
            shutdown_grace: r.duration(vars::SHUTDOWN_GRACE).expect("valid default"),
            max_message_bytes: r.parse(vars::MAX_MESSAGE_BYTES).expect("valid default"),
            max_hops: r.parse(vars::MAX_HOPS).expect("valid default"),
            max_frames: r.parse(vars::MAX_FRAMES).expect("valid default"),
        }
    }

    /// Read every variable of SPEC §5 from `src`.
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let r = Reader(src);
        let actor = r.required(vars::ACTOR_NAME)?;
        validate_actor_name(vars::ACTOR_NAME.name, &actor)?;
        let namespace = r.string(vars::NAMESPACE);
        validate_actor_name(vars::NAMESPACE.name, &namespace)?;
        let transport = TransportKind::from_source(src)?;
        let dir = PathBuf::from(r.string(vars::SOCKET_DIR));
        let socket_name = r.string(vars::SOCKET_NAME);
        let resiliency = Resiliency::from_source(src)?;
        let concurrency: usize = r.parse(vars::CONCURRENCY)?;
        if concurrency == 0 || concurrency > 10_000 {
            return Err(
                vars::CONCURRENCY.error(format!("must be between 1 and 10000, got {concurrency}"))
            );
        }
        let metrics_addr = match r.string(vars::METRICS_ADDR).trim() {
            "off" | "none" => None,
            a => Some(parse_listen_addr(a).map_err(|m| vars::METRICS_ADDR.error(m))?),
        };
        Ok(SidecarConfig {
            actor,
            namespace,
            transport,
            socket_path: dir.join(socket_name),
            ready_file: dir.join(READY_FILE),
            ready_timeout: r.duration(vars::RUNTIME_READY_TIMEOUT)?,
            resiliency,
            concurrency,
            metrics_addr,
            metrics_namespace: r.string(vars::METRICS_NAMESPACE),
            ends: end_actors(src)?,
            is_end_actor: r.bool(vars::IS_END_ACTOR)?,
            shutdown_grace: r.duration(vars::SHUTDOWN_GRACE)?,
            max_message_bytes: r.parse(vars::MAX_MESSAGE_BYTES)?,
            max_hops: at_least_one(r.parse(vars::MAX_HOPS)?, vars::MAX_HOPS)?,
            max_frames: at_least_one(r.parse(vars::MAX_FRAMES)?, vars::MAX_FRAMES)?,
        })
    }

    /// This actor's queue.
    pub fn queue(&self) -> Result<QueueName, InvalidName> {
        QueueName::new(&self.namespace, &self.actor)
    }

    /// The queue of `actor` in this sidecar's namespace.
    pub fn queue_of(&self, actor: &str) -> Result<QueueName, InvalidName> {
        QueueName::new(&self.namespace, actor)
    }
}

fn at_least_one(n: usize, var: Var) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(var.error("must be at least 1"));
    }
    Ok(n)
}

/// `:8080`, `0.0.0.0:8080`, `127.0.0.1:0`, `[::1]:9000`.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_owned()
    };
    full.parse()
        .map_err(|e| format!("invalid listen address {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_required_actor() {
        let err = SidecarConfig::from_source(&[("ASYA_NAMESPACE", "n")]).unwrap_err();
        assert_eq!(err.var, vars::ACTOR_NAME);
        assert_eq!(err.to_string(), "ASYA_ACTOR_NAME: is required but not set");
        let c = SidecarConfig::from_source(&[("ASYA_ACTOR_NAME", "a")]).unwrap();
        assert_eq!(c.queue().unwrap().to_string(), "asya-default-a");
        assert_eq!(c.transport, TransportKind::Nats);
        assert_eq!(
            c.socket_path,
            PathBuf::from("/var/run/asya/asya-runtime.sock")
        );
        assert_eq!(c.metrics_addr.unwrap().port(), 8080);
        assert_eq!(c.concurrency, 1);
        assert_eq!(c.ready_timeout, Duration::from_secs(300));
    }

    /// `SidecarConfig::new` and the variables agree on every default (they drifted once:
    /// ready_timeout 60 s against 300 s).
    #[test]
    fn new_has_the_variables_defaults() {
        let from_vars = SidecarConfig::from_source(&[
            ("ASYA_ACTOR_NAME", "a"),
            ("ASYA_NAMESPACE", "n"),
            ("ASYA_SOCKET_DIR", "/d"),
        ])
        .unwrap();
        let new = SidecarConfig::new("a", "n", "/d");
        assert_eq!(new.socket_path, from_vars.socket_path);
        assert_eq!(new.ready_file, from_vars.ready_file);
        assert_eq!(new.ready_timeout, from_vars.ready_timeout);
        assert_eq!(new.resiliency, from_vars.resiliency);
        assert_eq!(new.concurrency, from_vars.concurrency);
        assert_eq!(new.metrics_namespace, from_vars.metrics_namespace);
        assert_eq!(new.ends, from_vars.ends);
        assert_eq!(new.is_end_actor, from_vars.is_end_actor);
        assert_eq!(new.shutdown_grace, from_vars.shutdown_grace);
        assert_eq!(new.max_message_bytes, from_vars.max_message_bytes);
        assert_eq!(new.max_hops, from_vars.max_hops);
        assert_eq!(new.max_frames, from_vars.max_frames);
    }

    #[test]
    fn invalid_values_name_the_variable() {
        for (var, val) in [
            (vars::CONCURRENCY, "zero"),
            (vars::CONCURRENCY, "0"),
            (vars::ACTOR_TIMEOUT, "soon"),
            (vars::TRANSPORT, "kafka"),
            (vars::CRASH_ON_TIMEOUT, "maybe"),
            (vars::METRICS_ADDR, "localhost"),
            (vars::MAX_ATTEMPTS, "0"),
            (vars::BACKOFF_MULTIPLIER, "0.5"),
        ] {
            let mut m = HashMap::new();
            m.insert("ASYA_ACTOR_NAME".to_string(), "a".to_string());
            m.insert(var.to_string(), val.to_string());
            let err = SidecarConfig::from_source(&m).unwrap_err();
            assert_eq!(err.var, var, "{err}");
            assert!(!err.to_string().contains('\n'));
        }
        let err = SidecarConfig::from_source(&[("ASYA_ACTOR_NAME", "a/b")]).unwrap_err();
        assert_eq!(err.var, vars::ACTOR_NAME);
    }

    #[test]
    fn help_lists_name_default_and_doc() {
        let t = help_table(&[("Sidecar", vars::SIDECAR)]);
        let line = t
            .lines()
            .find(|l| l.trim_start().starts_with("ASYA_CONCURRENCY "))
            .unwrap();
        assert!(line.contains("[default 1]"), "{line}");
        assert!(line.contains("envelopes in flight"), "{line}");
        assert!(
            t.contains("ASYA_ACTOR_NAME") && t.contains("[required]"),
            "{t}"
        );
    }

    #[test]
    fn durations_and_backoff() {
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        let r = Resiliency {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
            ..Resiliency::default()
        };
        assert_eq!(r.backoff(1), Duration::from_millis(100));
        assert_eq!(r.backoff(2), Duration::from_millis(200));
        assert_eq!(r.backoff(3), Duration::from_millis(350));
        assert_eq!(r.backoff(60), Duration::from_millis(350));
        let r = Resiliency {
            non_retryable: vec!["ValueError".into()],
            ..Resiliency::default()
        };
        assert!(!r.is_retryable("ValueError"));
        assert!(!r.is_retryable("mod.ValueError"));
        assert!(r.is_retryable("KeyError"));
    }
}
