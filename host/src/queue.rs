//! Typed queue names (SPEC §5) and the end actors. A leaf module: no other crate module is
//! used here.
//!
//! The queue of actor `A` in namespace `N` is `asya-N-A`. A [`QueueName`] keeps the two parts
//! apart, so transports map it to their own layout (NATS: stream `asya-N`, subject
//! `asya.N.A`, consumer `A`) without parsing the string back, and reporters get the actor
//! without stripping a prefix.

use std::fmt;
use std::sync::Arc;

/// Default name of the actor that receives finished envelopes (`ASYA_ACTOR_SINK`).
pub const DEFAULT_SINK: &str = "x-sink";
/// Default name of the actor that receives failed envelopes (`ASYA_ACTOR_SUMP`).
pub const DEFAULT_SUMP: &str = "x-sump";
/// Longest namespace or actor name accepted.
pub const MAX_NAME_LEN: usize = 200;

/// A namespace or actor name that cannot be part of a queue name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} name {name:?} (1 to 200 letters, digits, '-' and '_')")]
pub struct InvalidName {
    /// `"actor"` or `"namespace"`.
    pub what: &'static str,
    pub name: String,
}

/// Check that `name` can be a namespace or actor in a queue name: 1 to 200 ASCII letters,
/// digits, `-` and `_` (also valid in a NATS subject token and a consumer name).
pub fn check_name(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// The queue of one actor in one namespace. Displays as `asya-<namespace>-<actor>`.
/// Cheap to clone (one shared allocation).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName {
    /// `asya-<namespace>-<actor>`
    full: Arc<str>,
    /// Byte length of the namespace (it starts after `asya-`).
    ns_len: usize,
}

const PREFIX: &str = "asya-";

impl QueueName {
    /// The queue of `actor` in `namespace`; both must pass [`check_name`].
    pub fn new(namespace: &str, actor: &str) -> Result<QueueName, InvalidName> {
        check_name("namespace", namespace)?;
        check_name("actor", actor)?;
        Ok(QueueName {
            full: Arc::from(format!("{PREFIX}{namespace}-{actor}")),
            ns_len: namespace.len(),
        })
    }

    /// The same namespace, another actor.
    pub fn sibling(&self, actor: &str) -> Result<QueueName, InvalidName> {
        QueueName::new(self.namespace(), actor)
    }

    pub fn namespace(&self) -> &str {
        &self.full[PREFIX.len()..PREFIX.len() + self.ns_len]
    }

    pub fn actor(&self) -> &str {
        &self.full[PREFIX.len() + self.ns_len + 1..]
    }

    /// `asya-<namespace>-<actor>`
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.full, f)
    }
}

impl AsRef<str> for QueueName {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

/// The two end actors of a namespace: x-sink (finished envelopes) and x-sump (failed ones),
/// renamed by `ASYA_ACTOR_SINK` / `ASYA_ACTOR_SUMP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndActors {
    pub sink: String,
    pub sump: String,
}

impl Default for EndActors {
    fn default() -> Self {
        EndActors {
            sink: DEFAULT_SINK.into(),
            sump: DEFAULT_SUMP.into(),
        }
    }
}

impl EndActors {
    /// Sink and sump, in that order.
    pub fn names(&self) -> [&str; 2] {
        [&self.sink, &self.sump]
    }

    /// True when `actor` is the sink or the sump.
    pub fn contains(&self, actor: &str) -> bool {
        actor == self.sink || actor == self.sump
    }

    /// `actors` followed by the sink and the sump, without duplicates, in first-seen order.
    pub fn with_actors<'a>(&'a self, actors: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for a in actors.into_iter().chain(self.names()) {
            if !out.iter().any(|o| o == a) {
                out.push(a.to_owned());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_and_display() {
        let q = QueueName::new("prod-eu", "text-clean").unwrap();
        assert_eq!(q.to_string(), "asya-prod-eu-text-clean");
        assert_eq!(q.as_str(), "asya-prod-eu-text-clean");
        assert_eq!(q.namespace(), "prod-eu");
        assert_eq!(q.actor(), "text-clean");
        let s = q.sibling("x-sink").unwrap();
        assert_eq!(s.namespace(), "prod-eu");
        assert_eq!(s.actor(), "x-sink");
        assert_eq!(format!("{q:?}"), "\"asya-prod-eu-text-clean\"");
    }

    #[test]
    fn invalid_names_are_refused() {
        for (ns, actor) in [
            ("", "a"),
            ("n", ""),
            ("n", "a.b"),
            ("n s", "a"),
            ("n", "a/b"),
        ] {
            assert!(QueueName::new(ns, actor).is_err(), "{ns:?} {actor:?}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(QueueName::new("n", &long).is_err());
        let e = QueueName::new("n", "a.b").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid actor name \"a.b\" (1 to 200 letters, digits, '-' and '_')"
        );
    }

    #[test]
    fn end_actors() {
        let e = EndActors::default();
        assert_eq!(e.names(), ["x-sink", "x-sump"]);
        assert!(e.contains("x-sump") && !e.contains("a"));
        let e = EndActors {
            sink: "done".into(),
            sump: "dead".into(),
        };
        assert_eq!(
            e.with_actors(["a", "done", "b"]),
            ["a", "done", "b", "dead"]
        );
    }
}
