//! Typed configuration from `ASYA_*` variables, read once through an injectable source so
//! tests never touch the process environment.
//!
//! Every variable is a constant in [`vars`]; the README's configuration reference lists them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::queue::{EndActors, InvalidName, QueueName};
use crate::transport::TransportKind;

/// Names of every variable the sidecar reads.
pub mod vars {
    pub const ACTOR_NAME: &str = "ASYA_ACTOR_NAME";
    pub const NAMESPACE: &str = "ASYA_NAMESPACE";
    pub const TRANSPORT: &str = "ASYA_TRANSPORT";
    pub const SOCKET_DIR: &str = "ASYA_SOCKET_DIR";
    pub const SOCKET_NAME: &str = "ASYA_SOCKET_NAME";
    pub const RUNTIME_READY_TIMEOUT: &str = "ASYA_RUNTIME_READY_TIMEOUT";
    pub const ACTOR_TIMEOUT: &str = "ASYA_RESILIENCY_ACTOR_TIMEOUT";
    pub const MAX_ATTEMPTS: &str = "ASYA_RESILIENCY_MAX_ATTEMPTS";
    pub const BACKOFF_INITIAL: &str = "ASYA_RESILIENCY_BACKOFF_INITIAL";
    pub const BACKOFF_MAX: &str = "ASYA_RESILIENCY_BACKOFF_MAX";
    pub const BACKOFF_MULTIPLIER: &str = "ASYA_RESILIENCY_BACKOFF_MULTIPLIER";
    pub const NON_RETRYABLE_ERRORS: &str = "ASYA_RESILIENCY_NON_RETRYABLE_ERRORS";
    pub const CRASH_ON_TIMEOUT: &str = "ASYA_RESILIENCY_CRASH_ON_TIMEOUT";
    pub const CONCURRENCY: &str = "ASYA_CONCURRENCY";
    pub const METRICS_ADDR: &str = "ASYA_METRICS_ADDR";
    pub const METRICS_NAMESPACE: &str = "ASYA_METRICS_NAMESPACE";
    pub const ACTOR_SINK: &str = "ASYA_ACTOR_SINK";
    pub const ACTOR_SUMP: &str = "ASYA_ACTOR_SUMP";
    pub const IS_END_ACTOR: &str = "ASYA_IS_END_ACTOR";
    pub const SHUTDOWN_GRACE: &str = "ASYA_SHUTDOWN_GRACE";
    pub const MAX_MESSAGE_BYTES: &str = "ASYA_MAX_MESSAGE_BYTES";
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

/// Typed reads with one-line errors. Empty values count as unset.
pub struct Reader<'a>(pub &'a dyn Source);

impl Reader<'_> {
    pub fn raw(&self, var: &'static str) -> Option<String> {
        self.0.get(var).filter(|v| !v.trim().is_empty())
    }

    pub fn string(&self, var: &'static str, default: &str) -> String {
        self.raw(var).unwrap_or_else(|| default.to_owned())
    }

    pub fn required(&self, var: &'static str) -> Result<String, ConfigError> {
        self.raw(var).ok_or_else(|| ConfigError {
            var,
            message: "is required but not set".into(),
        })
    }

    pub fn parse<T: std::str::FromStr>(
        &self,
        var: &'static str,
        default: T,
    ) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|e| ConfigError {
                var,
                message: format!("invalid value {v:?}: {e}"),
            }),
        }
    }

    pub fn bool(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(var).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(ConfigError {
                    var,
                    message: format!("invalid boolean {v:?} (use true or false)"),
                }),
            },
        }
    }

    /// A duration: `30s`, `500ms`, `2m`, or a plain number of seconds (`1.5`).
    pub fn duration(&self, var: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => parse_duration(v.trim()).map_err(|e| ConfigError {
                var,
                message: format!("invalid duration {v:?}: {e}"),
            }),
        }
    }

    pub fn list(&self, var: &'static str) -> Vec<String> {
        self.raw(var)
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
    let d = EndActors::default();
    let sink = r.string(vars::ACTOR_SINK, &d.sink);
    validate_actor_name(vars::ACTOR_SINK, &sink)?;
    let sump = r.string(vars::ACTOR_SUMP, &d.sump);
    validate_actor_name(vars::ACTOR_SUMP, &sump)?;
    Ok(EndActors { sink, sump })
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
    fn default() -> Self {
        Resiliency {
            actor_timeout: Duration::from_secs(300),
            max_attempts: 3,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            backoff_multiplier: 2.0,
            non_retryable: Vec::new(),
            crash_on_timeout: true,
        }
    }
}

impl Resiliency {
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
}

impl SidecarConfig {
    /// Defaults for `actor` in `namespace` with its runtime socket in `socket_dir`.
    pub fn new(actor: &str, namespace: &str, socket_dir: impl Into<PathBuf>) -> Self {
        let dir = socket_dir.into();
        SidecarConfig {
            actor: actor.to_owned(),
            namespace: namespace.to_owned(),
            transport: TransportKind::Memory,
            socket_path: dir.join("asya-runtime.sock"),
            ready_file: dir.join("runtime-ready"),
            ready_timeout: Duration::from_secs(60),
            resiliency: Resiliency::default(),
            concurrency: 1,
            metrics_addr: None,
            metrics_namespace: "asya_actor".into(),
            ends: EndActors::default(),
            is_end_actor: false,
            shutdown_grace: Duration::from_secs(30),
            max_message_bytes: 64 << 20,
        }
    }

    /// Read every variable of SPEC §5 from `src`.
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let r = Reader(src);
        let actor = r.required(vars::ACTOR_NAME)?;
        validate_actor_name(vars::ACTOR_NAME, &actor)?;
        let namespace = r.string(vars::NAMESPACE, "default");
        validate_actor_name(vars::NAMESPACE, &namespace)?;
        let transport = match r
            .string(vars::TRANSPORT, "nats")
            .to_ascii_lowercase()
            .as_str()
        {
            "memory" => TransportKind::Memory,
            "nats" => TransportKind::Nats,
            "wasm" => TransportKind::Wasm,
            other => {
                return Err(ConfigError {
                    var: vars::TRANSPORT,
                    message: format!("unknown transport {other:?} (use nats, memory or wasm)"),
                })
            }
        };
        let dir = PathBuf::from(r.string(vars::SOCKET_DIR, "/var/run/asya"));
        let socket_name = r.string(vars::SOCKET_NAME, "asya-runtime.sock");
        let d = Resiliency::default();
        let resiliency = Resiliency {
            actor_timeout: r.duration(vars::ACTOR_TIMEOUT, d.actor_timeout)?,
            max_attempts: r.parse(vars::MAX_ATTEMPTS, d.max_attempts)?,
            backoff_initial: r.duration(vars::BACKOFF_INITIAL, d.backoff_initial)?,
            backoff_max: r.duration(vars::BACKOFF_MAX, d.backoff_max)?,
            backoff_multiplier: r.parse(vars::BACKOFF_MULTIPLIER, d.backoff_multiplier)?,
            non_retryable: r.list(vars::NON_RETRYABLE_ERRORS),
            crash_on_timeout: r.bool(vars::CRASH_ON_TIMEOUT, d.crash_on_timeout)?,
        };
        if resiliency.max_attempts == 0 {
            return Err(ConfigError {
                var: vars::MAX_ATTEMPTS,
                message: "must be at least 1".into(),
            });
        }
        if resiliency.actor_timeout.is_zero() {
            return Err(ConfigError {
                var: vars::ACTOR_TIMEOUT,
                message: "must be greater than zero".into(),
            });
        }
        if !(resiliency.backoff_multiplier.is_finite() && resiliency.backoff_multiplier >= 1.0) {
            return Err(ConfigError {
                var: vars::BACKOFF_MULTIPLIER,
                message: "must be a number >= 1".into(),
            });
        }
        let concurrency: usize = r.parse(vars::CONCURRENCY, 1)?;
        if concurrency == 0 || concurrency > 10_000 {
            return Err(ConfigError {
                var: vars::CONCURRENCY,
                message: format!("must be between 1 and 10000, got {concurrency}"),
            });
        }
        let metrics_addr = match r.string(vars::METRICS_ADDR, ":8080").trim() {
            "off" | "none" => None,
            a => Some(parse_listen_addr(a).map_err(|message| ConfigError {
                var: vars::METRICS_ADDR,
                message,
            })?),
        };
        let ends = end_actors(src)?;
        let max_message_bytes: usize = r.parse(vars::MAX_MESSAGE_BYTES, 64usize << 20)?;
        Ok(SidecarConfig {
            actor,
            namespace,
            transport,
            socket_path: dir.join(socket_name),
            ready_file: dir.join("runtime-ready"),
            ready_timeout: r.duration(vars::RUNTIME_READY_TIMEOUT, Duration::from_secs(300))?,
            resiliency,
            concurrency,
            metrics_addr,
            metrics_namespace: r.string(vars::METRICS_NAMESPACE, "asya_actor"),
            ends,
            is_end_actor: r.bool(vars::IS_END_ACTOR, false)?,
            shutdown_grace: r.duration(vars::SHUTDOWN_GRACE, Duration::from_secs(30))?,
            max_message_bytes,
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
