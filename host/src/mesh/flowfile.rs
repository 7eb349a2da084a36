//! The flow file of `asya-host up` (TOML): the namespace, the actors and the flows.
//!
//! ```toml
//! namespace = "demo"
//!
//! [actors.tokenize]
//! handler = "pipeline.tokenize"      # module.function or module.Class.method
//! mode = "payload"                   # or "envelope"
//! concurrency = 2
//! env = { MODEL = "small" }
//! timeout = "30s"
//! max_attempts = 3
//! non_retryable_errors = ["ValueError", "pipeline.BadInput"]
//! backoff_initial = "1s"
//! backoff_max = "60s"
//! backoff_multiplier = 2.0
//! policies = [{ path = "priority_router.wasm", config = { actor = "urgent" } }]
//!
//! [flows]
//! summarize = ["tokenize", "summarize", "store"]
//!
//! # The table form adds what MCP clients see of the flow (a tool, `/mcp`).
//! [flows.classify]
//! actors = ["tokenize", "classify"]
//! description = "Classifies a text."
//! input_schema = { type = "object", required = ["text"], properties = { text = { type = "string" } } }
//! ```
//!
//! Kubernetes keys (`image`, `replicas`, `min`, `max`, `resources`; `asya-host render k8s`)
//! are parsed and validated in [`super::deploy`]; `up` ignores them.
//!
//! Unknown keys are rejected with their line. Handler modules and policy paths are resolved
//! relative to the flow file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::deploy::{check_image, DeploySpec, RawDeploy, RawResources};
use crate::config::{parse_duration, validate_actor_name, Resiliency};
use crate::gateway::mcp::{check_input_schema, FlowDoc, FlowDocs};
use crate::plugin::PolicySpec;

/// Largest `concurrency` an actor may ask for.
const MAX_CONCURRENCY: usize = 10_000;

/// A flow file that cannot be read or is invalid. Displays as one line:
/// `FILE:LINE: message`.
#[derive(Debug, thiserror::Error)]
pub enum FlowFileError {
    #[error("cannot read flow file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        /// 1-based line of the offending key or value, when known.
        line: Option<usize>,
        message: String,
    },
}

/// How the runtime calls the handler (`ASYA_HANDLER_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerMode {
    /// The handler gets and returns payloads.
    #[default]
    Payload,
    /// The handler gets and returns whole envelopes.
    Envelope,
}

impl HandlerMode {
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerMode::Payload => "payload",
            HandlerMode::Envelope => "envelope",
        }
    }
}

/// One actor of the flow file.
#[derive(Debug, Clone, PartialEq)]
pub struct ActorSpec {
    pub name: String,
    /// `module.function` or `module.Class.method` (`ASYA_HANDLER`).
    pub handler: String,
    pub mode: HandlerMode,
    /// Envelopes in flight (`ASYA_CONCURRENCY`).
    pub concurrency: usize,
    /// Extra environment of the runtime process.
    pub env: BTreeMap<String, String>,
    /// Runtime call timeout (`ASYA_RESILIENCY_ACTOR_TIMEOUT`).
    pub timeout: Option<Duration>,
    /// Deliveries before x-sump (`ASYA_RESILIENCY_MAX_ATTEMPTS`).
    pub max_attempts: Option<u32>,
    /// Error types never retried (`ASYA_RESILIENCY_NON_RETRYABLE_ERRORS`).
    pub non_retryable_errors: Vec<String>,
    /// First retry delay (`ASYA_RESILIENCY_BACKOFF_INITIAL`).
    pub backoff_initial: Option<Duration>,
    /// Longest retry delay (`ASYA_RESILIENCY_BACKOFF_MAX`).
    pub backoff_max: Option<Duration>,
    /// Growth of the delay per attempt (`ASYA_RESILIENCY_BACKOFF_MULTIPLIER`).
    pub backoff_multiplier: Option<f64>,
    /// Route policies, paths resolved against the flow file's directory.
    pub policies: Vec<PolicySpec>,
    /// Kubernetes keys (`image`, `replicas`/`min`/`max`, `resources`; `up` ignores them).
    pub deploy: DeploySpec,
}

/// A parsed and validated flow file.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowFile {
    pub path: PathBuf,
    /// The directory handler modules are imported from (`PYTHONPATH`).
    pub dir: PathBuf,
    pub namespace: String,
    /// In the order of the file.
    pub actors: Vec<ActorSpec>,
    /// Flow name → ordered actor names.
    pub flows: BTreeMap<String, Vec<String>>,
    /// `description` and `input_schema` of the flows in the table form that have them.
    pub flow_docs: FlowDocs,
    /// Default runtime image of every actor (top-level `image`; `up` ignores it).
    pub image: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    namespace: Option<Spanned<String>>,
    actors: Option<Spanned<BTreeMap<Spanned<String>, RawActor>>>,
    #[serde(default)]
    flows: BTreeMap<Spanned<String>, Spanned<RawFlow>>,
    image: Option<Spanned<String>>,
}

/// A flow: `name = ["a", "b"]`, or the table `[flows.name]` with `actors` and what MCP
/// clients see (`description`, `input_schema`).
struct RawFlow {
    actors: Vec<Spanned<String>>,
    description: Option<String>,
    input_schema: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlowTable {
    actors: Vec<Spanned<String>>,
    description: Option<String>,
    input_schema: Option<Spanned<toml::Value>>,
}

impl<'de> Deserialize<'de> for RawFlow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawFlow;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of actors, or a table with actors, description, input_schema")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawFlow, A::Error> {
                let mut actors = Vec::new();
                while let Some(a) = seq.next_element()? {
                    actors.push(a);
                }
                Ok(RawFlow {
                    actors,
                    description: None,
                    input_schema: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawFlow, A::Error> {
                let t =
                    RawFlowTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawFlow {
                    actors: t.actors,
                    description: t.description,
                    input_schema: t.input_schema,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActor {
    handler: Spanned<String>,
    #[serde(default)]
    mode: HandlerMode,
    concurrency: Option<Spanned<i64>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout: Option<Spanned<String>>,
    max_attempts: Option<Spanned<i64>>,
    non_retryable_errors: Option<Vec<Spanned<String>>>,
    backoff_initial: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
    backoff_multiplier: Option<Spanned<toml::Value>>,
    #[serde(default)]
    policies: Vec<RawPolicy>,
    // Deploy keys (mesh/deploy.rs).
    image: Option<Spanned<String>>,
    replicas: Option<Spanned<i64>>,
    min: Option<Spanned<i64>>,
    max: Option<Spanned<i64>>,
    resources: Option<Spanned<RawResources>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    path: Spanned<String>,
    #[serde(default)]
    config: serde_json::Value,
}

/// Names an actor cannot take (the end actors).
pub const RESERVED_ACTORS: [&str; 2] = [crate::queue::DEFAULT_SINK, crate::queue::DEFAULT_SUMP];

impl FlowFile {
    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<FlowFile, FlowFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FlowFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validate `text` as the content of `path` (used for its directory and in messages).
    pub fn parse(path: &Path, text: &str) -> Result<FlowFile, FlowFileError> {
        let invalid =
            |span: Option<std::ops::Range<usize>>, message: String| FlowFileError::Invalid {
                path: path.to_owned(),
                line: span.map(|s| line_of(text, s.start)),
                message,
            };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            invalid(
                e.span(),
                e.message()
                    .trim()
                    .replace('\n', "; ")
                    .trim_end_matches('.')
                    .to_owned(),
            )
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let namespace = match raw.namespace {
            Some(ns) => {
                let span = ns.span();
                let ns = ns.into_inner();
                validate_actor_name("namespace", &ns)
                    .map_err(|e| invalid(Some(span), e.to_string()))?;
                ns
            }
            None => "default".to_owned(),
        };
        let Some(raw_actors) = raw.actors.filter(|a| !a.get_ref().is_empty()) else {
            return Err(invalid(
                None,
                "no actors: add at least one [actors.NAME] table with a handler".into(),
            ));
        };
        // In the order of the file (the table is sorted by name).
        let mut raw_actors: Vec<_> = raw_actors.into_inner().into_iter().collect();
        raw_actors.sort_by_key(|(name, _)| name.span().start);
        let mut actors = Vec::new();
        for (name, a) in raw_actors {
            let name_span = name.span();
            let name = name.into_inner();
            validate_actor_name("actor", &name)
                .map_err(|e| invalid(Some(name_span.clone()), e.to_string()))?;
            if RESERVED_ACTORS.contains(&name.as_str()) {
                return Err(invalid(
                    Some(name_span),
                    format!("actor name {name:?} is reserved for the end actors"),
                ));
            }
            let handler_span = a.handler.span();
            let handler = a.handler.into_inner();
            check_handler(&handler).map_err(|m| invalid(Some(handler_span), m))?;
            let concurrency = match a.concurrency {
                None => 1,
                Some(c) => {
                    let span = c.span();
                    let c = *c.get_ref();
                    if c < 1 || c as u64 > MAX_CONCURRENCY as u64 {
                        return Err(invalid(
                            Some(span),
                            format!(
                                "actor {name}: concurrency must be between 1 and {MAX_CONCURRENCY}, got {c}"
                            ),
                        ));
                    }
                    c as usize
                }
            };
            let timeout = match a.timeout {
                None => None,
                Some(t) => {
                    let span = t.span();
                    let d = parse_duration(t.get_ref())
                        .ok()
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| {
                            invalid(
                                Some(span),
                                format!(
                                    "actor {name}: invalid timeout {:?} (use e.g. \"30s\", \"500ms\", \"2m\")",
                                    t.get_ref()
                                ),
                            )
                        })?;
                    Some(d)
                }
            };
            let max_attempts = match a.max_attempts {
                None => None,
                Some(m) => {
                    let span = m.span();
                    let m = *m.get_ref();
                    if !(1..=1000).contains(&m) {
                        return Err(invalid(
                            Some(span),
                            format!(
                                "actor {name}: max_attempts must be between 1 and 1000, got {m}"
                            ),
                        ));
                    }
                    Some(m as u32)
                }
            };
            let defaults = Resiliency::default();
            let mut non_retryable_errors = Vec::new();
            for t in a.non_retryable_errors.unwrap_or_default() {
                let span = t.span();
                let t = t.into_inner();
                if t.is_empty() || t.contains(|c: char| c.is_whitespace() || c == ',') {
                    return Err(invalid(
                        Some(span),
                        format!(
                            "actor {name}: invalid error type {t:?} in non_retryable_errors (a Python type name like \"ValueError\" or \"pkg.module.MyError\")"
                        ),
                    ));
                }
                non_retryable_errors.push(t);
            }
            let backoff = |key: &str, v: Option<Spanned<String>>| match v {
                None => Ok(None),
                Some(t) => {
                    let span = t.span();
                    parse_duration(t.get_ref())
                        .ok()
                        .filter(|d| !d.is_zero())
                        .map(Some)
                        .ok_or_else(|| {
                            invalid(
                                Some(span),
                                format!(
                                    "actor {name}: invalid {key} {:?} (use e.g. \"500ms\", \"1s\", \"2m\")",
                                    t.get_ref()
                                ),
                            )
                        })
                }
            };
            let initial_span = a.backoff_initial.as_ref().map(|t| t.span());
            let backoff_initial = backoff("backoff_initial", a.backoff_initial)?;
            let backoff_max = backoff("backoff_max", a.backoff_max)?;
            let (initial, max) = (
                backoff_initial.unwrap_or(defaults.backoff_initial),
                backoff_max.unwrap_or(defaults.backoff_max),
            );
            if initial > max {
                return Err(invalid(
                    initial_span,
                    format!(
                        "actor {name}: backoff_initial {initial:?} is above backoff_max {max:?}{}",
                        if backoff_max.is_none() {
                            " (the default)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            let backoff_multiplier = match a.backoff_multiplier {
                None => None,
                Some(m) => {
                    let span = m.span();
                    let v = match m.get_ref() {
                        toml::Value::Float(f) => Some(*f),
                        toml::Value::Integer(i) => Some(*i as f64),
                        _ => None,
                    };
                    match v.filter(|f| f.is_finite() && (1.0..=100.0).contains(f)) {
                        Some(f) => Some(f),
                        None => {
                            return Err(invalid(
                                Some(span),
                                format!(
                                    "actor {name}: backoff_multiplier must be a number from 1 to 100, got {}",
                                    m.get_ref()
                                ),
                            ))
                        }
                    }
                }
            };
            let mut policies = Vec::new();
            for p in a.policies {
                let span = p.path.span();
                let rel = p.path.into_inner();
                if rel.trim().is_empty() {
                    return Err(invalid(
                        Some(span),
                        format!("actor {name}: empty policy path"),
                    ));
                }
                policies.push(PolicySpec {
                    path: dir.join(rel),
                    config: p.config,
                });
            }
            let deploy = RawDeploy {
                image: a.image,
                replicas: a.replicas,
                min: a.min,
                max: a.max,
                resources: a.resources,
            }
            .validate(&name)
            .map_err(|(span, m)| invalid(Some(span), m))?;
            actors.push(ActorSpec {
                deploy,
                name,
                handler,
                mode: a.mode,
                concurrency,
                env: a.env,
                timeout,
                max_attempts,
                non_retryable_errors,
                backoff_initial,
                backoff_max,
                backoff_multiplier,
                policies,
            });
        }
        let mut flows = BTreeMap::new();
        let mut flow_docs = FlowDocs::new();
        for (name, flow) in raw.flows {
            let name_span = name.span();
            let name = name.into_inner();
            let route_span = flow.span();
            let flow = flow.into_inner();
            let route = flow.actors;
            let input_schema = match flow.input_schema {
                None => None,
                Some(s) => {
                    let span = s.span();
                    let v = serde_json::to_value(s.into_inner())
                        .map_err(|e| invalid(Some(span.clone()), format!("flow {name}: {e}")))?;
                    Some(check_input_schema(&name, v).map_err(|m| invalid(Some(span), m))?)
                }
            };
            if flow.description.is_some() || input_schema.is_some() {
                flow_docs.insert(
                    name.clone(),
                    FlowDoc {
                        description: flow.description,
                        input_schema,
                    },
                );
            }
            if name.trim().is_empty() {
                return Err(invalid(Some(name_span), "empty flow name".into()));
            }
            if route.is_empty() {
                return Err(invalid(
                    Some(route_span),
                    format!("flow {name}: the route is empty"),
                ));
            }
            let mut steps = Vec::with_capacity(route.len());
            for step in route {
                let span = step.span();
                let step = step.into_inner();
                if !actors.iter().any(|a| a.name == step) {
                    let known: Vec<&str> = actors.iter().map(|a| a.name.as_str()).collect();
                    return Err(invalid(
                        Some(span),
                        format!(
                            "flow {name}: unknown actor {step:?} (actors: {})",
                            known.join(", ")
                        ),
                    ));
                }
                steps.push(step);
            }
            flows.insert(name, steps);
        }
        let image = raw
            .image
            .map(|i| check_image("image", i))
            .transpose()
            .map_err(|(span, m)| invalid(Some(span), m))?;
        Ok(FlowFile {
            image,
            path: path.to_owned(),
            dir,
            namespace,
            actors,
            flows,
            flow_docs,
        })
    }

    pub fn actor(&self, name: &str) -> Option<&ActorSpec> {
        self.actors.iter().find(|a| a.name == name)
    }
}

impl ActorSpec {
    /// The sidecar's retry policy for this actor: the sidecar's defaults
    /// ([`Resiliency::default`]) with the flow file's keys on top.
    pub fn resiliency(&self) -> Resiliency {
        let d = Resiliency::default();
        Resiliency {
            actor_timeout: self.timeout.unwrap_or(d.actor_timeout),
            max_attempts: self.max_attempts.unwrap_or(d.max_attempts),
            backoff_initial: self.backoff_initial.unwrap_or(d.backoff_initial),
            backoff_max: self.backoff_max.unwrap_or(d.backoff_max),
            backoff_multiplier: self.backoff_multiplier.unwrap_or(d.backoff_multiplier),
            non_retryable: self.non_retryable_errors.clone(),
            ..d
        }
    }
}

/// `ASYA_RESILIENCY_*` variables among `names`: the sidecar reads them, `up` does not (each
/// actor's retry policy is in the flow file), so `up` warns about each one that is set.
pub fn ignored_resiliency_vars(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with("ASYA_RESILIENCY_"))
        .collect();
    v.sort();
    v
}

/// `module.function` or `module.Class.method`, dotted Python identifiers.
fn check_handler(handler: &str) -> Result<(), String> {
    let parts: Vec<&str> = handler.split('.').collect();
    let ident = |p: &str| {
        let mut chars = p.chars();
        matches!(chars.next(), Some(c) if c == '_' || c.is_alphabetic())
            && chars.all(|c| c == '_' || c.is_alphanumeric())
    };
    if parts.len() < 2 || !parts.iter().all(|p| ident(p)) {
        return Err(format!(
            "invalid handler {handler:?}: expected module.function or module.Class.method"
        ));
    }
    Ok(())
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FlowFile, FlowFileError> {
        FlowFile::parse(Path::new("dir/flow.toml"), text)
    }

    #[test]
    fn full_file() {
        let f = parse(
            r#"
namespace = "demo"
[actors.tokenize]
handler = "pipeline.tokenize"
mode = "envelope"
concurrency = 2
env = { MODEL = "small" }
timeout = "30s"
max_attempts = 3
non_retryable_errors = ["ValueError", "pipeline.BadInput"]
backoff_initial = "250ms"
backoff_max = "5s"
backoff_multiplier = 3
policies = [{ path = "p.wasm", config = { actor = "urgent" } }]
[actors.store]
handler = "pipeline.Store.put"
[flows]
summarize = ["tokenize", "store"]
"#,
        )
        .unwrap();
        assert_eq!(f.namespace, "demo");
        assert_eq!(f.dir, PathBuf::from("dir"));
        let t = f.actor("tokenize").unwrap();
        assert_eq!(t.mode, HandlerMode::Envelope);
        assert_eq!(t.concurrency, 2);
        assert_eq!(t.timeout, Some(Duration::from_secs(30)));
        assert_eq!(t.max_attempts, Some(3));
        assert_eq!(t.env["MODEL"], "small");
        assert_eq!(t.policies[0].path, PathBuf::from("dir/p.wasm"));
        assert_eq!(t.policies[0].config["actor"], "urgent");
        let r = t.resiliency();
        assert_eq!(r.actor_timeout, Duration::from_secs(30));
        assert_eq!(r.max_attempts, 3);
        assert_eq!(r.non_retryable, vec!["ValueError", "pipeline.BadInput"]);
        assert_eq!(r.backoff_initial, Duration::from_millis(250));
        assert_eq!(r.backoff_max, Duration::from_secs(5));
        assert_eq!(r.backoff_multiplier, 3.0);
        let s = f.actor("store").unwrap();
        assert_eq!(s.mode, HandlerMode::Payload);
        assert_eq!(s.concurrency, 1);
        // Unset keys: exactly the sidecar's defaults.
        assert_eq!(s.resiliency(), Resiliency::default());
        assert_eq!(f.flows["summarize"], vec!["tokenize", "store"]);
    }

    #[test]
    fn flows_in_the_table_form_carry_what_mcp_shows() {
        let f = parse(
            r#"
[actors.a]
handler = "m.f"
[actors.b]
handler = "m.g"
[flows]
plain = ["a"]
[flows.rich]
actors = ["a", "b"]
description = "Does a then b."
[flows.rich.input_schema]
type = "object"
required = ["text"]
properties = { text = { type = "string" } }
[flows.bare]
actors = ["b"]
"#,
        )
        .unwrap();
        assert_eq!(f.flows["plain"], vec!["a"]);
        assert_eq!(f.flows["rich"], vec!["a", "b"]);
        assert_eq!(f.flows["bare"], vec!["b"]);
        assert_eq!(f.flow_docs.len(), 1);
        let doc = &f.flow_docs["rich"];
        assert_eq!(doc.description.as_deref(), Some("Does a then b."));
        let schema = doc.input_schema.as_ref().unwrap();
        assert_eq!(schema["required"], serde_json::json!(["text"]));
        assert_eq!(schema["properties"]["text"]["type"], "string");

        for (text, line, want) in [
            (
                "[actors.a]\nhandler = \"m.f\"\n[flows.f]\nactors = [\"a\"]\ninput_schema = { type = \"string\" }\n",
                "dir/flow.toml:5:",
                "type = \"object\"",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\n[flows.f]\nactors = [\"a\"]\ndescripton = \"x\"\n",
                "dir/flow.toml:5:",
                "unknown field",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\n[flows.f]\nactors = [\"a\", \"b\"]\n",
                "dir/flow.toml:4:",
                "unknown actor \"b\"",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\n[flows.f]\ndescription = \"x\"\n",
                "dir/flow.toml:",
                "actors",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(line) && e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "[actors.a]\nhandler = \"m.f\"\nhandlr = \"x\"\n",
                "dir/flow.toml:3:",
                "unknown field",
            ),
            (
                "[actors.a]\nhandler = \"m\"\n",
                "dir/flow.toml:2:",
                "invalid handler",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\nmode = \"stream\"\n",
                "dir/flow.toml:3:",
                "unknown variant",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\n[flows]\nf = [\"a\", \"b\"]\n",
                "dir/flow.toml:4:",
                "unknown actor \"b\"",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\ntimeout = \"soon\"\n",
                "dir/flow.toml:3:",
                "invalid timeout",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\nconcurrency = 0\n",
                ":3:",
                "concurrency",
            ),
            ("[actors.x-sink]\nhandler = \"m.f\"\n", ":1:", "reserved"),
            (
                "[actors.a]\nhandler = \"m.f\"\nnon_retryable_errors = [\"A\", \"B C\"]\n",
                "dir/flow.toml:3:",
                "invalid error type \"B C\"",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\nnon_retryable_errors = \"A\"\n",
                "dir/flow.toml:3:",
                "expected a sequence",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\n\nbackoff_max = \"later\"\n",
                "dir/flow.toml:4:",
                "invalid backoff_max",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\nbackoff_initial = \"2m\"\n",
                "dir/flow.toml:3:",
                "above backoff_max 60s (the default)",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\nbackoff_multiplier = 0.5\n",
                "dir/flow.toml:3:",
                "backoff_multiplier must be a number from 1 to 100, got 0.5",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\nbackoff_multiplier = \"x\"\n",
                "dir/flow.toml:3:",
                "backoff_multiplier",
            ),
            (
                "namespace = \"a b\"\n[actors.a]\nhandler = \"m.f\"\n",
                ":1:",
                "namespace",
            ),
            ("[actors.a\nhandler = \"m.f\"\n", ":1:", ""),
            ("namespace = \"n\"\n", "dir/flow.toml:", "no actors"),
        ];
        for (text, prefix, needle) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(prefix) || e.contains(prefix), "{e}");
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn deploy_keys() {
        use crate::mesh::deploy::Scaling;
        let f = parse(
            r#"
image = "reg.example/app:1"
[actors.a]
handler = "m.f"
image = "reg.example/a:2"
min = 1
max = 4
resources = { requests = { cpu = "500m", memory = "256Mi" }, limits = { "nvidia.com/gpu" = "1" } }
[actors.b]
handler = "m.g"
replicas = 3
[actors.c]
handler = "m.h"
"#,
        )
        .unwrap();
        assert_eq!(f.image.as_deref(), Some("reg.example/app:1"));
        let a = &f.actor("a").unwrap().deploy;
        assert_eq!(a.image.as_deref(), Some("reg.example/a:2"));
        assert_eq!(a.scaling, Scaling::Auto { min: 1, max: 4 });
        assert_eq!(a.resources.requests["cpu"], "500m");
        assert_eq!(a.resources.limits["nvidia.com/gpu"], "1");
        assert_eq!(f.actor("b").unwrap().deploy.scaling, Scaling::Fixed(3));
        let c = &f.actor("c").unwrap().deploy;
        assert_eq!(c.scaling, Scaling::Auto { min: 0, max: 10 });
        assert!(c.image.is_none() && c.resources.is_empty());
    }

    #[test]
    fn deploy_errors_name_the_line() {
        let cases = [
            ("[actors.a]\nhandler = \"m.f\"\nreplicas = 2\nmax = 3\n", ":3:", "not both"),
            ("[actors.a]\nhandler = \"m.f\"\nmin = 5\nmax = 3\n", ":3:", "larger than max"),
            ("[actors.a]\nhandler = \"m.f\"\nmax = 0\n", ":3:", "max must be between 1"),
            ("[actors.a]\nhandler = \"m.f\"\nreplicas = -1\n", ":3:", "replicas must be"),
            ("[actors.a]\nhandler = \"m.f\"\nimage = \"a b\"\n", ":3:", "invalid image"),
            ("image = \"\"\n[actors.a]\nhandler = \"m.f\"\n", ":1:", "invalid image"),
            (
                "[actors.a]\nhandler = \"m.f\"\nresources = { requests = { cpu = \"lots\" } }\n",
                ":3:",
                "resources.requests.cpu: invalid quantity \"lots\"",
            ),
            (
                "[actors.a]\nhandler = \"m.f\"\n\n[actors.a.resources]\nrequest = { cpu = \"1\" }\n",
                ":5:",
                "unknown field `request`",
            ),
        ];
        for (text, prefix, needle) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(prefix), "{e}");
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn resiliency_variables_are_named() {
        let v = ignored_resiliency_vars(
            [
                "PATH",
                "ASYA_RESILIENCY_NON_RETRYABLE_ERRORS",
                "ASYA_HANDLER",
            ]
            .into_iter()
            .map(String::from),
        );
        assert_eq!(v, vec!["ASYA_RESILIENCY_NON_RETRYABLE_ERRORS"]);
    }
}
