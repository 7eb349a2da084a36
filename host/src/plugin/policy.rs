//! Route policies as WebAssembly components: configuration (`ASYA_ROUTE_POLICIES`), one
//! plugin with its pool of instances, and the chain the sidecar calls per frame.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use wasmtime::Store;

use super::bindings::{self, RoutePolicyPlugin, RoutePolicyPluginPre, Slot};
use super::engine::{self, PluginEngine, StoreState};
use super::{vars, Decision, PluginError, PolicyError, RoutePolicy};
use crate::config::{ConfigError, Reader, Source};
use crate::envelope::{Envelope, Route};
use crate::metrics::Metrics;

/// `kind` label of plugin metrics for route policies.
pub const KIND: &str = "route-policy";

/// Deadline for instantiation plus `configure`.
const INIT_DEADLINE: Duration = Duration::from_secs(2);
/// Idle instances kept per plugin.
const MAX_IDLE: usize = 16;
/// Bounds on a route a policy returns.
const MAX_ROUTE_ACTORS: usize = 1024;
const MAX_ACTOR_NAME: usize = 255;

/// One entry of `ASYA_ROUTE_POLICIES`: a component file and its configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySpec {
    pub path: PathBuf,
    /// Passed to the policy's `configure` as JSON text (`null` when not given).
    pub config: serde_json::Value,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecJson {
    path: PathBuf,
    #[serde(default)]
    config: serde_json::Value,
}

impl PolicySpec {
    /// The ordered policies of `ASYA_ROUTE_POLICIES` (empty when unset): a JSON array
    /// `[{"path": "/p/a.wasm", "config": {...}}, ...]` or comma-separated paths.
    pub fn from_source(src: &dyn Source) -> Result<Vec<PolicySpec>, ConfigError> {
        match Reader(src).raw(vars::ROUTE_POLICIES) {
            None => Ok(Vec::new()),
            Some(text) => PolicySpec::parse(&text).map_err(|m| vars::ROUTE_POLICIES.error(m)),
        }
    }

    /// Parse the value of `ASYA_ROUTE_POLICIES`.
    pub fn parse(text: &str) -> Result<Vec<PolicySpec>, String> {
        let text = text.trim();
        let specs: Vec<PolicySpec> = if text.starts_with('[') {
            let items: Vec<SpecJson> = serde_json::from_str(text).map_err(|e| {
                format!("invalid JSON (expected [{{\"path\": ..., \"config\": ...}}]): {e}")
            })?;
            items
                .into_iter()
                .map(|s| PolicySpec {
                    path: s.path,
                    config: s.config,
                })
                .collect()
        } else {
            text.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| PolicySpec {
                    path: PathBuf::from(p),
                    config: serde_json::Value::Null,
                })
                .collect()
        };
        if let Some(s) = specs.iter().find(|s| s.path.as_os_str().is_empty()) {
            return Err(format!("empty path in {s:?}"));
        }
        Ok(specs)
    }
}

/// A sidecar's route policies as configured: `ASYA_ROUTE_POLICIES`, the `ASYA_PLUGIN_*`
/// limits and the compiled-code cache. Parsing reads no file; [`PolicySettings::load`] does.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySettings {
    pub specs: Vec<PolicySpec>,
    pub options: PolicyOptions,
    pub cache_dir: Option<PathBuf>,
}

impl PolicySettings {
    pub fn from_source(src: &dyn Source) -> Result<PolicySettings, ConfigError> {
        Ok(PolicySettings {
            specs: PolicySpec::from_source(src)?,
            options: PolicyOptions::from_source(src)?,
            cache_dir: engine::cache_dir(src),
        })
    }

    /// Load the chain (reads and compiles the files); `None` when no policy is configured.
    pub async fn load(
        &self,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Option<PolicyChain>, PluginError> {
        if self.specs.is_empty() {
            return Ok(None);
        }
        let engine = PluginEngine::new(self.cache_dir.clone())?;
        Ok(Some(
            PolicyChain::load(&engine, &self.specs, self.options, metrics).await?,
        ))
    }
}

/// Limits applied to every policy call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyOptions {
    /// CPU deadline per call (`ASYA_PLUGIN_DEADLINE`, default 50 ms).
    pub deadline: Duration,
    /// Linear memory limit per instance (`ASYA_PLUGIN_MEMORY_LIMIT`, default 32 MiB).
    pub memory_limit: usize,
}

impl Default for PolicyOptions {
    /// The variables' defaults.
    fn default() -> Self {
        let unset: [(&str, &str); 0] = [];
        PolicyOptions::from_source(&unset).expect("the defaults of ASYA_PLUGIN_* are valid")
    }
}

impl PolicyOptions {
    pub fn from_source(src: &dyn Source) -> Result<PolicyOptions, ConfigError> {
        let r = Reader(src);
        let deadline = r.duration(vars::PLUGIN_DEADLINE)?;
        if deadline.is_zero() {
            return Err(vars::PLUGIN_DEADLINE.error("must be greater than zero"));
        }
        let v = r.string(vars::PLUGIN_MEMORY_LIMIT);
        let memory_limit = parse_bytes(&v).ok_or_else(|| {
            vars::PLUGIN_MEMORY_LIMIT.error(format!(
                "invalid size {v:?} (use bytes or a KiB/MiB/GiB suffix)"
            ))
        })?;
        Ok(PolicyOptions {
            deadline,
            memory_limit,
        })
    }
}

fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mul) = [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n.trim(), *m)))
        .unwrap_or((s, 1));
    num.parse::<usize>()
        .ok()?
        .checked_mul(mul)
        .filter(|n| *n > 0)
}

struct Instance {
    store: Store<StoreState>,
    bindings: RoutePolicyPlugin,
}

/// One loaded policy component with its pool of ready instances.
pub struct PolicyPlugin {
    name: Arc<str>,
    path: PathBuf,
    engine: PluginEngine,
    pre: RoutePolicyPluginPre<StoreState>,
    config: String,
    opts: PolicyOptions,
    idle: Mutex<Vec<Instance>>,
    metrics: Option<Arc<Metrics>>,
}

/// How a call ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// The policy returned an error.
    Error,
    /// The instance trapped (panic, unreachable, ...).
    Trap,
    /// The per-call deadline cut it off.
    Timeout,
    /// It hit the memory limit.
    MemoryLimit,
    /// Its answer broke the host's rules (route history, bounds).
    RejectedByHost,
    /// A fresh instance could not be created.
    InstantiateFailed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
            Outcome::MemoryLimit => "memory-limit",
            Outcome::RejectedByHost => "rejected-by-host",
            Outcome::InstantiateFailed => "instantiate-failed",
        }
    }
}

impl PolicyPlugin {
    /// Compile (or load from the cache), link, create and configure a first instance: a
    /// plugin that cannot do all that fails here, at startup, naming its file.
    pub async fn load(
        engine: &PluginEngine,
        spec: &PolicySpec,
        opts: PolicyOptions,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<PolicyPlugin, PluginError> {
        let path = spec.path.clone();
        let component = engine.load(&path)?;
        if let Some(w @ super::World::Transport) = super::check::world_of(engine, &component) {
            return Err(super::check::other_world(
                &path,
                super::World::RoutePolicy,
                w,
            ));
        }
        let linker = engine.policy_linker()?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Imports {
                path: path.clone(),
                message: format!("{e:#}"),
            })?;
        let pre = RoutePolicyPluginPre::new(pre).map_err(|e| PluginError::Exports {
            path: path.clone(),
            message: format!("{e:#}"),
        })?;
        let plugin = PolicyPlugin {
            name: plugin_name(&path).into(),
            path,
            engine: engine.clone(),
            pre,
            config: spec.config.to_string(),
            opts,
            idle: Mutex::new(Vec::new()),
            metrics,
        };
        let first = plugin.instantiate().await?;
        plugin.put_back(first);
        Ok(plugin)
    }

    /// The plugin's name (its file stem), used in metrics and logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn instantiate(&self) -> Result<Instance, PluginError> {
        let mut store = self
            .engine
            .store(self.name.clone(), self.opts.memory_limit, INIT_DEADLINE);
        let fail = |message: String| PluginError::Instantiate {
            path: self.path.clone(),
            message,
        };
        // Instantiation plus `configure`, bounded in CPU (epochs) and wall-clock time.
        let work = async {
            let bindings = self
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| fail(format!("{e:#}")))?;
            store.set_epoch_deadline(engine::ticks(INIT_DEADLINE));
            match bindings
                .asya_plugin_route_policy()
                .call_configure(&mut store, &self.config)
                .await
            {
                Ok(Ok(())) => Ok(bindings),
                Ok(Err(e)) => Err(PluginError::Configure {
                    path: self.path.clone(),
                    message: bindings::guest_error(e),
                }),
                Err(e) => Err(fail(format!("configure trapped: {e:#}"))),
            }
        };
        let bindings = tokio::time::timeout(INIT_DEADLINE, work)
            .await
            .map_err(|_| {
                fail(format!(
                    "instantiation and configure did not finish within {} ms",
                    INIT_DEADLINE.as_millis()
                ))
            })??;
        Ok(Instance { store, bindings })
    }

    fn take(&self) -> Option<Instance> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_back(&self, inst: Instance) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(inst);
        }
    }

    fn record(&self, outcome: Outcome, took: Duration) {
        if let Some(m) = &self.metrics {
            m.plugin_call(&self.name, KIND, outcome.as_str(), took);
        }
    }

    fn error(&self, message: String) -> PolicyError {
        PolicyError {
            plugin: self.name.to_string(),
            message,
        }
    }

    /// One `decide` call on `frame` with `frame_route` as its route (the route an earlier
    /// policy of the chain may have replaced).
    async fn call(
        &self,
        input: &Envelope,
        frame: &Envelope,
        frame_route: &Route,
    ) -> Result<Decision, PolicyError> {
        let start = Instant::now();
        let mut inst = match self.take() {
            Some(i) => i,
            None => match self.instantiate().await {
                Ok(i) => i,
                Err(e) => {
                    self.record(Outcome::InstantiateFailed, start.elapsed());
                    return Err(self.error(e.to_string()));
                }
            },
        };
        let call_start = Instant::now();
        {
            let data = inst.store.data_mut();
            data.input.fill(input, &input.route);
            data.frame.fill(frame, frame_route);
        }
        inst.store
            .set_epoch_deadline(engine::ticks(self.opts.deadline));
        // Bounded twice: the epoch deadline stops a guest burning CPU; the wall-clock
        // timeout stops one blocked in a host call (a sleep, a poll), which uses no CPU and
        // never reaches an epoch check. Dropping the call leaves the instance half-entered:
        // it is discarded like a trapped one.
        let call = inst.bindings.asya_plugin_route_policy().call_decide(
            &mut inst.store,
            Slot::Input.handle(),
            Slot::Frame.handle(),
        );
        let result = tokio::time::timeout(self.opts.deadline, call).await.ok();
        let took = call_start.elapsed();
        let Some(result) = result else {
            drop(inst);
            self.record(Outcome::Timeout, took);
            tracing::warn!(plugin = %self.name, outcome = Outcome::Timeout.as_str(), took_ms = took.as_millis() as u64, "route policy blocked past its deadline; instance discarded");
            return Err(self.error(format!(
                "exceeded its {} ms deadline (blocked in a host call)",
                self.opts.deadline.as_millis()
            )));
        };
        {
            let data = inst.store.data_mut();
            data.input.trim();
            data.frame.trim();
        }
        match result {
            Ok(Ok(d)) => {
                self.put_back(inst);
                let d = bindings::decision_from_wit(d, &frame_route.prev);
                if let Decision::ReplaceRoute(r) = &d {
                    if let Err(why) = check_route(&input.route, r) {
                        self.record(Outcome::RejectedByHost, took);
                        return Ok(Decision::Reject(format!("policy {}: {why}", self.name)));
                    }
                }
                self.record(Outcome::Ok, took);
                Ok(d)
            }
            Ok(Err(e)) => {
                self.put_back(inst);
                self.record(Outcome::Error, took);
                Err(self.error(format!("returned an error: {}", bindings::guest_error(e))))
            }
            Err(e) => {
                // A trapped instance cannot be entered again: drop it; the next call
                // creates a fresh one.
                let outcome = if inst.store.data().limits.hit {
                    Outcome::MemoryLimit
                } else if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
                    Outcome::Timeout
                } else {
                    Outcome::Trap
                };
                drop(inst);
                self.record(outcome, took);
                let what = match outcome {
                    Outcome::Timeout => format!(
                        "exceeded its {} ms deadline",
                        self.opts.deadline.as_millis()
                    ),
                    Outcome::MemoryLimit => format!(
                        "exceeded its memory limit of {} bytes",
                        self.opts.memory_limit
                    ),
                    _ => format!(
                        "trapped: {}",
                        super::truncate(&format!("{e:#}"), super::MAX_REASON)
                    ),
                };
                tracing::warn!(plugin = %self.name, outcome = outcome.as_str(), error = %format!("{e:#}"), "route policy failed; instance discarded");
                Err(self.error(what))
            }
        }
    }
}

/// The route rules and bounds for a route returned by a policy.
fn check_route(input: &Route, out: &Route) -> Result<(), String> {
    input
        .check_successor(out)
        .map_err(|v| format!("rewrote route history: {v}"))?;
    if out.next.len() > MAX_ROUTE_ACTORS {
        return Err(format!(
            "route has {} next actors (limit {MAX_ROUTE_ACTORS})",
            out.next.len()
        ));
    }
    if let Some(a) = std::iter::once(&out.curr)
        .chain(&out.next)
        .find(|a| a.len() > MAX_ACTOR_NAME)
    {
        return Err(format!(
            "actor name of {} bytes (limit {MAX_ACTOR_NAME})",
            a.len()
        ));
    }
    Ok(())
}

fn plugin_name(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .to_owned()
}

/// The ordered route policies, applied to every outgoing frame. A policy that replaces the
/// route hands the updated frame to the next one; reject / x-sink / x-sump end the chain.
pub struct PolicyChain {
    policies: Vec<PolicyPlugin>,
}

impl PolicyChain {
    /// Load every policy in order (startup errors name the file).
    pub async fn load(
        engine: &PluginEngine,
        specs: &[PolicySpec],
        opts: PolicyOptions,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<PolicyChain, PluginError> {
        let mut policies = Vec::with_capacity(specs.len());
        for spec in specs {
            policies.push(PolicyPlugin::load(engine, spec, opts, metrics.clone()).await?);
        }
        Ok(PolicyChain { policies })
    }

    /// Names of the policies, in order.
    pub fn names(&self) -> Vec<&str> {
        self.policies.iter().map(PolicyPlugin::name).collect()
    }
}

#[async_trait]
impl RoutePolicy for PolicyChain {
    async fn decide(&self, input: &Envelope, frame: &Envelope) -> Result<Decision, PolicyError> {
        if self.policies.is_empty() {
            return Ok(Decision::Keep);
        }
        // The route as replaced by the policies so far (`None`: the frame's own).
        let mut replaced: Option<Route> = None;
        for p in &self.policies {
            let route = replaced.as_ref().unwrap_or(&frame.route);
            match p.call(input, frame, route).await? {
                Decision::Keep => {}
                Decision::ReplaceRoute(r) => replaced = Some(r),
                terminal => return Ok(terminal),
            }
        }
        Ok(match replaced {
            Some(r) => Decision::ReplaceRoute(r),
            None => Decision::Keep,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_from_json_or_paths() {
        let s =
            PolicySpec::parse(r#"[{"path": "/p/a.wasm", "config": {"x": 1}}, {"path": "b.wasm"}]"#)
                .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].path, PathBuf::from("/p/a.wasm"));
        assert_eq!(s[0].config["x"], 1);
        assert_eq!(s[1].config, serde_json::Value::Null);
        let s = PolicySpec::parse(" /a.wasm, b.wasm ,").unwrap();
        assert_eq!(
            s.iter().map(|s| s.path.clone()).collect::<Vec<_>>(),
            vec![PathBuf::from("/a.wasm"), PathBuf::from("b.wasm")]
        );
        let e =
            PolicySpec::from_source(&[(vars::ROUTE_POLICIES.name, "[{\"pth\": 1}]")]).unwrap_err();
        assert_eq!(e.var, vars::ROUTE_POLICIES);
        assert!(PolicySpec::from_source(&[("X", "")]).unwrap().is_empty());
    }

    #[test]
    fn options_parse_sizes_and_durations() {
        let o = PolicyOptions::from_source(&[
            (vars::PLUGIN_DEADLINE.name, "20ms"),
            (vars::PLUGIN_MEMORY_LIMIT.name, "8MiB"),
        ])
        .unwrap();
        assert_eq!(o.deadline, Duration::from_millis(20));
        assert_eq!(o.memory_limit, 8 << 20);
        assert_eq!(
            PolicyOptions::from_source(&[("X", "")]).unwrap(),
            PolicyOptions::default()
        );
        let e =
            PolicyOptions::from_source(&[(vars::PLUGIN_MEMORY_LIMIT.name, "lots")]).unwrap_err();
        assert_eq!(e.var, vars::PLUGIN_MEMORY_LIMIT);
    }

    #[test]
    fn host_checks_returned_routes() {
        let input = Route {
            prev: vec![],
            curr: "a".into(),
            next: vec!["b".into()],
        };
        let ok = Route {
            prev: vec!["a".into()],
            curr: "x".into(),
            next: vec!["b".into()],
        };
        assert!(check_route(&input, &ok).is_ok());
        let history = Route {
            prev: vec![],
            ..ok.clone()
        };
        assert!(check_route(&input, &history)
            .unwrap_err()
            .contains("history"));
        let long = Route {
            curr: "x".repeat(300),
            ..ok
        };
        assert!(check_route(&input, &long).is_err());
    }
}
